"""The `scrape` job type (worker/job_types/scrape.py) against a small site served on loopback: a same-host crawl to
`max_depth` with each page's title, text and links; robots.txt, the byte cap, the timeout and a redirect to a
forbidden address each a failed page with a named error, and the canaries on 127.0.0.2-5 never connected to; bad
URLs a 422 at submit; every page failing fails the job."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import msgspec
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import Processes, eventually, wait_done
from tests.receivers import Received, Receiver
from worker import Config, Context, JobError, Progress
from worker.egress import Egress
from worker.job_types import scrape

ALLOW_LOOPBACK = {"egress_allowed_networks": "127.0.0.1/32", "egress_ports": "1024-65535"}


def page(status: int, body: str = "", headers: dict[str, str] | None = None) -> bytes:
    head = [f"HTTP/1.1 {status} X", "connection: close", f"content-length: {len(body.encode())}"]
    head += [f"{k}: {v}" for k, v in {"content-type": "text/html; charset=utf-8", **(headers or {})}.items()]
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode()


HOME = """<!doctype html><html><head><title> Home page </title></head><body>
<nav><a href="/a">A</a> menu</nav>
<main><h1>Welcome</h1><p>Some <b>main</b> text.</p>
<a href="/a">A again</a> <a href="/a#part">A's part</a> <a href="b">B</a> <a href="/private/x">private</a>
<a href="/big">big</a> <a href="/slow">slow</a> <a href="/away">away</a> <a href="http://other.test/">elsewhere</a>
<a href="mailto:someone@example.com">mail</a></main><script>var hidden = 1;</script></body></html>"""


class Site(Receiver):
    """The test's web site on 127.0.0.1: pages by path, robots.txt disallowing /private, a page over the cap, one that
    never answers, and one that redirects to `away` (a canary)."""

    away: str = ""
    robots: bytes = page(200, "User-agent: *\nDisallow: /private\n", {"content-type": "text/plain"})
    stalled: asyncio.Event | None = None

    async def answer(self, request: Received, before: int) -> bytes:
        pages = {
            "/robots.txt": self.robots,
            "/": page(200, HOME),
            "/a": page(200, '<title>A</title><p>Page A</p><a href="/c">C</a><a href="/">home</a>'),
            "/b": page(301, headers={"location": "/b2"}),
            "/b2": page(200, "<title>B2</title><article><p>Moved here</p></article>"),
            "/c": page(200, '<title>C</title><p>Deep</p><a href="/d">D, one level too deep</a>'),
            "/d": page(200, "<title>D</title>"),
            "/big": page(200, "<p>" + "x" * 5000 + "</p>"),
            "/away": page(302, headers={"location": self.away}),
            "/plain": page(200, "just text", {"content-type": "text/plain"}),
        }
        if request.path == "/slow":
            assert self.stalled is not None
            await self.stalled.wait()
        return pages.get(request.path, page(404, "not here"))

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Site:
        self.stalled = asyncio.Event()
        self.script = self.answer
        await super().start()
        return self

    async def stop(self) -> None:
        if self.stalled is not None:
            self.stalled.set()
        await super().stop()


@pytest.fixture
async def site(canaries: list[Receiver]) -> AsyncIterator[Site]:
    made = Site()
    made.away = f"http://127.0.0.2:{canaries[0].port}/latest/meta-data/"
    await made.start()
    try:
        yield made
    finally:
        await made.stop()


@pytest.fixture
def config(config: Config) -> Config:
    """The suite's deployment, with ctx.http allowed to reach 127.0.0.1 (the site), and nothing else on loopback."""
    return msgspec.structs.replace(config, **ALLOW_LOOPBACK)


Scrape = Callable[..., Awaitable[tuple[scrape.Output, list[Progress]]]]


@pytest.fixture
async def run_scrape(config: Config) -> AsyncIterator[Scrape]:
    """The job's coroutine with a Context whose ctx.http is a worker's (the deployment's guard), in this process."""
    egress = Egress(config)

    async def run(**input: Any) -> tuple[scrape.Output, list[Progress]]:
        progress: list[Progress] = []
        ctx = Context(uuid.uuid4(), 1, 1, progress.append, http=egress.for_job())
        value = msgspec.convert(input, scrape.Input)
        return await scrape.run(value, ctx), progress

    try:
        yield run
    finally:
        await egress.aclose()


