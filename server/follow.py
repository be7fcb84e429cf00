"""Following a job's event log in the web: one Redis subscription per process, fanned out to every stream and long
poll that follows a job (worker/events.py writes the log and rings the doorbell).

    Hub       one Redis subscription per web process, fanned out to its Feeds (one per followed job), and their
              shared reads: the Feeds a notification names, read in one statement
    Feed      one followed job: its followers, and the events the shared reads fetched for them all
    Follower  one stream or long poll: woken by the Feed, reading through the Feed's shared cache
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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
READ_FEEDS: Final = 1_000  # Feeds one shared read covers at most (as many as a notification names)
SUBSCRIBER_IDLE_S: Final = 10.0  # the subscription PINGs Redis when it heard nothing for this long


class Feed:
    """One job followed in this process: its followers, and the events one shared read fetched for them all.

    A notification puts the Feed in the hub's next shared read of what is new (however many follow the job, and
    once more if another notification comes during it); that read wakes every follower once, and each takes its
    events from the cache. The cache starts where the first follower's own read ended; a follower it does not
    reach reads the log itself. Until a follower has read, a notification wakes them all at once (long polls only
    ever need that).
    """

    def __init__(self, hub: Hub, job_id: UUID, source: Source = JOB_LOG) -> None:
        self.hub, self.job_id, self.source = hub, job_id, source  # a workflow's id, with WORKFLOW_LOG
        self.followers: set[Follower] = set()
        self.polled: int | None = -1  # the job's last seq at the last fallback poll; None: the job is gone
        self.high: int | None = None  # every event up to this seq has been read; the cache ends with it
        self._cache: list[Event] = []  # contiguous, ending at high
        self._missed = False  # a notification came before anyone knew where to read from

    def poke(self) -> None:
        if self.high is None:
            self._missed = True
            self._wake_all()
        else:
            self.hub.read_soon(self)

    def seen(self, seq: int) -> None:
        """A follower's own read ended at `seq`: the first such tells the shared reads where to start."""
        if self.high is None:
            self.high = seq
            if self._missed:  # its own read may have started before what that notification announced
                self._missed = False
                self.poke()

    def after(self, seq: int) -> list[Event] | None:
        """The events after `seq` that the shared reads found; None: the cache does not reach back to `seq`."""
        if self.high is None:
            return None
        if seq >= self.high:
            return []
        first = self._cache[0].seq if self._cache else self.high + 1
        if seq + 1 < first:
            return None
        return self._cache[seq + 1 - first :]

    def _wake_all(self) -> None:
        for follower in self.followers:
            follower.wake.set()

    def took(self, batch: list[Event]) -> None:
        """A shared read found `batch` after `high`."""
        if batch:
            self._cache.extend(batch)
            self.high = batch[-1].seq
            if len(self._cache) > 2 * FEED_CACHE:
                del self._cache[:-FEED_CACHE]
        self._wake_all()

    def lost(self) -> None:
        """A shared read failed: until one of them has read again, the followers read the log themselves."""
        self.high, self._cache = None, []
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
        self._due: dict[Feed, None] = {}  # Feeds with news to read, in the order they were poked
        self._reading: asyncio.Task[None] | None = None

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

    def read_soon(self, feed: Feed) -> None:
        """Put the Feed in the next shared read (the one under way, if any, started before this news)."""
        self._due[feed] = None
        if self._reading is None:
            self._reading = self.spawn(self._read_due())

    async def _read_due(self) -> None:
        """The shared reads: the Feeds poked since the last, up to READ_FEEDS at once, in a statement per source (a
        notification names up to 1,000 jobs; with a thousand running jobs followed, a statement per job was a fifth
        of the web's CPU, and queued for the pool's connections). A Feed poked during a read, or whose read filled
        READ_BATCH, is in the next."""
        taken: list[Feed] = []
        try:
            while self._due:
                taken = list(itertools.islice(self._due, READ_FEEDS))
                for feed in taken:
                    del self._due[feed]
                for source in {feed.source for feed in taken}:
                    wanted = {f: f.high for f in taken if f.source is source and f.high is not None}
                    try:
                        found = await source.read_many(self.db, [(f.job_id, high) for f, high in wanted.items()])
                    except database.UNAVAILABLE as exc:
                        log.warning("events: reading %d logs failed (%s); their followers read them", len(wanted), exc)
                        for feed in wanted:
                            feed.lost()
                        continue
                    for feed in wanted:
                        batch = found.get(feed.job_id, [])
                        feed.took(batch)
                        if len(batch) == READ_BATCH:
                            self._due[feed] = None
                taken = []
        finally:
            self._reading = None
            for feed in taken:  # cancelled or failed mid-read: nobody must wait on a read that never ends
                feed.lost()

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
                    # What the shared reads have already read is no news: a running job reporting every second
                    # would otherwise cost each poll a read per followed job.
                    if seq is None or feed.high is None or seq > feed.high:
                        feed.poke()
