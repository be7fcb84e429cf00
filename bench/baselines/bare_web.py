"""The bare Starlette app in front of each peer's queue (arq_web, saq_app, procrastinate_app): the same HTTP shape as
the naive app, and nothing else.

    create_app(enqueue, lifespan)   `POST /v1/jobs` decodes the body with msgspec, awaits `enqueue(request, type)`
                                    (the noop, by the name in the body) and answers 202 with the id it returns;
                                    `GET /healthz`; the peer's client opened and closed by `lifespan`
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Enqueue = Callable[[Request, str], Awaitable[object]]  # a job's id: a string, or procrastinate's integer
Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


class Body(msgspec.Struct):
    type: str


_decode = msgspec.json.Decoder(Body).decode
_encode = msgspec.json.Encoder().encode


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


def create_app(enqueue: Enqueue, lifespan: Lifespan) -> Starlette:
    async def submit(request: Request) -> Response:
        job_id = await enqueue(request, _decode(await request.body()).type)
        return Response(_encode({"id": job_id, "status": "queued"}), status_code=202, media_type="application/json")

    return Starlette(
        routes=[Route("/v1/jobs", submit, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])],
        lifespan=lifespan,
    )
