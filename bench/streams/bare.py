"""The bare streaming app that Outlast's event streams are measured against, in the same run.

What a job queue that "streams from Redis pub/sub only" does, on the same stack as Outlast's web process
(uvicorn with uvloop and httptools, Starlette, sse-starlette, redis-py), with the same keep-alive and send timeout
(so the ratios price what Outlast adds, not a setting either could choose): one Redis
subscription per process, fanned out in memory to the streams of each key. No database, no replay, no resume:
everything Outlast adds is what the benchmark's ratios price.

    uvicorn --factory bench.streams.bare:create_app
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import defaultdict
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

CHANNEL = "bare:events"  # messages are "<key> <payload>"
KEEPALIVE_S = float(os.environ.get("OUTLAST_STREAM_KEEPALIVE_S", "10"))
SEND_TIMEOUT_S = 30.0  # as server/stream.py


class Fanout:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.queues: dict[str, set[asyncio.Queue[bytes]]] = defaultdict(set)

    async def listen(self) -> None:
        async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(CHANNEL)
            async for message in pubsub.listen():
                key, _, payload = message["data"].partition(b" ")
                for queue in self.queues.get(key.decode(), ()):
                    queue.put_nowait(payload)


async def stream(request: Request) -> Response:
    fanout: Fanout = request.app.state.fanout
    key = request.path_params["key"]

    async def events() -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        fanout.queues[key].add(queue)
        try:
            yield b"event: hello\ndata: {}\n\n"
            while True:
                yield b"event: progress\ndata: %b\n\n" % await queue.get()
        finally:
            fanout.queues[key].discard(queue)
            if not fanout.queues[key]:
                del fanout.queues[key]

    return EventSourceResponse(
        events(),
        ping=KEEPALIVE_S,
        sep="\n",
        ping_message_factory=lambda: ServerSentEvent(comment="keep-alive", sep="\n"),
        send_timeout=SEND_TIMEOUT_S,
    )


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


def create_app() -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = Redis.from_url(os.environ["REDIS_URL"])
        app.state.fanout = fanout = Fanout(redis)
        listening = asyncio.create_task(fanout.listen())
        try:
            yield
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
            await redis.aclose()

    return Starlette(
        routes=[Route("/stream/{key}", stream), Route("/healthz", healthz)],
        lifespan=lifespan,
    )
