"""A page on another origin, in a real Chromium, follows a job: CORS, EventSource with the read token, the result.

The page is tests/pages/follow.html (docs/api.md shows its script), served from a port of its own, so the API on
another port is another origin. The server runs in the test's loop so that the test can see the page's stream
follow the job before the job runs: every event after `queued` then reaches the page live, by construction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import httpx
import msgspec
import pytest

from tests.browser import Browser
from tests.conftest import eventually
from tests.sse import Live, frames, live_server
from worker import Config, Deps

pytestmark = pytest.mark.slow

Drain = Callable[[], Awaitable[None]]
STATE = "window.outlast.finished && window.outlast"  # what the page saw, once it has finished


def follow_page(origin: str, api: str, **params: str) -> str:
    return f"{origin}/follow.html#" + urlencode({"api": api, **params})


async def following(live: Live, job_id: str) -> bool | None:
    return live.app.state.web.hub.following(UUID(job_id)) or None


def seen(state: dict[str, Any]) -> list[tuple[int, str, Any]]:
    return [(e["id"], e["event"], e["data"]) for e in state["events"]]


async def test_a_page_on_a_listed_origin_follows_a_job_live_and_fetches_its_result(
    config: Config, deps: Deps, drain: Drain, browser: Browser, page_origin: str
) -> None:
    """Chromium blocked a page's EventSource on links.events: no route sent CORS headers."""
    async with live_server(msgspec.structs.replace(config, cors_origins=page_origin)) as live:
        await browser.open(follow_page(page_origin, live.url, key=live.key))
        submitted = await browser.until("(window.outlast.job || window.outlast.finished) && window.outlast")
        assert submitted["job"] is not None, submitted["errors"]
        job_id = submitted["job"]["id"]
        await eventually(lambda: following(live, job_id))  # the page's EventSource replayed, and waits for more
        await drain()
        state = await browser.until(STATE)
        async with (  # the stored log, read with the page's token
            httpx.AsyncClient(base_url=live.url) as anyone,
            anyone.stream("GET", state["job"]["links"]["events"]) as response,
        ):
            stored = [f async for f in frames(response) if f.event != "comment"]
    assert state["errors"] == [], state["errors"]
    assert state["location"] == f"/v1/jobs/{job_id}"  # an exposed header: otherwise the page reads null
    assert seen(state) == [(f.id, f.event, f.data) for f in stored]  # every event, in order, none twice
    assert [e for _, e, _ in seen(state)].count("progress") >= 2
    assert seen(state)[-1][2]["status"] == "succeeded"
    assert state["result"] == {"slept_s": 1.0, "steps": 4}
    assert not [line for line in await browser.console() if "CORS" in line]


async def test_a_page_on_an_origin_not_listed_can_neither_submit_nor_follow_a_job(
    config: Config, deps: Deps, drain: Drain, browser: Browser, page_origin: str
) -> None:
    assert config.cors_origins == ""  # the default: no origin is listed
    async with live_server(config) as live:
        await browser.open(follow_page(page_origin, live.url, key=live.key))
        refused = await browser.until(STATE)
        # The preflight was refused, so the POST was never sent: no job exists.
        assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 0
        async with live.client() as client:
            job = (await client.post("/v1/jobs", json={"type": "sleep", "input": {"seconds": 0.1, "steps": 2}})).json()
        await drain()
        given = {"events": job["links"]["events"], "result": job["links"]["result"]}
        await browser.open(follow_page(page_origin, live.url, **given))
        blind = await browser.until(STATE)
        console = await browser.console()
    assert refused["job"] is None and refused["errors"] == ["TypeError: Failed to fetch"]
    assert blind["events"] == [] and blind["errors"] == ["Error: the event stream was refused"]
    assert blind["result"] is None
    blocked = [line for line in console if "has been blocked by CORS policy" in line]
    assert any("/v1/jobs' from origin" in line for line in blocked), console  # the submit
    assert any("/events?token=" in line for line in blocked), console  # the stream
