"""The engine driven one call at a time, as only tests (and benchmarks) do: the production code batches these."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any
from uuid import UUID

from databases import Database

from server.limits import StreamSlot
from worker import Deps, claim, store
from worker.capacity import Capacity
from worker.heartbeat import beat_many
from worker.job import Progress
from worker.queue import Bell
from worker.webhooks import store as webhook_store
from worker.webhooks.deliver import Schedule, Sender, deliver, lease_s


async def insert_job(db: Database, job: store.NewJob) -> store.JobRow | None:
    """One job, as `store.insert_jobs`."""
    return (await store.insert_jobs(db, [job]))[0]


async def claim_one(
    jobs: store.Jobs, job_id: UUID, attempt: int, *, owner: str, lease_s: float, capacity: Capacity | None = None
) -> claim.Claimed | None:
    """Start attempt `attempt + 1`, as `claim.claim_many`. None: stale, duplicate, or it may not run now."""
    claimed = await claim.claim_many(jobs, [(job_id, attempt)], owner=owner, lease_s=lease_s, capacity=capacity)
    return claimed[0]


def pairs(bells: Sequence[Bell]) -> list[tuple[UUID, int]]:
    """The `(job_id, started)` each bell rings for."""
    return [(bell.job_id, bell.started) for bell in bells]


async def deliver_due(deps: Deps, sender: Sender, schedule: Schedule | None = None) -> int:
    """One pass of the delivery loop: claim what is due (up to `webhook_concurrency`), attempt each, wait for all.
    Returns how many."""
    config = deps.config
    schedule = schedule or Schedule(window_s=config.webhook_retry_window_s)
    claimed = (await webhook_store.claim(deps.db, limit=config.webhook_concurrency, lease_s=lease_s(config))).taken
    await asyncio.gather(*(deliver(deps, sender, c, schedule) for c in claimed))
    return len(claimed)


@contextlib.asynccontextmanager
async def stream_slot(
    redis: Any, key: str, *, limit: int, retry_after: int, lease_s: float = 60.0
) -> AsyncIterator[StreamSlot]:
    """Hold one of `key`'s `limit` stream slots for the body of the `with` (renewed every lease/3), or raise
    RateLimited: what server/stream.py does around a stream."""
    slot = await StreamSlot.take(redis, key, limit=limit, retry_after=retry_after, lease_s=lease_s)

    async def renew() -> None:
        while True:
            await asyncio.sleep(lease_s / 3)
            await slot.renew()

    renewing = asyncio.create_task(renew())
    try:
        yield slot
    finally:
        renewing.cancel()
        await slot.release()


async def beat(
    jobs: store.Jobs,
    job_id: UUID,
    attempt: int,
    *,
    lease_s: float,
    progress: Progress | None = None,
    logs: Sequence[tuple[str, str]] = (),
) -> str:
    """One attempt's heartbeat, as `heartbeat.beat_many`: `renewed`, `cancel` (renewed, but a cancel was asked for)
    or `superseded` (not its job's running attempt). Log lines go first, then the progress."""
    events: list[Any] = [("log", {"level": level, "message": message}) for level, message in logs]
    events += [] if progress is None else [("progress", progress)]
    verdicts = await beat_many(jobs, [(job_id, attempt, events)], lease_s=lease_s)
    return verdicts.get((job_id, attempt), "renewed")
