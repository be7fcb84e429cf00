"""The worker's poll, woken by the doorbell: arq polls its queue every `poll_delay` whatever happens (about five Redis
commands a poll, a hundred a second per idle worker at 0.05 s); Outlast's worker polls when there may be something
to take.

    listening(config, name)  a Wake for this worker process: one subscription to the doorbell's channel
    Wake                     what the poll waits on; `subscribed` while the subscription is up

Every script that rings the doorbell (worker/queue.py: `enqueue_many`, and so `ring_again`; `request_abort_many`)
publishes on `queue.channel` in the same round trip. A busy worker polls exactly as arq does, one poll every
`OUTLAST_WORKER_POLL_DELAY_S`: arq's own loop, untouched. An idle one, after a poll that leaves it a free slot, waits
until the first of:

- a message on the channel (a submit, a retry, the sweep's dispatch, an abort), or the subscription's (re)connect:
  whatever rang while it was not listening is found by the poll that follows;
- the next delayed message's due time (the lowest score in the queue after now, read once per idle poll);
- while it holds jobs, `REAP_S` (arq forgets a finished job only in its poll, and a graceful stop waits for that);
- its health key's refresh (`OUTLAST_WORKER_HEALTH_CHECK_INTERVAL_S`): arq writes it from its poll, and `arq --check`
  fails once it is older than the interval + 1 s. That refresh is also the fallback for a message lost while the
  subscription was down and not yet known to be.

arq's loop (`Worker.main`) is `async for _ in poll(poll_delay): await self._poll_iteration()`, and no argument of its
Worker reaches that wait: so `install` wraps `Worker._poll_iteration`, and the wrapper waits before arq's own poll,
only for a worker whose ctx holds a Wake (any other Worker in the process, the tests' burst workers or a bare arq,
polls as arq does). arq's pause after it still runs, so under load polls come no closer together than today. What
the wrapper reads of arq's Worker (`ctx`, `burst`, `job_counter`, `max_jobs`, `pool`, `queue_name`,
`health_check_interval`, `_last_health_check`, `tasks`, `queue_read_limit`, and `start_jobs`, wrapped to see how
many ids the poll read) is pinned by tests/test_wake.py against the installed arq. A poll whose read filled its limit
may have left more behind, so the next one does not wait for a ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from arq.worker import Worker
from redis.asyncio import Redis

from worker import retry
from worker.config import Config
from worker.connections import REDIS_DOWN, REDIS_UNREACHABLE, tls
from worker.queue import channel

log = logging.getLogger("outlast.wake")

CTX_KEY: Final = "wake"  # where the Wake is in arq's ctx
IDLE_S: Final = 30.0  # the subscription PINGs Redis when it heard nothing for this long (a half-open connection)
HEALTH_MARGIN_S: Final = 0.01  # past the health key's refresh time, so arq's `now - last >= interval` holds
# While it holds jobs, a poll at least this often: arq forgets a finished job's task only in its poll, and a SIGTERM's
# graceful stop waits until it has forgotten them all (else it waits out OUTLAST_SHUTDOWN_GRACE_S and is killed).
REAP_S: Final = 1.0


class Wake:
    def __init__(self, channel: str, *, outage_s: float = 60.0) -> None:
        self.channel = channel
        self.subscribed = False
        self.free_slot = False  # after the last poll: the next one may wait for a ring
        self.backlog = True  # the last poll's read of the queue filled its limit: more may be waiting, unrung
        self.outage_s = outage_s  # OUTLAST_REDIS_OUTAGE_S: how long a poll that can't reach Redis is tried again
        self.down_since: float | None = None  # the first poll of an outage that failed, by the monotonic clock
        self._polls_failed = 0
        self._rung = asyncio.Event()

    async def unreachable(self, exc: BaseException) -> None:
        """A poll could not reach Redis: wait a little and let the next one try, until the outage has lasted
        `outage_s`, then raise (the worker exits non-zero, and its supervisor restarts it). A dropped connection's
        commands are retried by the client itself; this covers the connection that can't be opened at all
        (refused while Redis restarts), which the client raises at once."""
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.warning("wake: a poll could not reach Redis (%s); trying again for %.0f s", exc, self.outage_s)
        if now - self.down_since >= self.outage_s:
            raise exc
        self._polls_failed += 1
        self.free_slot = False  # the next poll goes to Redis at once
        await asyncio.sleep(retry.reconnect(self._polls_failed))

    def reached(self) -> None:
        if self.down_since is not None:
            log.warning("wake: Redis answers again after %.1f s", time.monotonic() - self.down_since)
        self.down_since, self._polls_failed = None, 0

    def ring(self) -> None:
        self._rung.set()

    def clear(self) -> None:
        self._rung.clear()

    async def idle(self, worker: Worker) -> None:
        """Until the doorbell rings, the next delayed message is due, or arq's health key wants its refresh,
        whichever comes first. Rung already (a busy worker's rings come faster than its polls): no look at the queue,
        so that the busy path sends what arq's does."""
        if self._rung.is_set():
            return
        until = worker._last_health_check + worker.health_check_interval + HEALTH_MARGIN_S
        if worker.tasks:
            until = min(until, time.time() + REAP_S)
        due = await worker.pool.zrangebyscore(
            worker.queue_name, f"({int(time.time() * 1000)}", math.inf, start=0, num=1, withscores=True
        )
        if due:
            until = min(until, due[0][1] / 1000)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(until - time.time()):
                await self._rung.wait()

    async def listen(self, redis: Redis) -> None:
        failures = 0
        while True:
            pubsub = redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=IDLE_S)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":  # Redis subscribed us: from here on no ring is missed
                        self.subscribed, failures = True, 0
                    self.ring()
            except REDIS_DOWN as exc:
                failures += 1
                if failures == 1:
                    log.warning("wake: doorbell subscription lost (%s); idle polls fall back to the health check", exc)
            finally:
                self.subscribed = False
                with contextlib.suppress(*REDIS_DOWN):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(0.1 + retry.reconnect(failures))


