"""The `noop` job type, registered through OUTLAST_JOB_MODULES=bench.noop_job as a user's module would be.

It does nothing, so a run measures only what Outlast spends around a job: submit, queue, claim, finish.
"""

import msgspec

from worker import Context, JobType


class Input(msgspec.Struct, forbid_unknown_fields=True):
    pass


async def run(input: Input, ctx: Context) -> None:
    return None


JOB_TYPE = JobType("noop", Input, run, timeout_s=60, description="Do nothing: the benchmark's job.")
