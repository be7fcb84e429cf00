"""GET /v1/events: the tenant's job changes as Server-Sent Events, resumable with Last-Event-ID; it never ends by
itself (worker/feed.py reads the log, migrations/0023 writes it).

Each event is `id: <cursor>`, `event: job` and the Job without input and result, as it is when read; `type=` and
`status=` filter them; `follow=false` ends the stream once it has caught up (a script's catch-up read). An `id:`
line alone moves the client's Last-Event-ID past changes the filters hid, and comes first, so a client that
reconnects before any event resumes where it began. Keep-alives, the slot per key, the maximum lifetime and the
shutdown's `reconnect` event are the job stream's (server/stream.py).

    Feeds       one per web process: a TenantFeed per tenant someone follows, woken by every notification (the Hub)
    TenantFeed  one read at a time of what is new, shared by all the tenant's streams through a cache
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Final, NamedTuple, cast
from uuid import UUID

import anyio
import msgspec
from databases import Database
from starlette.requests import Request
from starlette.responses import Response

from server.auth import caller_of
from server.follow import Hub
from server.jobs import decode_query
from server.limits import StreamSlot
from server.metrics import Metrics
from server.problems import FieldError, ValidationError
from server.state import web_of
from server.stream import (
    KEEP_ALIVE,
    SEND_TIMEOUT_S,
    SHUTDOWN_GRACE_S,
    EventStream,
    Shutdown,
    holding,
    reconnect,
)
from worker import Config, Status, database, feed
from worker.feed import Change, Cursor, FeedJob, as_job
from worker.job import TERMINAL, Progress

log = logging.getLogger("outlast.web")
FEED_CACHE: Final = 2_000  # changes a TenantFeed keeps for the streams a little behind
# At most one shared read per tenant this often: a busy queue's changes come in batches, each job once per read
# however often it changed, and each read wakes every stream of the tenant (bench/dashboard_feed.py, 50 streams
# under the noop load: 0.1 s gave 1.2-1.9x the web's CPU in ad hoc runs, 0.25 s 1.27x, 0.5 s 1.21x: past 0.25 s a
# longer gap buys little and delays every list).
READ_GAP_S: Final = 0.25
# The dashboard's stream (GET /ui/events) wakes at most this often, with each job once at its latest state: a list
# row and a count need nothing in between, and each wake of a stream is Python of its own (the overview reloads its
# counts at most every 2 s anyway). A tenant only dashboards follow is read this often too.
DASHBOARD_GAP_S: Final = 1.0
PAGE_ROWS: Final = 100  # ids a page's stream follows at most (the jobs list shows 50)
_encode = msgspec.json.Encoder().encode


class FeedQuery(msgspec.Struct, frozen=True, kw_only=True):
    type: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | msgspec.UnsetType = msgspec.UNSET
    status: Status | msgspec.UnsetType = msgspec.UNSET
    follow: bool = True  # false: the changes after Last-Event-ID up to now, then the stream ends


class PageQuery(FeedQuery, frozen=True, kw_only=True):
    """GET /ui/events' own: with `rows`, a page's stream (`built`). A page lists at most PAGE_ROWS jobs."""

    rows: Annotated[str, msgspec.Meta(max_length=PAGE_ROWS * 37)] | msgspec.UnsetType = msgspec.UNSET

    def row_ids(self) -> frozenset[UUID]:
        if self.rows is msgspec.UNSET:
            return frozenset()
        try:
            ids = frozenset(UUID(part) for part in self.rows.split(",") if part)
        except ValueError:
            ids = None
        if ids is None or len(ids) > PAGE_ROWS:
            msg = f"rows must be at most {PAGE_ROWS} job ids, separated by commas"
            raise ValidationError(msg, [FieldError("rows", msg)])
        return ids


class Others(msgspec.Struct, frozen=True):
    """A page's `others` event: how many other jobs changed, and the ids of those that match the filters."""

    changed: int
    ids: list[UUID]


class RowJob(msgspec.Struct, frozen=True, kw_only=True):
    """A `job` event's data on the dashboard's stream: what a list row and a count show of the job."""

    id: UUID
    type: str
    status: Status
    done: bool
    progress: Progress
    attempt: int
    max_attempts: int


