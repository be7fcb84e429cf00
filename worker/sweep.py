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

from worker import store
from worker.queue import Deps, forget, ring_again

log = logging.getLogger("outlast.sweep")


@contextlib.asynccontextmanager
async def sweeping(deps: Deps) -> AsyncIterator[None]:
    """Sweep every `sweep_interval_s` (the first pass at once) while the block runs."""

    async def loop() -> None:
        while True:
            try:
                await sweep_once(deps)
            except store.UNAVAILABLE as exc:
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


async def sweep_once(deps: Deps) -> None:
    config, db = deps.config, deps.db
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
    due = await store.take_due(db, batch=config.sweep_batch, redispatch_after_s=config.redispatch_after_s)
    rung = await asyncio.gather(*(ring_again(deps.redis, job_id, attempt) for job_id, attempt in due))
    if due and not all(rung):
        log.warning("sweep: Redis unavailable; %d jobs wait for the next pass", rung.count(False))
    await store.retain(
        db,
        batch=config.sweep_batch,
        result_retention_s=config.result_retention_s,
        job_retention_s=config.job_retention_s,
    )
    if rescued or expired or cancelled or due:
        log.info("sweep: rescued %d, expired %d, cancelled %d, dispatched %d", rescued, expired, cancelled, len(due))
