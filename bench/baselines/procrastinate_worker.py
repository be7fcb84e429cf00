"""`python -m bench.baselines.procrastinate_worker`: the procrastinate baseline's worker on uvloop.

Its own module because procrastinate warns against an App made in `__main__` (its docs' "Defining your app at
the top level of your program").
"""

import uvloop

from bench.baselines.procrastinate_app import work

uvloop.run(work())