class Chunk(NamedTuple):
    """What one wake of a stream sends: its frames as one chunk (b"" for none), the last frame's id, and where
    the stream reads on from."""

    data: bytes
    last: Cursor | None
    high: Cursor


class TenantFeed:
    """One tenant followed in this process: what one shared read after another found, for all its streams."""

    def __init__(self, db: Database, hub: Hub, tenant: str, start: Cursor) -> None:
        self.db, self.hub, self.tenant = db, hub, tenant
        self.followers: set[FeedFollower] = set()
        self.base = self.high = start  # the cache holds every change after `base` up to `high`
        self._cache: list[Change] = []
        self._cursors: list[Cursor] = []
        # Since the last read, the chunk each (place, filter, latest) asked for: the streams a read woke together
        # are at one place, so one of them builds and encodes the chunk and the others send the same bytes.
        self._chunks: dict[tuple[Cursor, FeedQuery, bool], Chunk] = {}
        self._reading: asyncio.Task[None] | None = None
        self._again = False
        self._paced_at = -DASHBOARD_GAP_S  # when the dashboards' streams were last woken
        self._pacer: asyncio.TimerHandle | None = None

    def poke(self) -> None:
        if self._reading is None:
            self._reading = self.hub.spawn(self._read())
        else:
            self._again = True

    def chunk(self, cursor: Cursor, query: FeedQuery, *, latest: bool) -> Chunk | None:
        """What a stream at `cursor` is sent now (`latest`: each job once, at its latest state); None: the cache
        does not reach back that far."""
        if cursor < self.base:
            return None
        key = (cursor, query, latest)
        found = self._chunks.get(key)
        if found is None:
            changes = self._cache[bisect.bisect_right(self._cursors, cursor) :]
            found = self._chunks[key] = built(changes, query, max(cursor, self.high), latest=latest)
        return found

    def close(self) -> None:
        if self._pacer is not None:
            self._pacer.cancel()
            self._pacer = None

    async def _read(self) -> None:
        try:
            again = True
            while again and self.followers:
                self._again = False
                batch = await feed.read_after(self.db, self.tenant, self.high)
                self._cache.extend(batch.changes)
                self._cursors.extend(c.cursor for c in batch.changes)
                self.high = batch.high
                self._chunks.clear()
                if len(self._cache) > 2 * FEED_CACHE:
                    self.base = self._cursors[-FEED_CACHE - 1]
                    del self._cache[:-FEED_CACHE], self._cursors[:-FEED_CACHE]
                self._wake_all()
                again = self._again or batch.full
                if again and not batch.full:  # a full read: more is there already
                    await asyncio.sleep(self._gap())
        except database.UNAVAILABLE as exc:
            log.warning(
                "events: reading the feed of %s failed (%s); the next notification reads again", self.tenant, exc
            )
        finally:
            self._reading = None

    def _gap(self) -> float:
        return DASHBOARD_GAP_S if all(f.paced for f in self.followers) else READ_GAP_S

    def _wake_all(self) -> None:
        paced = False
        for follower in self.followers:
            if follower.paced:
                paced = True
            else:
                follower.wake.set()
        if paced and self._pacer is None:
            loop = asyncio.get_running_loop()
            self._pacer = loop.call_at(max(loop.time(), self._paced_at + DASHBOARD_GAP_S), self._wake_paced)

    def _wake_paced(self) -> None:
        self._pacer = None
        self._paced_at = asyncio.get_running_loop().time()
        for follower in self.followers:
            if follower.paced:
                follower.wake.set()


class FeedFollower:
    __slots__ = ("paced", "stopped", "wake")

    def __init__(self, *, paced: bool) -> None:
        self.wake = asyncio.Event()
        self.paced = paced  # woken at most every DASHBOARD_GAP_S
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()


