"""Following a job's event log in the web: one Redis subscription per process, fanned out to every stream and long
poll that follows a job (worker/events.py writes the log and rings the doorbell).

    Hub       one Redis subscription per web process, fanned out to its Feeds (one per followed job)
    Feed      one followed job: its followers, and the events one shared read fetched for them all
    Follower  one stream or long poll: woken by the Feed, reading through the Feed's shared cache
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator, Mapping
from typing import Any, Final, TypeVar
from uuid import UUID

from databases import Database
from redis.asyncio import Redis

from worker import database, retry
from worker.connections import REDIS_DOWN
from worker.events import EVERY_JOB, JOB_LOG, READ_BATCH, Event, Source, channel

log = logging.getLogger("outlast.events")
T = TypeVar("T")

FEED_CACHE: Final = 1_000  # events a Feed keeps for followers that are a little behind
SUBSCRIBER_IDLE_S: Final = 10.0  # the subscription PINGs Redis when it heard nothing for this long


class Feed:
    """One job followed in this process: its followers, and the events one shared read fetched for them all.

    A notification starts one read of what is new (however many follow the job, and a second one if another
    notification comes during it), then wakes every follower once; each takes its events from the cache. The
    cache starts where the first follower's own read ended; a follower it does not reach reads the log itself.
    Until a follower has read, a notification wakes them all at once (long polls only ever need that).
    """

    def __init__(self, hub: Hub, job_id: UUID, source: Source = JOB_LOG) -> None:
        self.hub, self.job_id, self.source = hub, job_id, source  # a workflow's id, with WORKFLOW_LOG
        self.followers: set[Follower] = set()
        self.polled: int | None = -1  # the job's last seq at the last fallback poll; None: the job is gone
        self._high: int | None = None  # every event up to this seq has been read; the cache ends with it
        self._cache: list[Event] = []  # contiguous, ending at _high
        self._reading: asyncio.Task[None] | None = None
        self._again = False  # a notification came during the read: read once more
        self._missed = False  # a notification came before anyone knew where to read from

    def poke(self) -> None:
        if self._high is None:
            self._missed = True
            self._wake_all()
        elif self._reading is None:
            self._reading = self.hub.spawn(self._read())
        else:
            self._again = True

    def seen(self, seq: int) -> None:
        """A follower's own read ended at `seq`: the first such tells the shared reads where to start."""
        if self._high is None:
            self._high = seq
            if self._missed:  # its own read may have started before what that notification announced
                self._missed = False
                self.poke()

    def after(self, seq: int) -> list[Event] | None:
        """The events after `seq` that the shared reads found; None: the cache does not reach back to `seq`."""
        if self._high is None:
            return None
        if seq >= self._high:
            return []
        first = self._cache[0].seq if self._cache else self._high + 1
        if seq + 1 < first:
            return None
        return self._cache[seq + 1 - first :]

    def _wake_all(self) -> None:
        for follower in self.followers:
            follower.wake.set()

    async def _read(self) -> None:
        try:
            again = True
            while again and self._high is not None:
                self._again = False
                batch = await self.source.read_after(self.hub.db, self.job_id, self._high)
                self._cache.extend(batch)
                if batch:
                    self._high = batch[-1].seq
                again = self._again or len(batch) == READ_BATCH
            if len(self._cache) > 2 * FEED_CACHE:
                del self._cache[:-FEED_CACHE]
        except database.UNAVAILABLE as exc:
            log.warning("events: reading the log of %s failed (%s); its followers read it themselves", self.job_id, exc)
            self._high, self._cache = None, []
        finally:
            self._reading = None
            self._wake_all()


class Follower:
    """One stream or long poll following a job: `wake` is set whenever there may be something new."""

    __slots__ = ("expired", "feed", "stopped", "ticked", "wake")

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.wake = asyncio.Event()
        self.stopped = False  # by stop(): the server is shutting down
        self.expired = False  # events() reached its `until`
        self.ticked = False  # another `idle_every` has passed

    def stop(self) -> None:
        """End `events()` and `wait()` now (the server is shutting down)."""
        self.stopped = True
        self.wake.set()

    def clear(self) -> None:
        """Call before reading what a wake announces, so one that comes during the read is not lost."""
        self.wake.clear()

    async def wait(self, until: float) -> bool:
        """Until the next notification (True), or loop time `until` or stop() (False)."""
        if self.stopped:
            return False
        try:
            async with asyncio.timeout_at(until):
                await self.wake.wait()
        except TimeoutError:
            return False
        return not self.stopped

    def _expire(self) -> None:
        self.expired = True
        self.wake.set()

    def _tick(self) -> None:
        self.ticked = True
        self.wake.set()

    async def events(self, after: int, *, until: float, tick_s: float) -> AsyncGenerator[Event | None, None]:
        """Every event after seq `after`, in order and each once, as they are committed, and None every `tick_s`
        (a stream's keep-alive, sent by its own loop rather than a task of its own); ends after the terminal
        status event, at loop time `until`, or on stop()."""
        loop = asyncio.get_running_loop()
        deadline = loop.call_at(until, self._expire)  # one timer for the lifetime, not one per wait
        tick = loop.call_later(tick_s, self._tick)
        try:
            seq, own_read = after, True  # the first read is our own: it covers what came before we registered
            while not (self.stopped or self.expired):
                if self.ticked:
                    self.ticked = False
                    tick = loop.call_later(tick_s, self._tick)
                    yield None
                self.clear()
                batch = None if own_read else self.feed.after(seq)
                if batch is None:
                    batch = await self.feed.source.read_after(self.feed.hub.db, self.feed.job_id, seq)
                    own_read = len(batch) == READ_BATCH
                    self.feed.seen(batch[-1].seq if batch else seq)
                for event in batch:
                    yield event
                    seq = event.seq
                    if event.final:
                        return
                if not batch:
                    await self.wake.wait()
        finally:
            deadline.cancel()
            tick.cancel()