def by_path(output: scrape.Output) -> dict[str, scrape.Page]:
    return {httpx.URL(p.url).raw_path.decode(): p for p in output.pages}


async def test_a_crawl_follows_same_host_links_to_max_depth_and_names_each_pages_failure(
    run_scrape: Scrape, site: Site, canaries: list[Receiver]
) -> None:
    output, progress = await run_scrape(
        urls=[site.root + "/"], max_depth=2, max_pages=50, page_timeout_s=0.5, max_page_bytes=2048
    )
    pages = by_path(output)
    assert sorted(pages) == ["/", "/a", "/away", "/b", "/big", "/c", "/private/x", "/slow"]  # no /d, no other.test
    home = pages["/"]
    assert (home.status, home.title, home.depth, home.final_url) == (200, "Home page", 0, site.root + "/")
    assert home.text == "Welcome\nSome main text.\nA again A's part B private big slow away elsewhere mail"
    assert home.links == [
        f"{site.root}/a",
        f"{site.root}/b",
        f"{site.root}/private/x",
        f"{site.root}/big",
        f"{site.root}/slow",
        f"{site.root}/away",
        "http://other.test/",
    ]  # absolute, each once (the <nav>'s too), without fragments, http(s) only
    assert (pages["/a"].depth, pages["/c"].depth, pages["/c"].title) == (1, 2, "C")
    assert (pages["/b"].final_url, pages["/b"].text) == (f"{site.root}/b2", "Moved here")
    errors = {path: p.error.type for path, p in pages.items() if p.error is not None}
    assert errors == {
        "/private/x": "robots_disallowed",
        "/big": "too_large",
        "/slow": "timeout",
        "/away": "forbidden_address",
    }
    assert (output.succeeded, output.failed) == (4, 4)
    assert [canary.connections for canary in canaries] == [0, 0, 0, 0]
    assert not any(r.path.startswith("/private") for r in site.requests)  # disallowed: never asked for
    assert [r.path for r in site.requests].count("/robots.txt") == 1  # once per job and origin
    assert progress and progress[-1].message == "8 pages, 4 failed"
    assert [p.fraction for p in progress] == sorted(p.fraction for p in progress)  # it only moves forward


async def test_a_page_that_resolves_to_a_forbidden_address_fails_without_a_connection(
    run_scrape: Scrape, site: Site, canaries: list[Receiver]
) -> None:
    output, _ = await run_scrape(urls=[site.root + "/plain", f"http://127.0.0.3:{canaries[0].port}/"])
    plain, forbidden = output.pages
    assert (plain.error, plain.text, plain.links) == (None, "just text", [])
    assert forbidden.error is not None and forbidden.error.type == "forbidden_address"
    assert "127.0.0.3 is loopback" in forbidden.error.message
    assert [canary.connections for canary in canaries] == [0, 0, 0, 0]


async def test_when_every_page_fails_the_job_fails_naming_why_and_retries_only_passing_failures(
    run_scrape: Scrape, site: Site, canaries: list[Receiver]
) -> None:
    with pytest.raises(JobError) as failed:
        await run_scrape(urls=[site.root + "/private/x", site.root + "/missing"])
    assert failed.value.type == "all_pages_failed" and not failed.value.retryable
    assert "1 robots_disallowed" in str(failed.value) and "1 http_status" in str(failed.value)
    site.robots = page(503)  # RFC 9309: robots.txt unreachable, so every page of the site is disallowed
    with pytest.raises(JobError) as unavailable:
        await run_scrape(urls=[site.root + "/", site.root + "/a"])
    assert unavailable.value.type == "all_pages_failed" and unavailable.value.retryable
    assert str(unavailable.value) == "every page failed: 2 robots_unavailable"