class Feeds:
    """The tenant feeds of this web process, each woken by every notification the Hub hears."""

    def __init__(self, db: Database, hub: Hub) -> None:
        self.db, self.hub = db, hub
        self._feeds: dict[str, TenantFeed] = {}
        hub.listeners.add(self._poke)

    def _poke(self) -> None:
        for tenant_feed in self._feeds.values():
            tenant_feed.poke()

    @contextlib.asynccontextmanager
    async def follow(self, tenant: str, *, paced: bool) -> AsyncIterator[tuple[TenantFeed, FeedFollower]]:
        tenant_feed = self._feeds.get(tenant)
        if tenant_feed is None:
            start = await feed.boundary(self.db)
            tenant_feed = self._feeds.setdefault(tenant, TenantFeed(self.db, self.hub, tenant, start))
        follower = FeedFollower(paced=paced)
        tenant_feed.followers.add(follower)
        try:
            yield tenant_feed, follower
        finally:
            tenant_feed.followers.discard(follower)
            if not tenant_feed.followers and self._feeds.get(tenant) is tenant_feed:
                del self._feeds[tenant]
                tenant_feed.close()


def last_event_id(request: Request) -> Cursor | None:
    raw = request.headers.get("last-event-id")
    if raw is None:
        return None
    cursor = Cursor.parse(raw.strip())
    if cursor is None:
        msg = "Last-Event-ID must be the id of an event of this stream"
        raise ValidationError(msg, [FieldError("Last-Event-ID", msg)])
    return cursor


def query_of(request: Request, kind: type[FeedQuery] = FeedQuery) -> FeedQuery:
    params = request.query_params
    for name in params:
        if len(params.getlist(name)) > 1:
            msg = f"{name} may be given once"
            raise ValidationError(msg, [FieldError(name, msg)])
    return decode_query(params, kind)


def frame(change: Change) -> bytes:
    return _job_event(change.cursor, as_job(change.job))


def row_frame(change: Change) -> bytes:
    job = change.job
    row = RowJob(
        id=job.id,
        type=job.type,
        status=job.status,
        done=job.status in TERMINAL,
        progress=job.progress,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
    )
    return _job_event(change.cursor, row)


def _job_event(cursor: Cursor, data: FeedJob | RowJob) -> bytes:
    return b"id: %b\nevent: job\ndata: %b\n\n" % (str(cursor).encode(), _encode(data))


def built(changes: list[Change], query: FeedQuery, high: Cursor, *, latest: bool) -> Chunk:
    """`changes` as a stream with `query` is sent them, up to `high`. `latest`: each job once, where it changed
    last, as the dashboard's row: every change after the cursor is the same job read again (a job's state is
    whatever the newest read found), so the last one is all a row needs, and a job that ended ends in it."""
    if latest:
        newest: dict[UUID, Change] = {}
        for change in changes:
            newest.pop(change.job.id, None)  # in the order of each job's last change, so ids still only grow
            newest[change.job.id] = change
        changes = list(newest.values())
    if isinstance(query, PageQuery) and query.rows is not msgspec.UNSET:
        return _page(changes, query, high)
    if query.type is not msgspec.UNSET or query.status is not msgspec.UNSET:
        changes = [c for c in changes if _wanted(c, query)]
    if not changes:
        return Chunk(b"", None, high)
    encode = row_frame if latest else frame
    return Chunk(b"".join(encode(c) for c in changes), changes[-1].cursor, high)


def _page(changes: list[Change], query: PageQuery, high: Cursor) -> Chunk:
    """A page's stream: a `job` event for each of its rows that changed, whatever the filters (a row that leaves
    them still shows its new state), then one `others` event for the rest, naming those the filters match (a list
    counts the ones created after it was read). A busy queue's empty list gets about 75 bytes a job where every
    job's row came to about 360, and every tab of one page the same chunk (a tab's own state, such as when it was
    read, would cost a chunk per tab: bench/dashboard_feed.py measured 1.25x the web's CPU so, about 1.1x this way)."""
    if not changes:
        return Chunk(b"", None, high)
    rows = query.row_ids()
    data = b"".join(row_frame(c) for c in changes if c.job.id in rows)
    others = [c for c in changes if c.job.id not in rows]
    if others:
        ids = [c.job.id for c in others if _wanted(c, query)]
        cursor = str(changes[-1].cursor).encode()
        data += b"id: %b\nevent: others\ndata: %b\n\n" % (cursor, _encode(Others(len(others), ids)))
    return Chunk(data, changes[-1].cursor, high)


async def events(request: Request) -> Response:
    """GET /v1/events: every change, for any client."""
    return await _events(request, latest=False)


