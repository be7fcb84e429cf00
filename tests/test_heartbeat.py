"""worker/heartbeat.py: one statement a tick renews the leases and writes the events of every attempt that needs it,
and its answer names only the attempts that must stop."""

from __future__ import annotations

import time
from datetime import datetime
from uuid import UUID

import msgspec

from tests import engine
from tests.conftest import eventually
from tests.test_store import OWNER, new_job
from tests.test_store import events as stored_events
from worker import Deps, store
from worker.heartbeat import Pulse, beat_many
from worker.job import Progress


async def _running(deps: Deps, *, lease_s: float = 30) -> UUID:
    job_id = await new_job(deps.db)
    assert await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=lease_s) is not None
    return job_id


async def _lease(deps: Deps, job_id: UUID) -> datetime:
    expires: datetime = await deps.db.fetch_val("SELECT lease_expires_at FROM jobs WHERE id = :id", {"id": job_id})
    return expires


async def test_a_write_answers_only_for_the_attempts_it_did_not_simply_renew(deps: Deps) -> None:
    renewed, cancelled, ended = [await _running(deps) for _ in range(3)]
    await deps.db.execute("UPDATE jobs SET cancel_requested_at = now() WHERE id = :id", {"id": cancelled})
    await store.finish(deps.jobs, ended, 1, "succeeded", result=b"1")
    before = await _lease(deps, renewed)
    attempts = [(job_id, 1, [("progress", Progress(0.5, "half"))]) for job_id in (renewed, cancelled, ended)]
    answer = await beat_many(deps.jobs, attempts, lease_s=300)  # type: ignore[arg-type]
    assert answer == {(cancelled, 1): "cancel", (ended, 1): "superseded"}
    assert await _lease(deps, renewed) > before
    row = await store.get_job(deps.db, "default", renewed)
    assert row is not None and msgspec.json.decode(row.progress) == {"fraction": 0.5, "message": "half"}


async def test_an_attempt_that_reports_nothing_is_renewed_while_others_report_every_tick(deps: Deps) -> None:
    """The pulse writes the attempts with news at each tick, and a silent one once its lease is due: its renewal
    must not wait for news it never has."""
    lease_s = deps.config.lease_s
    pulse = Pulse(deps)
    beats = []
    try:
        for _ in range(2):
            claimed = await engine.claim_one(deps.jobs, await new_job(deps.db), 0, owner=OWNER, lease_s=lease_s)
            assert claimed is not None
            beats.append(pulse.attach(claimed, leased_at=time.monotonic()))
        silent, chatty = beats
        claimed_lease = await _lease(deps, silent.id)

        async def renewed() -> bool | None:
            chatty.report(Progress(time.monotonic() % 1))  # at every look: news for every tick
            return True if await _lease(deps, silent.id) > claimed_lease else None

        await eventually(renewed, within=3 * lease_s)
        assert len(await stored_events(deps, chatty.id)) > 2  # its claim, then its reports
    finally:
        for beat in beats:
            beat.stop()
        await pulse.aclose()
