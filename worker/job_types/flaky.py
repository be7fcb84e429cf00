"""Shows retries: fails its first `failures` attempts with a retryable error, then succeeds."""

from typing import Annotated

import msgspec

from worker.job import Context, JobType, RetryableError


class Input(msgspec.Struct, forbid_unknown_fields=True):
    failures: Annotated[int, msgspec.Meta(ge=0, le=20)] = 1


class Output(msgspec.Struct):
    attempts: int


async def run(input: Input, ctx: Context) -> Output:
    if ctx.attempt <= input.failures:
        raise RetryableError(f"failing on purpose: attempt {ctx.attempt} of the first {input.failures}")
    return Output(attempts=ctx.attempt)


JOB_TYPE = JobType("flaky", Input, run, timeout_s=60, description="Fail the first `failures` attempts, then succeed.")
