"""The dashboard in a real Chromium: sign in, submit a `sleep` job from its form and watch its progress reach 100 %
without a reload, cancel a second job, see a failed job's error, bulk-cancel a filtered set, watch the jobs list's rows
and its count of new jobs follow the tenant feed, and find no buttons for a read-only key. Each page is photographed
at 1,280 and 390 px wide into .outlast/screenshots/.

The server runs in the test's loop (tests/sse.py) and jobs run in an in-process worker started when the test wants
them to run, so a page is open before the events it must show exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from tests.browser import Browser
from tests.conftest import ROOT
from tests.sse import Live, live_server
from worker import Config, Deps, keys

pytestmark = pytest.mark.slow

Drain = Callable[[], Awaitable[None]]
SHOTS = ROOT / ".outlast" / "screenshots"
WIDTHS = (1280, 390)


async def shoot(browser: Browser, name: str) -> None:
    """The whole page at each width, as `<name>-<width>.png`: the window grown to the page's height."""
    for width in WIDTHS:
        await asyncio.to_thread(browser.driver.set_window_size, width, 900)
        chrome = await browser.js("window.outerHeight - window.innerHeight")
        height = await browser.js("Math.min(document.documentElement.scrollHeight, 3000)")
        await asyncio.to_thread(browser.driver.set_window_size, width, int(height) + int(chrome))
        await browser.screenshot(SHOTS / f"{name}-{width}.png")
    await asyncio.to_thread(browser.driver.set_window_size, 1280, 900)


async def visit(browser: Browser, live: Live, path: str) -> None:
    await browser.open(live.url + path)
    await browser.until("document.readyState === 'complete'")


async def click(browser: Browser, selector: str) -> None:
    """Click the element and wait for the page it leads to."""
    await browser.js(
        "window.__left = true, document.querySelector(" + msgspec.json.encode(selector).decode() + ").click()"
    )
    await browser.until("!window.__left && document.readyState === 'complete'")


async def sign_in(browser: Browser, live: Live, key: str) -> None:
    await visit(browser, live, "/ui/")
    assert "/ui/login" in await browser.js("location.pathname")
    await browser.js(f"document.querySelector('#key').value = {msgspec.json.encode(key).decode()}")
    await click(browser, "form button[type=submit]")
    assert await browser.js("location.pathname") == "/ui/"


async def api(live: Live, method: str, path: str, **kwargs: Any) -> Any:
    async with live.client() as client:
        response = await client.request(method, path, **kwargs)
        assert response.status_code < 300, response.text
        return response.json()


