"""The job lifecycle as a property: random interleavings of submit, claim, heartbeat, crash, sweep, cancel,
expire, finish and shutdown against the real SQL of worker/store.py never break the invariants."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar
from uuid import UUID

import hypothesis.strategies as st
import pytest
from databases import Database
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule
from redis.asyncio import Redis

from tests import engine
from tests.engine import beat
from tests.test_store import new_job
from worker import TERMINAL, Config, Error, Progress, store, sweep
from worker.events import Notifier

T = TypeVar("T")
pytestmark = pytest.mark.slow


class Lifecycle(RuleBasedStateMachine):
    """Workers are modelled as holders of (job, attempt): what a worker believes it is running."""

    config: Config
    jobs = Bundle("jobs")
    holders = Bundle("holders")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.db = Database(self.config.database_url, min_size=1, max_size=2)
        self.run(self.db.connect())
        self.redis = Redis.from_url(self.config.redis_url)
        self.jobs = store.Jobs(self.db, Notifier(self.redis))
        self.run(self.db.execute("TRUNCATE jobs CASCADE"))
        self.first_terminal: dict[UUID, str] = {}
        self.last_attempt: dict[UUID, int] = {}
        self.held: dict[tuple[UUID, int], int] = {}  # live holders of each (job, attempt)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.jobs.notifier.flush())
        self.run(self.redis.aclose())
        self.run(self.db.disconnect())
        self.loop.close()

    @initialize(target=jobs)
    def first_job(self) -> UUID:
        return self.submit(retry_safe=True, max_attempts=2)

    @rule(target=jobs, retry_safe=st.booleans(), max_attempts=st.integers(1, 3))
    def submit(self, retry_safe: bool, max_attempts: int) -> UUID:
        return self.run(new_job(self.db, retry_safe=retry_safe, max_attempts=max_attempts))

    def attempt_of(self, job_id: UUID) -> int:
        return int(self.run(self.db.fetch_val("SELECT attempt FROM jobs WHERE id = :id", {"id": job_id})))

    @rule(target=holders, job_id=jobs, stale=st.booleans())
    def claim(self, job_id: UUID, stale: bool) -> tuple[UUID, int]:
        expected = self.attempt_of(job_id) - (1 if stale else 0)  # a stale message is a duplicate delivery
        claimed = self.run(engine.claim_one(self.jobs, job_id, expected, owner="w", lease_s=30))
        if claimed is None:
            return (job_id, -1)  # nothing started: a holder of nothing
        key = (job_id, claimed.attempt)
        assert key not in self.held, "two workers were handed the same attempt"
        self.held[key] = 1
        return key

    @rule(holder=holders, fraction=st.floats(0, 1))
    def heartbeat(self, holder: tuple[UUID, int], fraction: float) -> None:
        verdict = self.run(beat(self.jobs, *holder, lease_s=30, progress=Progress(fraction)))
        if verdict != "superseded":
            assert self.held.get(holder), "a heartbeat succeeded for an attempt nobody holds"

    @rule(holder=consumes(holders))
    def crash(self, holder: tuple[UUID, int]) -> None:
        """The worker dies; time passes beyond its lease."""
        self.held.pop(holder, None)
        self.run(
            self.db.execute(
                "UPDATE jobs SET lease_expires_at = now() - interval '1 second'"
                " WHERE id = :id AND attempt = :attempt AND status = 'running'",
                {"id": holder[0], "attempt": holder[1]},
            )
        )

    @rule()
    def sweep(self) -> None:
        self.run(sweep.rescue_lost(self.jobs, batch=100, backoff_base_s=0, backoff_cap_s=0))
        self.run(sweep.expire_late(self.jobs, batch=100))
        self.run(sweep.take_due(self.db, batch=100, redispatch_after_s=0))

    @rule(job_id=jobs)
    def cancel(self, job_id: UUID) -> None:
        self.run(store.request_cancel(self.jobs, "default", job_id))

    @rule(job_id=jobs)
    def expire(self, job_id: UUID) -> None:
        self.run(self.db.execute("UPDATE jobs SET expires_at = now() WHERE id = :id", {"id": job_id}))
        self.run(sweep.expire_late(self.jobs, batch=100))

    @rule(holder=consumes(holders), to=st.sampled_from(["succeeded", "failed", "queued", "cancelled"]))
    def finish(self, holder: tuple[UUID, int], to: Any) -> None:
        moved = self.run(store.finish(self.jobs, *holder, to, result=b"1", error=Error("e", "m", True)))
        assert not moved or self.held.get(holder), "a finish landed for an attempt nobody holds"
        self.held.pop(holder, None)

    @rule(holder=consumes(holders))
    def shutdown(self, holder: tuple[UUID, int]) -> None:
        self.run(store.interrupt(self.jobs, *holder))
        self.held.pop(holder, None)

    @invariant()
    def invariants_hold(self) -> None:
        rows = self.run(
            self.db.fetch_all(
                "SELECT id, status, attempt, interrupted, finished_at, lease_expires_at, event_seq,"
                " (SELECT count(*) FROM job_events e WHERE e.job_id = jobs.id) AS events,"
                " (SELECT max(seq) FROM job_events e WHERE e.job_id = jobs.id) AS last_seq FROM jobs"
            )
        )
        for row in rows:
            job_id, status = row["id"], row["status"]
            if job_id in self.first_terminal:  # terminal is absorbing
                assert status == self.first_terminal[job_id], f"{job_id} left {self.first_terminal[job_id]}"
            elif status in TERMINAL:
                self.first_terminal[job_id] = status
            assert row["attempt"] >= self.last_attempt.get(job_id, 0), "attempt decreased"
            self.last_attempt[job_id] = row["attempt"]
            assert (status in TERMINAL) == (row["finished_at"] is not None), "done <=> terminal"
            assert (status == "running") == (row["lease_expires_at"] is not None), "a lease outside running"
            live = [a for (j, a), n in self.held.items() if j == job_id and n and a == row["attempt"]]
            assert status != "running" or len(live) <= 1, "more than one live lease"
            assert row["events"] == row["event_seq"] == row["last_seq"], "event log has a gap or a duplicate"


def test_job_lifecycle_invariants_hold_under_any_interleaving(config: Config) -> None:
    Lifecycle.config = config
    runner = Lifecycle.TestCase()
    runner.settings = settings(
        max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
    )
    runner.runTest()
