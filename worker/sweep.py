"""The sweep: a pass every few seconds on every worker: rescue, expire, cancel, dispatch, retain. Each step is a
guarded batch with SKIP LOCKED, so concurrent passes never collide.

It runs as the worker's own task, not as an arq cron job: a cron job needs a free job slot, and a worker whose
slots are all taken by long jobs would never rescue anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator

from worker import database, store
from worker.capacity import Capacity, forget_stale, leave, refresh
from worker.config import Config
from worker.deps import Deps
from worker.queue import forget, ring_again

log = logging.getLogger("outlast.sweep")


@contextlib.asynccontextmanager
async def sweeping(deps: Deps, capacity: Capacity | None = None) -> AsyncIterator[None]:
    """Sweep every `sweep_interval_s` (the first pass at once) while the block runs; with `capacity`, each pass also
    says this worker is alive and recomputes the tenants' default cap."""

    async def loop() -> None:
        while True:
            try:
                await sweep_once(deps, capacity)
            except database.UNAVAILABLE as exc:
                log.warning("sweep skipped: database unavailable (%s)", exc)
            except Exception:
                log.exception("sweep failed; the next pass tries again")
            # Jitter, so that the workers of a deployment started together don't sweep in lockstep.
            await asyncio.sleep(deps.config.sweep_interval_s * random.uniform(0.8, 1.2))

    task = asyncio.create_task(loop(), name="outlast-sweep")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if capacity is not None:
            with contextlib.suppress(*database.UNAVAILABLE):
                await leave(deps.db, capacity.name)


def fresh_s(config: Config) -> float:
    """How recently a worker must have said it is alive for its slots to count."""
    return 3 * config.sweep_interval_s + config.lease_s


async def sweep_once(deps: Deps, capacity: Capacity | None = None) -> None:
    config, db = deps.config, deps.db
    if capacity is not None:
        await refresh(db, capacity, fresh_s=fresh_s(config))
    lost = await store.rescue_lost(
        db, batch=config.sweep_batch, backoff_base_s=config.backoff_base_s, backoff_cap_s=config.backoff_cap_s
    )
    await forget(deps.redis, lost)
    rescued = len(lost)
    expired = await store.expire_late(db, batch=config.sweep_batch)
    cancelled = await store.cancel_requeued(db, batch=config.sweep_batch)
    if rescued or expired or cancelled:
        deps.notifier.notify(None)  # the statements name no job: every follower looks
    # Dispatch after rescue, so a rescued job whose backoff is already over goes out in this same pass.
    default_cap = None if capacity is None else capacity.default_cap
    due = await store.take_due(
        db, batch=config.sweep_batch, redispatch_after_s=config.redispatch_after_s, default_cap=default_cap
    )
    rung = await asyncio.gather(*(ring_again(deps.redis, job_id, attempt) for job_id, attempt in due))
    if due and not all(rung):
        log.warning("sweep: Redis unavailable; %d jobs wait for the next pass", rung.count(False))
    await store.retain(
        db,
        batch=config.sweep_batch,
        result_retention_s=config.result_retention_s,
        job_retention_s=config.job_retention_s,
    )
    await forget_stale(db, older_than_s=86_400)
    if rescued or expired or cancelled or due:
        log.info("sweep: rescued %d, expired %d, cancelled %d, dispatched %d", rescued, expired, cancelled, len(due))
