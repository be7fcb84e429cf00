"""GET /v1/jobs/{id}/events: a job's event log as Server-Sent Events: replay, follow, close after the end.

Each event is `id: <seq>`, `event: status|progress|log` and one line of JSON `data:`; a status event's data is
the Job as it was right after that change. The stream replays the stored events after `Last-Event-ID` (or from
the start), follows new ones as they are committed (worker.events), and closes after the terminal status event.
A `: keep-alive` comment every `stream_keepalive_s` keeps proxies from cutting an idle stream. A stream lives at
most `stream_max_s`, and ends early when the process shuts down: both times with a `reconnect` event that has no
id, so the client (EventSource does it by itself) reconnects with the same Last-Event-ID and misses nothing.
A reconnect after the end answers 204, which tells EventSource to stop for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, cast
from uuid import UUID

import anyio
import msgspec
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server import jobs
from server.auth import caller_of, signed_links, tenant_of
from server.follow import Hub
from server.limits import StreamSlot
from server.metrics import Metrics
from server.problems import FieldError, ValidationError
from server.state import web_of
from worker import Config, database, events, resource, store
from worker.job import Links

log = logging.getLogger("outlast.web")
SEND_TIMEOUT_S = 30.0  # a client that takes nothing for this long is dropped (its socket buffer is full)
SHUTDOWN_GRACE_S = 2.0  # on shutdown, the time each stream has to send its `reconnect` event
KEEP_ALIVE = b": keep-alive\n\n"
_encode = msgspec.json.Encoder().encode


class Reconnect(msgspec.Struct, frozen=True):
    """A `reconnect` event's data: why the stream ended before the job did."""

    reason: str  # max-lifetime, token-expired, shutdown or unavailable


def frame(row: store.JobRow, event: events.Event, links: Links | None = None) -> bytes:
    if event.name != "status":
        return plain_frame(event)
    data = _encode(resource.status_job(row, event.data, links))
    return b"id: %d\nevent: status\ndata: %b\n\n" % (event.seq, data)


def plain_frame(event: events.Event) -> bytes:
    """An event whose stored data is what the client reads: a job's progress and log, a workflow's events."""
    return b"id: %d\nevent: %b\ndata: %b\n\n" % (event.seq, event.name.encode(), event.data)


def reconnect(reason: str) -> bytes:
    # No id: the client's Last-Event-ID stays that of the last event it got. The jittered retry spreads the
    # reconnects of all the streams of a process that shuts down.
    return b"event: reconnect\ndata: %b\nretry: %d\n\n" % (_encode(Reconnect(reason)), random.randint(500, 3000))


class Stoppable(Protocol):
    def stop(self) -> None: ...


class Shutdown:
    """Stands in for the anyio.Event that EventSourceResponse sets when the server shuts down (it only calls set()):
    it stops the stream's follower, so the stream ends with a `reconnect` event instead of being cut."""

    def __init__(self) -> None:
        self._follower: Stoppable | None = None
        self._set = False

    def set(self) -> None:
        self._set = True
        if self._follower is not None:
            self._follower.stop()

    def is_set(self) -> bool:
        return self._set

    def attach(self, follower: Stoppable) -> None:
        self._follower = follower
        if self._set:
            follower.stop()