@pytest.mark.parametrize(
    ("urls", "at"),
    [
        (["ftp://example.com/file"], "$.input.urls[0]"),
        (["https://example.com/", "javascript:alert(1)"], "$.input.urls[1]"),
        ([], "$.input.urls"),
        ([f"https://example.com/{n}" for n in range(101)], "$.input.urls"),
        (["http://169.254.169.254/latest/meta-data/"], "$.input"),
        (["https://user:secret@example.com/"], "$.input"),
        (["http://2130706433/"], "$.input"),
    ],
)
async def test_a_url_no_deployment_would_fetch_is_a_422_at_submit_naming_it(
    client: httpx.AsyncClient, urls: list[str], at: str
) -> None:
    response = await client.post("/v1/jobs", json={"type": "scrape", "input": {"urls": urls}})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert [error["loc"] for error in response.json()["errors"]] == [at]


async def test_a_submitted_scrape_runs_in_the_worker_through_its_guard(
    client: httpx.AsyncClient, drain: Callable[[], Awaitable[None]], site: Site, canaries: list[Receiver]
) -> None:
    urls = [site.root + "/a", site.root + "/away", f"http://127.0.0.4:{canaries[0].port}/"]
    submitted = await client.post("/v1/jobs", json={"type": "scrape", "input": {"urls": urls}})
    assert submitted.status_code == 202, submitted.text
    await drain()

    async def done() -> dict[str, Any] | None:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{submitted.json()['id']}")).json()
        return job if job["done"] else None

    job = await eventually(done)
    assert job["status"] == "succeeded", job
    pages = job["result"]["pages"]
    assert [p.get("error", {}).get("type") for p in pages] == [None, "forbidden_address", "forbidden_address"]
    assert pages[0]["title"] == "A" and pages[0]["links"] == [f"{site.root}/c", f"{site.root}/"]
    assert (job["result"]["succeeded"], job["result"]["failed"], job["progress"]["fraction"]) == (1, 2, 1.0)
    assert [canary.connections for canary in canaries] == [0, 0, 0, 0]


async def test_with_tracing_on_each_request_of_a_scrape_is_a_child_of_its_attempt_and_carries_its_trace(
    spans: InMemorySpanExporter, client: httpx.AsyncClient, drain: Callable[[], Awaitable[None]], site: Site
) -> None:
    submitted = await client.post("/v1/jobs", json={"type": "scrape", "input": {"urls": [site.root + "/a"]}})
    assert submitted.status_code == 202, submitted.text
    await drain()
    finished = spans.get_finished_spans()
    (attempt,) = [s for s in finished if s.name == "run scrape"]
    requests = [s for s in finished if s.name == "ctx.http GET"]
    assert len(requests) == 2  # robots.txt, then the page
    assert all(s.parent is not None and s.parent.span_id == attempt.context.span_id for s in requests)
    trace_id = f"{attempt.context.trace_id:032x}"
    assert [r.headers["traceparent"].split("-")[1] for r in site.requests] == [trace_id, trace_id]


@pytest.mark.slow
async def test_real_web_and_worker_processes_scrape_through_the_deployments_egress_policy(
    processes: Processes, site: Site, canaries: list[Receiver]
) -> None:
    """The worker builds ctx.http from OUTLAST_EGRESS_* at its start and closes it at its stop, without a traceback."""
    urls = [site.root + "/", f"http://127.0.0.5:{canaries[0].port}/"]
    async with processes.client() as client:
        submitted = await client.post(
            "/v1/jobs", json={"type": "scrape", "input": {"urls": urls, "max_depth": 1, "page_timeout_s": 1}}
        )
        assert submitted.status_code == 202, submitted.text
        job = await wait_done(client, submitted.json()["id"])
    assert job["status"] == "succeeded", job
    errors = {p["url"].removeprefix(site.root): p.get("error", {}).get("type") for p in job["result"]["pages"]}
    assert errors[f"http://127.0.0.5:{canaries[0].port}/"] == "forbidden_address"
    assert (errors["/"], errors["/a"], errors["/away"]) == (None, None, "forbidden_address")
    processes.stop()
    assert [canary.connections for canary in canaries] == [0, 0, 0, 0]
    assert "Traceback" not in processes.log("worker")
