"""The garbage collector's settings for the web process, applied once its start-up is done.

Measured with `python -m bench --quick --only get_job` (docs/performance.md): with Python's defaults, collections
walked every start-up object (modules, routes, the OpenAPI document, msgspec types) again and again, and the young
generation was collected every 700 allocations, a few times per request. Freezing what start-up built and
collecting the young generation every 20,000 allocations took the web's p99 from 3.5x to 1.9x a bare app's, and
its CPU per status read from 207 to about 171 µs. Almost everything a request allocates is freed by reference
counting; the collector is only for cycles, and 20,000 objects waiting for it is a few MB at most. The same in
the worker made no difference to a drain (`--only drain`, three runs each way), so it keeps Python's defaults.
"""

from __future__ import annotations

import gc

YOUNG = 20_000  # allocations between collections of the youngest generation (Python's default: 700)


def settle() -> None:
    """Call when start-up is over: what exists now lives as long as the process, so no collection need walk it."""
    gc.set_threshold(YOUNG, 20, 20)
    gc.freeze()