class EventStream(EventSourceResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info("dropped an event stream whose client took nothing for %ss", SEND_TIMEOUT_S)


def last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id")
    if raw is None:
        return 0
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 9:  # present but empty is malformed too: EventSource never sends that
        msg = "Last-Event-ID must be the id of an event of this job's stream"
        raise ValidationError(msg, [FieldError("Last-Event-ID", msg)])
    return int(raw)


async def follow(request: Request) -> Response:
    web = web_of(request)
    deps = web.deps
    after = last_event_id(request)
    row = await jobs.job_or_404(request)  # 404 before any stream: an unknown id never hangs
    # A finished job's stream is its replay alone: read it now, to answer 204 if nothing is left. A live job's
    # stream reads once it has registered for notifications, so nothing committed in between is missed.
    first = await events.read_after(deps.db, row.id, after) if row.done else []
    if row.done and not first:
        return Response(status_code=204)  # nothing after Last-Event-ID, ever
    tenant = tenant_of(request)
    links = signed_links(request, resource.as_job(row)).links  # a status event's Job is the one GET would show

    async def render(event: events.Event) -> bytes:
        nonlocal row
        if event.final and not row.done:  # the change that ended the job set its result too: re-read it
            row = await store.get_job(web.hub.db, tenant, row.id) or row
        return frame(row, event, links)

    return await open_stream(request, row.id, after, first, render, caller_holder="this job's read token")


async def open_stream(
    request: Request,
    key: UUID,
    after: int,
    first: list[events.Event],
    render: Callable[[events.Event], Awaitable[bytes]],
    *,
    source: events.Source = events.JOB_LOG,
    caller_holder: str,
) -> Response:
    """The SSE response that replays `first`, then follows the log of `key` (a job's, or with WORKFLOW_LOG a
    workflow's) from `after`, each event framed by `render`, holding one of the caller's stream slots."""
    web = web_of(request)
    deps = web.deps
    caller = caller_of(request)
    # The 429 must go out before any byte of the stream; the body renews the slot and gives it back.
    slot = await StreamSlot.take(
        deps.redis,
        caller.limit_key,
        limit=deps.config.max_streams_per_token if caller.job else deps.config.max_streams_per_key,
        retry_after=deps.config.retry_after_s,
        holder=caller_holder if caller.job else "this API key",
    )
    shutdown = Shutdown()
    frames = _frames(web.hub, web.metrics, deps.config, source, key, render, after, first, shutdown, caller.expires_at)
    return EventStream(
        holding(slot, frames),
        ping=0,  # the stream's own loop sends the keep-alive: a task per stream less (memory, GC time)
        sep="\n",
        send_timeout=SEND_TIMEOUT_S,
        shutdown_event=cast(anyio.Event, shutdown),
        shutdown_grace_period=SHUTDOWN_GRACE_S,
    )


async def holding(slot: StreamSlot, frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`frames`, holding the caller's stream slot: renewed with each keep-alive, released however the stream ends."""
    try:
        async with contextlib.aclosing(frames):  # type: ignore[type-var]
            async for chunk in frames:
                if chunk is KEEP_ALIVE:
                    await slot.renew()
                yield chunk
    finally:
        await slot.release()


async def _frames(
    hub: Hub,
    metrics: Metrics,
    config: Config,
    source: events.Source,
    key: UUID,
    render: Callable[[events.Event], Awaitable[bytes]],
    after: int,
    first: list[events.Event],
    shutdown: Shutdown,
    expires_at: float | None,
) -> AsyncIterator[bytes]:
    lifetime, ends = config.stream_max_s, "max-lifetime"
    if expires_at is not None and expires_at - time.time() < lifetime:
        # A stream a read token opened ends with the token: the client reads the job again for a fresh one.
        lifetime, ends = max(0.0, expires_at - time.time()), "token-expired"
    until = asyncio.get_running_loop().time() + lifetime
    metrics.open_streams.inc()
    try:
        for event in first:
            yield await render(event)
            if event.final:
                return
            after = event.seq
        first.clear()
        with hub.follow(key, source) as follower:
            shutdown.attach(follower)
            ticks = config.stream_keepalive_s
            async with contextlib.aclosing(follower.events(after, until=until, tick_s=ticks)) as following:
                async for found in following:
                    if found is None:
                        yield KEEP_ALIVE
                        continue
                    yield await render(found)
                    if found.final:
                        return
            yield reconnect("shutdown" if follower.stopped else ends)
    except database.UNAVAILABLE as exc:
        log.warning("event stream of %s: database unavailable (%s); the client will reconnect", key, exc)
        yield reconnect("unavailable")
    finally:
        metrics.open_streams.dec()