async def dashboard_events(request: Request) -> Response:
    """GET /ui/events, the dashboard's stream (with the session's caller): at most every DASHBOARD_GAP_S, each
    job that changed once, at its latest state, as a RowJob."""
    return await _events(request, latest=True)


async def _events(request: Request, *, latest: bool) -> Response:
    web = web_of(request)
    query, after = query_of(request, PageQuery if latest else FeedQuery), last_event_id(request)
    if isinstance(query, PageQuery):
        query.row_ids()  # a bad one is a 422 before the stream starts
    caller = caller_of(request)
    config = web.config
    slot = await StreamSlot.take(
        web.deps.redis,
        caller.limit_key,
        limit=config.max_streams_per_key,
        retry_after=config.retry_after_s,
        holder="this API key",
    )
    shutdown = Shutdown()
    if query.follow:
        frames = _frames(web.feeds, web.metrics, config, caller.tenant, query, after, shutdown, latest=latest)
    else:
        frames = _replay(web.deps.db, caller.tenant, query, after, latest=latest)
    return EventStream(
        holding(slot, frames),
        ping=0,
        sep="\n",
        send_timeout=SEND_TIMEOUT_S,
        shutdown_event=cast(anyio.Event, shutdown),
        shutdown_grace_period=SHUTDOWN_GRACE_S,
    )


def _wanted(change: Change, query: FeedQuery) -> bool:
    job = change.job
    return (query.type is msgspec.UNSET or job.type == query.type) and (
        query.status is msgspec.UNSET or job.status == query.status
    )


async def _replay(
    db: Database, tenant: str, query: FeedQuery, after: Cursor | None, *, latest: bool
) -> AsyncIterator[bytes]:
    """`follow=false`: what is final after `after` now, ending with an `id:` line alone that says where to resume."""
    now = await feed.boundary(db)  # what a busy queue changes meanwhile is the next read's
    cursor = now if after is None else after
    while cursor < now:
        batch = await feed.read_after(db, tenant, cursor)
        cursor = batch.high
        if chunk := built(batch.changes, query, cursor, latest=latest).data:
            yield chunk
    yield b"id: %b\n\n" % str(cursor).encode()


async def _frames(
    feeds: Feeds,
    metrics: Metrics,
    config: Config,
    tenant: str,
    query: FeedQuery,
    after: Cursor | None,
    shutdown: Shutdown,
    *,
    latest: bool,
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    until = loop.time() + config.stream_max_s
    tick_s = config.stream_keepalive_s
    metrics.open_streams.inc()
    try:
        async with feeds.follow(tenant, paced=latest) as (tenant_feed, follower):
            shutdown.attach(follower)
            cursor = tenant_feed.high if after is None else after
            sent = None if after is None else cursor  # the client's Last-Event-ID
            next_tick = loop.time() + tick_s
            while not follower.stopped and loop.time() < until:
                follower.wake.clear()
                # What one wake found goes out as one chunk, the same bytes for every stream at the same place: a
                # send per event, for each of a tenant's streams, was most of what following the feed cost the
                # web (bench/dashboard_feed.py).
                found = tenant_feed.chunk(cursor, query, latest=latest)
                if found is None:  # behind the cache: read on our own until we reach it
                    batch = await feed.read_after(feeds.db, tenant, cursor)
                    found = built(batch.changes, query, batch.high, latest=latest)
                cursor = found.high
                if found.data:
                    yield found.data
                    sent = found.last
                tick = loop.time() >= next_tick
                if sent != cursor and (not found.data or tick):
                    yield b"id: %b\n\n" % str(cursor).encode()  # Last-Event-ID past what the filters hid
                    sent = cursor
                if tick:
                    yield KEEP_ALIVE
                    next_tick = loop.time() + tick_s
                if cursor < tenant_feed.base:
                    continue  # still behind the cache: read on at once
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(min(until, next_tick)):
                        await follower.wake.wait()
            yield reconnect("shutdown" if follower.stopped else "max-lifetime")
    except database.UNAVAILABLE as exc:
        log.warning("event feed of %s: database unavailable (%s); the client will reconnect", tenant, exc)
        yield reconnect("unavailable")
    finally:
        metrics.open_streams.dec()
