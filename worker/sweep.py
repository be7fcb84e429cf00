"""The cron pass, every few seconds on every worker (arq keeps one pass at a time): rescue, expire,
dispatch, retain. Each step is a guarded batch with SKIP LOCKED, so concurrent passes never collide."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from worker import events, store
from worker.queue import Deps, ring_again

log = logging.getLogger("outlast.sweep")


async def sweep(ctx: dict[str, Any]) -> None:
    deps: Deps = ctx["deps"]
    try:
        await sweep_once(deps)
    except store.UNAVAILABLE as exc:
        log.warning("sweep skipped: database unavailable (%s)", exc)


async def sweep_once(deps: Deps) -> None:
    config, db = deps.config, deps.db
    rescued = await store.rescue_lost(
        db, batch=config.sweep_batch, backoff_base_s=config.backoff_base_s, backoff_cap_s=config.backoff_cap_s
    )
    expired = await store.expire_late(db, batch=config.sweep_batch)
    cancelled = await store.cancel_requeued(db, batch=config.sweep_batch)
    if rescued or expired or cancelled:
        await events.publish(deps.redis, None)  # the statements name no job: every follower looks
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