async def test_the_dashboard_in_a_browser(config: Config, deps: Deps, drain: Drain, browser: Browser) -> None:
    fast = msgspec.structs.replace(config, stream_keepalive_s=2.0, events_poll_s=0.5)
    async with live_server(fast) as live:
        await visit(browser, live, "/ui/jobs")
        await shoot(browser, "login")
        await sign_in(browser, live, live.key)

        # A sleep job from its form; its progress bar reaches 100 % live, in the same page.
        await visit(browser, live, "/ui/types/sleep")
        await browser.js("document.querySelector('#i-seconds').value = 'soon'")
        await click(browser, "form.schema-form button[type=submit]")
        error = await browser.js("document.querySelector('[data-error-for=seconds]')?.textContent")
        assert error is not None and "not a number" in error
        await shoot(browser, "type-form-error")
        await browser.js("document.querySelector('#i-seconds').value = '3'")
        await browser.js("document.querySelector('#i-steps').value = '6'")
        await click(browser, "form.schema-form button[type=submit]")
        assert (await browser.js("location.pathname")).startswith("/ui/jobs/")
        await browser.js("window.__same_page = true")
        await shoot(browser, "job-queued")
        running = asyncio.create_task(drain())
        try:
            half = "(document.querySelector('progress')?.value ?? 0) >= 50"
            await browser.until(half, within=30)
            # the page's facts follow its state too: its start time and its timeline's attempt, not only the badge
            started = "document.querySelector('[data-started]').textContent.trim() !== '—'"
            await browser.until(started, within=10)
            await shoot(browser, "job-running")
            await browser.until("document.querySelector('progress').value === 100", within=30)
            await browser.until("document.querySelector('h1 .status').textContent === 'succeeded'", within=30)
            await browser.until("document.querySelector('[data-result]') !== null", within=30)
            assert await browser.js("window.__same_page === true"), "the page was reloaded"
        finally:
            await running
        await shoot(browser, "job-succeeded")

        # A second job, cancelled from its page.
        second = await api(live, "POST", "/v1/jobs", json={"type": "sleep", "input": {"seconds": 60}})
        await visit(browser, live, f"/ui/jobs/{second['id']}")
        await click(browser, "button.warn[data-action]")
        await browser.until("document.querySelector('h1 .status').textContent === 'cancelled'")
        assert (await api(live, "GET", f"/v1/jobs/{second['id']}"))["status"] == "cancelled"

        # A failed job shows its error.
        failed = await api(live, "POST", "/v1/jobs", json={"type": "explode", "input": {}})
        await drain()
        await visit(browser, live, f"/ui/jobs/{failed['id']}")
        assert await browser.js("document.querySelector('h1 .status').textContent") == "failed"
        assert "an unexpected bug in the job" in await browser.js("document.querySelector('.error-box').textContent")
        await shoot(browser, "job-failed")

        # Bulk cancel of a filtered set, after a confirmation that states the count.
        batch = [
            (await api(live, "POST", "/v1/jobs", json={"type": "sleep", "input": {}, "metadata": {"batch": "b7"}}))[
                "id"
            ]
            for _ in range(3)
        ]
        kept = await api(live, "POST", "/v1/jobs", json={"type": "sleep", "input": {}})
        await visit(browser, live, "/ui/jobs?meta=batch%3Db7")
        await shoot(browser, "jobs-filtered")
        await click(browser, "a.button.warn[data-action]")
        assert await browser.js("document.querySelector('[data-count]').textContent") == "3"
        await shoot(browser, "bulk-confirm")
        await click(browser, "form button.warn[data-action]")
        assert "3 jobs cancelled" in await browser.js("document.querySelector('.flash.ok').textContent")
        async with live.client() as client:
            statuses = [(await client.get(f"/v1/jobs/{j}")).json()["status"] for j in [*batch, kept["id"]]]
        assert statuses == ["cancelled"] * 3 + ["queued"]

        # The jobs list follows the dashboard's stream: a row's status changes in place, and a job created since the
        # page was read is counted above the table, though the stream may first show it already ended.
        await visit(browser, live, "/ui/jobs")
        await browser.js("window.__same_page = true")
        assert await browser.js("document.querySelector('tr[data-job]').dataset.job") == kept["id"]
        await api(live, "POST", "/v1/jobs", json={"type": "square_sum", "input": {"data": [1, 2]}})
        await drain()
        kept_status = f"document.querySelector('tr[data-job=\"{kept['id']}\"] .status').textContent"
        await browser.until(f"{kept_status} === 'succeeded'", within=30)
        await browser.until("!document.querySelector('[data-new-jobs]').hidden", within=30)
        assert await browser.js("document.querySelector('[data-new-jobs] span').textContent") == "1 new job"
        assert await browser.js("window.__same_page === true"), "the page was reloaded"
        await shoot(browser, "jobs-live")  # the row's new status and the note, without a reload

        # The other pages, with something on them.
        await api(
            live, "POST", "/v1/schedules", json={"id": "nightly", "cron": "0 3 * * *", "type": "sleep", "input": {}}
        )
        await api(
            live,
            "POST",
            "/v1/workflows",
            json={
                "steps": [
                    {"name": "split", "type": "square_sum", "input": {"data": [1, 2]}},
                    {"name": "cubes", "type": "cube_sum", "input": {"data": [3]}},
                    {"name": "last", "type": "sleep", "input": {"seconds": 0}, "after": ["split", "cubes"]},
                ]
            },
        )
        await drain()
        for path, name in (
            ("/ui/", "overview"),
            ("/ui/jobs", "jobs"),
            ("/ui/types", "types"),
            ("/ui/schedules", "schedules"),
            ("/ui/workflows", "workflows"),
        ):
            await visit(browser, live, path)
            await shoot(browser, name)
        await click(browser, "table.jobs a")
        await browser.until("document.querySelector('.dag .node') !== null")
        await shoot(browser, "workflow")

        # A read-only key: the same pages, and no button that changes anything.
        reader = await keys.create(deps.db, "default", "reader", read_only=True)
        await visit(browser, live, "/ui/")
        await click(browser, "header form button")  # sign out
        await sign_in(browser, live, reader)
        for path in (f"/ui/jobs/{kept['id']}", "/ui/jobs", "/ui/types/sleep", "/ui/schedules"):
            await visit(browser, live, path)
            assert await browser.js("document.querySelectorAll('[data-action]').length") == 0, path
        await visit(browser, live, f"/ui/jobs/{kept['id']}")
        await shoot(browser, "job-read-only")
