"""Following jobs from the stores, as an operator's command does (`outlast jobs wait|watch`).

The event log in PostgreSQL is the truth (worker/events.py); the doorbell the engine rings on Redis after each
commit only wakes the reader at once, and a read every POLL_S is the floor when a ring is missed or Redis is down.
So a wait never gives up: it rides out a Redis or database outage and carries on where it was, however long the
job takes. One reader needs none of the web's fan-out (server/follow.py): this is that loop, for one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final
from uuid import UUID

from databases import Database
from redis.asyncio import Redis

from worker import database, events, retry
from worker.connections import REDIS_DOWN

POLL_S: Final = 1.0  # one reader: a read a second costs the database nothing
IDLE_S: Final = 10.0  # the subscription checks on Redis when it heard nothing for this long


class Doorbell:
    """Rings when one of the jobs named (None: any job) may have changed."""

    def __init__(
        self, redis_url: str, job_ids: set[UUID] | None, *, timeout_s: float, tls: Mapping[str, Any] | None = None
    ) -> None:
        self._redis = Redis.from_url(
            redis_url, socket_connect_timeout=timeout_s, health_check_interval=int(IDLE_S), **(tls or {})
        )
        self._wanted = None if job_ids is None else {str(i).encode() for i in job_ids}
        self._rang = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Doorbell:
        self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        await self._redis.aclose(close_connection_pool=True)

    def clear(self) -> None:
        """Call before reading, so a ring that comes during the read is not lost."""
        self._rang.clear()

    async def wait(self, timeout_s: float = POLL_S) -> bool:
        """Until a ring (True) or `timeout_s` (False)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._rang.wait()
        except TimeoutError:
            return False
        return True

    def _heard(self, payload: bytes) -> None:
        names = set(payload.split())
        if self._wanted is None or events.EVERY_JOB in names or names & self._wanted:
            self._rang.set()

    async def _listen(self) -> None:
        failures = 0
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(events.channel(self._redis))
                failures = 0
                self._rang.set()  # whatever rang while we were not listening
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=IDLE_S)
                    if message is not None:
                        self._heard(message["data"])
            except REDIS_DOWN:
                failures += 1  # the poll carries on meanwhile
            finally:
                with contextlib.suppress(*REDIS_DOWN):
                    await pubsub.aclose()
            await asyncio.sleep(0.1 + retry.reconnect(failures))


class JobGone(Exception):
    """The job was deleted while it was followed (only a person deleting rows does that to a live job)."""


async def follow(db: Database, bell: Doorbell, job_id: UUID, *, after: int = 0) -> AsyncIterator[events.Event]:
    """Every event of the job after seq `after`, in order and each once, up to its terminal status event."""
    seq, outage = after, 0
    while True:
        bell.clear()
        try:
            batch = await events.read_after(db, job_id, seq)
        except database.UNAVAILABLE as exc:
            outage += 1
            if outage == 1:
                print(f"the database is unreachable ({exc}); still following {job_id}", file=sys.stderr)
            await asyncio.sleep(retry.reconnect(outage))
            continue
        outage = 0
        for event in batch:
            yield event
            seq = event.seq
            if event.final:
                return
        if len(batch) == events.READ_BATCH:
            continue
        if not await bell.wait() and not batch and job_id not in await _existing(db, job_id):
            raise JobGone(str(job_id))


async def _existing(db: Database, job_id: UUID) -> set[UUID]:
    try:
        return set(await events.latest_seqs(db, [job_id]))
    except database.UNAVAILABLE:
        return {job_id}  # unknown: the next read says more
