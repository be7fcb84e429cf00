"""PostgreSQL's NOTIFY, heard by each worker process: what wakes its webhook loop and its cron ticker, which otherwise
sleep until the earliest moment they know something is due.

    hearing(deps)         the process's Ear: one LISTEN connection, for every loop it is given to
    Ear.alarm(channel)    an Alarm that each notification on `channel` rings; `listening` while the connection is up
    Alarm                 a loop's sleep: until the moment it last learned, or sooner when rung

migrations/0026 notifies, at commit (so whoever hears it sees what it announces), whichever process committed:
WEBHOOKS when a delivery is inserted (a job or workflow ended with a callback_url, or a redeliver was asked for), and
SCHEDULES when a schedule's next run comes sooner (made, resumed, its cron changed; a tick's advance moves it later).

What is notified while the connection is down goes unheard, so each (re)connect and each loss rings every alarm,
and while it is down the loops poll as they did before it (`listening` False): the webhook loop every
OUTLAST_WEBHOOK_POLL_S, the ticker every OUTLAST_SWEEP_INTERVAL_S. The connection is checked every CHECK_S, and a
loop that is listening still looks every IDLE_S whatever it was told. Through a transaction pooler without
OUTLAST_DIRECT_DATABASE_URL a LISTEN hears nothing: then there is no connection, and the loops poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import asyncpg

from worker.database import UNAVAILABLE, session_url
from worker.deps import Deps

WEBHOOKS: Final = "outlast_webhooks"
SCHEDULES: Final = "outlast_schedules"
CHANNELS: Final = (WEBHOOKS, SCHEDULES)
LISTENER: Final = "outlast-worker-listener"  # its application_name in pg_stat_activity
CHECK_S: Final = 30.0  # a connection that died without a word is found within this
IDLE_S: Final = 60.0  # the longest a listening loop sleeps: a bound on anything it was never told
_RETRY_S: Final = 5.0
_LOST: tuple[type[BaseException], ...] = (*UNAVAILABLE, asyncpg.PostgresError)
log = logging.getLogger("outlast.notify")


class Alarm:
    """When a loop looks next (time.monotonic()): `looking` as it starts a look, `learned` what the look found due,
    and `ring` for anything sooner, whenever it comes. A ring during a look outlives what the look learned: the look's
    snapshot may have been taken before what rang was committed."""

    def __init__(self, *, heard_every_s: float = 0.0) -> None:
        self.at = -math.inf  # at once: a loop's first look
        self.heard_every_s = heard_every_s  # a notification rings this long after the last look at the soonest
        self._looked = -math.inf
        self._rung = asyncio.Event()

    def looking(self) -> None:
        self.at, self._looked = math.inf, time.monotonic()

    def learned(self, at: float) -> None:
        self.at = min(self.at, at)

    def ring(self, at: float = -math.inf) -> None:
        """Look at `at` (now, by default) unless the alarm is set sooner already."""
        if at < self.at:
            self.at = at
            self._rung.set()

    def heard(self) -> None:
        """A notification: look again, though not sooner than `heard_every_s` after the last look began."""
        self.ring(self._looked + self.heard_every_s)

    async def sleep(self, longest_s: float) -> None:
        """Until the alarm's moment, or `longest_s` from now if that comes first."""
        until = time.monotonic() + longest_s
        while True:
            self._rung.clear()  # before reading `at`: a ring from here on ends the wait below
            left = min(self.at, until) - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rung.wait(), left)


class Ear:
    """The alarms of a process's loops, rung by what its LISTEN connection hears."""

    def __init__(self) -> None:
        self.listening = False
        self.alarms: dict[str, list[Alarm]] = {}  # each channel's, one per loop

    def alarm(self, channel: str, *, heard_every_s: float = 0.0) -> Alarm:
        alarm = Alarm(heard_every_s=heard_every_s)
        self.alarms.setdefault(channel, []).append(alarm)
        return alarm

    def heard(self, channel: str) -> None:
        for alarm in self.alarms.get(channel, ()):
            alarm.heard()

    def _listening(self, now: bool) -> None:
        self.listening = now
        for alarms in self.alarms.values():  # what came meanwhile went unheard; and the loops' longest sleep changed
            for alarm in alarms:
                alarm.ring()

    async def listen(self, database_url: str, *, timeout_s: float) -> None:
        """Hold the LISTEN connection, reconnecting after a loss, until cancelled."""
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(
                    database_url, timeout=timeout_s, server_settings={"application_name": LISTENER}
                )
                connection.add_termination_listener(lambda _: self._listening(False))
                for channel in CHANNELS:
                    await connection.add_listener(channel, self._on_notify)
                self._listening(True)
                while True:
                    await asyncio.sleep(CHECK_S)
                    await connection.fetchval("SELECT 1", timeout=timeout_s)
            except _LOST as exc:
                log.warning("notify: not listening (%r); the webhook loop and the ticker poll until then", exc)
            finally:
                if self.listening:
                    self._listening(False)
                if connection is not None:
                    connection.terminate()  # no goodbye over a connection that may be dead
            await asyncio.sleep(_RETRY_S)

    def _on_notify(self, _connection: Any, _pid: int, channel: str, _payload: object) -> None:
        self.heard(channel)


@contextlib.asynccontextmanager
async def hearing(deps: Deps) -> AsyncIterator[Ear]:
    """The process's Ear, listening until the block ends: one connection for every loop given it (worker/options.py
    gives it to the webhook loop and the ticker)."""
    ear, url = Ear(), session_url(deps.config)
    task = None if url is None else asyncio.create_task(ear.listen(url, timeout_s=deps.config.db_timeout_s))
    try:
        yield ear
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
