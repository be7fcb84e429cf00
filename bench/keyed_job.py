"""The `noop_keyed` job type: `noop` with a per-key concurrency limit, for the drain with keys and priorities.

Registered next to `noop` (bench/run.py's JOB_MODULES); bench/scheduling.py spreads its jobs over 200 keys, where
the limit binds now and then, and over 20, where it binds all the time.
"""

from bench.noop_job import Input, run
from worker import JobType

CONCURRENCY = 2  # per concurrency_key

JOB_TYPE = JobType(
    "noop_keyed", Input, run, timeout_s=60, concurrency=CONCURRENCY,
    description="Do nothing, at most CONCURRENCY at once per key: the benchmark's keyed job.",
)  # fmt: skip