arq_poll_iteration: Final[Callable[[Worker], Awaitable[None]]] = Worker._poll_iteration


async def poll_iteration(self: Worker) -> None:
    """For a worker with a Wake whose last poll left it a free slot, the idle wait first; then arq's poll. A full
    worker polls at arq's pace, so that a slot freeing finds a backlog as soon as it would today. The wait comes
    before the read, so a ring is answered at once; arq's pause after it still holds polls to one per `poll_delay`
    under load, when each wait returns at once. The ring is cleared before the read: one that comes during it ends
    the next wait at once."""
    wake = self.ctx.get(CTX_KEY)
    if not isinstance(wake, Wake):
        await arq_poll_iteration(self)
        return
    try:
        if wake.free_slot:
            await wake.idle(self)
        wake.clear()
        wake.backlog = True  # until start_jobs says what the read found (a full worker's poll reads nothing)
        await arq_poll_iteration(self)
    except REDIS_UNREACHABLE as exc:
        await wake.unreachable(exc)
        return
    wake.reached()
    # Only a read that came back short emptied the queue of what is due: a backlog that rang once (a batch longer than
    # one read, or a queue left while no worker ran) rings no more, so waiting for a ring would drain it at one read
    # per REAP_S or per health check (a preloaded drain measured 117 jobs/s instead of 1,080).
    wake.free_slot = not self.burst and self.job_counter < self.max_jobs and not wake.backlog


arq_start_jobs: Final[Callable[[Worker, list[bytes]], Awaitable[None]]] = Worker.start_jobs


async def start_jobs(self: Worker, job_ids: list[bytes]) -> None:
    """arq's, after noting whether its poll's read filled `queue_read_limit` (the ids it asked the queue for)."""
    wake = self.ctx.get(CTX_KEY)
    if isinstance(wake, Wake):
        wake.backlog = len(job_ids) >= self.queue_read_limit
    await arq_start_jobs(self, job_ids)


def install() -> None:
    Worker._poll_iteration = poll_iteration  # type: ignore[method-assign]
    Worker.start_jobs = start_jobs  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def listening(config: Config, name: str) -> AsyncIterator[Wake]:
    """A Wake subscribed on its own connection (named `outlast-wake:<name>` in CLIENT LIST) until the block ends."""
    install()
    redis = Redis.from_url(
        config.redis_url,
        socket_connect_timeout=config.redis_timeout_s,
        health_check_interval=int(IDLE_S),
        client_name=f"outlast-wake:{name}",
        **tls(config),
    )
    wake = Wake(channel(redis), outage_s=config.redis_outage_s)
    task = asyncio.create_task(wake.listen(redis))
    try:
        yield wake
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await redis.aclose(close_connection_pool=True)
