"""What the web process keeps between requests: one frozen `Web`, built once in the lifespan (server/app.py) and
read by every handler with `web_of(request)`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from worker import Config, Deps, JobType, UrlGuard, store
from worker.batch import Batcher
from worker.queue import Bell

if TYPE_CHECKING:  # each of these modules reads the state through web_of: only the names, not the modules
    from server.auth import AuthState
    from server.feed import Feeds
    from server.follow import Hub
    from server.jobs import JobTypeList
    from server.limits import Budget
    from server.metrics import Metrics


@dataclass(frozen=True, kw_only=True)
class Web:
    config: Config
    deps: Deps
    hub: Hub  # one Redis subscription, fanned out to every stream and long poll (server/follow.py)
    feeds: Feeds  # the tenant feeds of GET /v1/events, woken through the hub (server/feed.py)
    auth: AuthState  # tokens, the failure throttle, open mode, the key cache (server/auth.py)
    callbacks: UrlGuard  # the SSRF guard a callback_url passes at submit (and again at each delivery)
    inserts: Batcher[store.NewJob, store.JobRow | None]  # submits' INSERTs, batched (server/submit.py)
    enqueues: Batcher[Bell, bool]  # their doorbells, batched
    submits: Budget  # per-key rate limits (server/limits.py)
    redeliveries: Budget
    metrics: Metrics
    job_types: Mapping[str, JobType]
    job_type_list: JobTypeList  # GET /v1/job-types, rendered once
    openapi: dict[str, Any]  # GET /openapi.json, built once


def web_of(request: Request) -> Web:
    web: Web = request.app.state.web
    return web