class Hub:
    """One Redis subscription per web process, fanned out to every stream and long poll in it; and the fallback:
    each (re)subscription, and every `poll_s`, compares each followed job's last seq with the log's."""

    def __init__(
        self, db: Database, redis_url: str, *, poll_s: float, timeout_s: float, tls: Mapping[str, Any] | None = None
    ) -> None:
        self.db = db
        self.subscribed = False
        self._poll_s = poll_s
        self._redis: Redis = Redis.from_url(
            redis_url, socket_connect_timeout=timeout_s, health_check_interval=int(SUBSCRIBER_IDLE_S), **(tls or {})
        )
        self._feeds: dict[bytes, Feed] = {}  # by the id as published, so a notification needs no parsing
        # Called on every notification and poll, whatever it names: the tenant feeds (server/feed.py), which can't
        # tell a job's tenant from its id.
        self.listeners: set[Callable[[], None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def followed(self) -> int:
        return len(self._feeds)

    def following(self, job_id: UUID) -> int:
        """How many streams and long polls follow the job here."""
        feed = self._feeds.get(str(job_id).encode())
        return 0 if feed is None else len(feed.followers)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task the hub holds until it ends, and cancels on close."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("events: a background task failed", exc_info=exc)

    async def __aenter__(self) -> Hub:
        self.spawn(self._subscribe())
        self.spawn(self._poll())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis.aclose(close_connection_pool=True)

    @contextlib.contextmanager
    def follow(self, job_id: UUID, source: Source = JOB_LOG) -> Iterator[Follower]:
        """Register for the job's (or with WORKFLOW_LOG, the workflow's) notifications until the block ends (a
        disconnect included)."""
        key = str(job_id).encode()
        feed = self._feeds.get(key)
        if feed is None:
            feed = self._feeds[key] = Feed(self, job_id, source)
        follower = Follower(feed)
        feed.followers.add(follower)
        try:
            yield follower
        finally:
            feed.followers.discard(follower)
            if not feed.followers and self._feeds.get(key) is feed:
                del self._feeds[key]

    def _poke(self, payload: bytes) -> None:
        for listener in self.listeners:
            listener()
        for key in payload.split():  # a Notifier names many jobs in one message
            if key == EVERY_JOB:
                self._poke_all()
                return
            if (feed := self._feeds.get(key)) is not None:
                feed.poke()

    def _poke_all(self) -> None:
        for listener in self.listeners:
            listener()
        for feed in list(self._feeds.values()):
            feed.poke()

    async def _subscribe(self) -> None:
        failures = 0
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel(self._redis))
                self.subscribed, failures = True, 0
                self._poke_all()  # whatever was published while we were not listening
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=SUBSCRIBER_IDLE_S)
                    if message is not None:
                        self._poke(message["data"])
            except REDIS_DOWN as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "events: Redis subscription lost (%s); followers read the log every %ss", exc, self._poll_s
                    )
            finally:
                self.subscribed = False
                with contextlib.suppress(*REDIS_DOWN):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(0.1 + retry.reconnect(failures))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            for listener in self.listeners:
                listener()
            feeds = list(self._feeds.values())
            if not feeds:
                continue
            latest: dict[UUID, int] = {}
            try:
                for source in {feed.source for feed in feeds}:
                    latest |= await source.latest_seqs(self.db, [f.job_id for f in feeds if f.source == source])
            except database.UNAVAILABLE as exc:
                log.warning("events: fallback poll skipped: database unavailable (%s)", exc)
                continue
            for feed in feeds:
                seq = latest.get(feed.job_id)
                if seq != feed.polled:
                    feed.polled = seq
                    feed.poke()
