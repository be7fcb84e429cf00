"""/healthz (the process answers) and /readyz (both stores answer)."""

from __future__ import annotations

import asyncio

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from server.responses import MsgspecResponse, ProblemResponse
from server.state import web_of
from worker import store

CHECK_TIMEOUT_S = 2.0


class Health(msgspec.Struct, frozen=True):
    status: str


class Readiness(msgspec.Struct, frozen=True, omit_defaults=True):
    status: str  # "ok" or "unavailable"
    database: str  # "ok" or "down"
    redis: str
    type: str | None = None  # problem fields when unavailable
    title: str | None = None
    detail: str | None = None


async def healthz(request: Request) -> Response:
    return MsgspecResponse(Health("ok"))


async def _check(probe: asyncio.Future[object] | asyncio.Task[object] | object) -> str:
    try:
        await asyncio.wait_for(probe, CHECK_TIMEOUT_S)  # type: ignore[arg-type]
    except Exception:
        return "down"
    return "ok"


async def readyz(request: Request) -> Response:
    deps = web_of(request).deps
    database, redis = await asyncio.gather(_check(store.ping(deps.db)), _check(deps.redis.ping()))
    if database == redis == "ok":
        return MsgspecResponse(Readiness("ok", database, redis))
    down = " and ".join(name for name, state in (("database", database), ("redis", redis)) if state == "down")
    body = Readiness(
        "unavailable",
        database,
        redis,
        "/problems/unavailable",
        "A service this request needs is unavailable.",
        f"{down} unreachable",
    )
    return ProblemResponse(body, status_code=503, headers={"Retry-After": str(deps.config.retry_after_s)})
