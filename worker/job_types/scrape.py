"""`scrape`: fetch pages through ctx.http (the SSRF guard, its caps and circuits), as each site's robots.txt allows,
two at a time per host, and optionally crawl their same-host links; one outcome per page.

    {"urls": ["https://example.com/"], "max_depth": 1, "max_pages": 20}
    → {"pages": [{"url": …, "depth": 0, "final_url": …, "status": 200, "title": …, "text": …, "links": […]},
                 {"url": …, "depth": 1, "error": {"type": "robots_disallowed", "message": …}}, …],
       "succeeded": 1, "failed": 1}

A page that fails (a forbidden address, robots.txt, over the byte cap, its timeout, a 4xx or 5xx...) is a page with an
`error`; the job succeeds with every page's outcome unless every page failed: then it fails with `all_pages_failed`
(retried when each page's failure was a passing one). docs/job-types.md "scrape"
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from ipaddress import ip_address, ip_network
from typing import TYPE_CHECKING, Annotated, Final

import httpx
import msgspec

from worker.egress import EgressError
from worker.job import Context, JobError, JobType
from worker.webhooks.ssrf import Forbidden, UrlGuard, refusal

if TYPE_CHECKING:
    from protego import Protego

log = logging.getLogger("outlast.scrape")
AGENT: Final = "Outlast"  # the product token robots.txt groups are matched against
ROBOTS_MAX_BYTES: Final = 512 * 1024  # RFC 9309: a crawler parses at least 500 KiB
CONCURRENCY: Final = 16  # pages in flight per job, whatever the hosts
PASSING: Final = frozenset({"timeout", "connect_error", "transport_error", "circuit_open", "robots_unavailable"})
_ANY_PORT: Final = UrlGuard(ports=((1, 65535),), allow_http=True)  # the URL's text alone, before any policy
_EVERYWHERE: Final = (ip_network("0.0.0.0/0"), ip_network("::/0"))
ACCEPT: Final = "text/html,application/xhtml+xml;q=0.9,text/plain;q=0.8,*/*;q=0.5"

Url = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[hH][tT][tT][pP][sS]?://[^/?#\s]",
        max_length=2048,
        description="an http(s) URL",
    ),
]


class Input(msgspec.Struct, forbid_unknown_fields=True):
    urls: Annotated[list[Url], msgspec.Meta(min_length=1, max_length=100)]
    # 0: the given pages only; n: their links to the same host too, up to n links away
    max_depth: Annotated[int, msgspec.Meta(ge=0, le=5)] = 0
    max_pages: Annotated[int, msgspec.Meta(ge=1, le=1_000)] = 100  # pages fetched in all, the given ones included
    page_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 20.0  # DNS to the last byte, redirects included
    max_page_bytes: Annotated[int, msgspec.Meta(ge=1_024, le=10_485_760)] = 2_097_152
    per_host: Annotated[int, msgspec.Meta(ge=1, le=4)] = 2  # pages of one host in flight at once

    def __post_init__(self) -> None:
        for i, url in enumerate(self.urls):  # what no deployment fetches is refused at submit; the rest, at fetch
            try:
                _, host, _ = _ANY_PORT.parse(url)
            except Forbidden as exc:
                raise ValueError(f"urls[{i}] {url[:100]!r}: {exc}") from None
            why = _refused_anywhere(host)
            if why is not None:
                raise ValueError(f"urls[{i}] {url[:100]!r}: {why}")
        if len(set(self.urls)) > self.max_pages:
            raise ValueError(f"max_pages is {self.max_pages}, fewer than the {len(set(self.urls))} urls given")


def _refused_anywhere(host: str) -> str | None:
    """Why an address written in a URL is refused whatever the deployment allows (cloud metadata, link-local,
    multicast...); None for the others, and for a name, whose addresses are known at fetch time only."""
    try:
        address = ip_address(host.strip("[]"))
    except ValueError:
        return None
    return refusal(address, _EVERYWHERE)


class PageError(msgspec.Struct, frozen=True):
    type: str  # forbidden_address, robots_disallowed, robots_unavailable, too_large, timeout, http_status, ...
    message: str


class Page(msgspec.Struct, kw_only=True, omit_defaults=True):
    url: str  # as given, or as linked
    depth: int  # 0 for a given URL, n for a page n links away from one
    final_url: str | None = None  # after redirects
    status: int | None = None
    title: str | None = None
    text: str | None = None  # the main text, a line per block; none for a page that is not HTML or text
    truncated: bool = False  # the text was cut at 50,000 characters
    links: list[str] = []  # absolute, http(s), without fragments, each once, in document order
    error: PageError | None = None


class Output(msgspec.Struct):
    pages: list[Page]
    succeeded: int
    failed: int


class _Robots:
    """Each origin's robots.txt, fetched once per job: its rules, None (no rules: allow all), or the error that
    fails that origin's pages."""

    def __init__(self, ctx: Context, input: Input) -> None:
        self.ctx, self.input = ctx, input
        self.found: dict[str, Protego | PageError | None] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def verdict(self, url: httpx.URL) -> PageError | None:
        origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
        async with self.locks.setdefault(origin, asyncio.Lock()):
            if origin not in self.found:
                self.found[origin] = await self._fetch(origin)
        rules = self.found[origin]
        if isinstance(rules, PageError):
            return rules
        if rules is not None and not rules.can_fetch(str(url), AGENT):
            return PageError(
                "robots_disallowed", f"{origin}/robots.txt disallows {url.raw_path.decode()!r} for {AGENT}"
            )
        return None

    async def _fetch(self, origin: str) -> Protego | PageError | None:
        from protego import Protego

        try:
            response = await self.ctx.http.get(
                f"{origin}/robots.txt", timeout_s=self.input.page_timeout_s, max_bytes=ROBOTS_MAX_BYTES
            )
        except EgressError as exc:
            if exc.type == "too_large":  # bigger than any crawler must read: as if it had no rules
                return None
            return PageError(exc.type, f"robots.txt: {exc}")
        if response.status_code >= 500:  # RFC 9309 2.3.1.4: unreachable, so assume everything is disallowed
            return PageError("robots_unavailable", f"{origin}/robots.txt answered {response.status_code}")
        if response.status_code >= 400:  # 2.3.1.3: unavailable, so no rules
            return None
        try:
            return Protego.parse(response.text)
        except Exception:  # a file protego can't read says nothing; the page is then fetched
            return None


class _Crawl:
    def __init__(self, input: Input, ctx: Context) -> None:
        self.input, self.ctx = input, ctx
        self.robots = _Robots(ctx, input)
        self.hosts: dict[str, asyncio.Semaphore] = {}
        self.all = asyncio.Semaphore(CONCURRENCY)
        self.done = self.failed = 0
        self.expected = len(set(input.urls)) if input.max_depth == 0 else input.max_pages

    async def run(self) -> Output:
        seen: set[str] = set()
        frontier = []
        for url in self.input.urls:
            if _key(url) not in seen:
                seen.add(_key(url))
                frontier.append((url, 0))
        pages: list[Page] = []
        while frontier:
            level = await asyncio.gather(*(self.page(url, depth) for url, depth in frontier))
            pages += level
            frontier = self._next(level, seen, room=self.input.max_pages - len(pages))
        failed = sum(1 for page in pages if page.error is not None)
        if failed == len(pages):
            kinds = Counter(page.error.type for page in pages if page.error is not None)
            summary = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
            raise JobError(f"every page failed: {summary}", type="all_pages_failed", retryable=set(kinds) <= PASSING)
        return Output(pages, len(pages) - failed, failed)

    def _next(self, level: list[Page], seen: set[str], *, room: int) -> list[tuple[str, int]]:
        """The links of this level's pages to follow: to the page's own host, not seen yet, `room` at most."""
        for page in level:
            if page.final_url is not None:
                seen.add(_key(page.final_url))  # a redirect's target is fetched once, whoever links to it
        frontier: list[tuple[str, int]] = []
        for page in level:
            if page.error is not None or page.depth >= self.input.max_depth or page.final_url is None:
                continue
            host = httpx.URL(page.final_url).host
            for link in page.links:
                if len(frontier) >= room:
                    return frontier
                if httpx.URL(link).host == host and _key(link) not in seen:
                    seen.add(_key(link))
                    frontier.append((link, page.depth + 1))
        return frontier

    async def page(self, url: str, depth: int) -> Page:
        parsed = httpx.URL(url)
        slot = self.hosts.setdefault(parsed.host, asyncio.Semaphore(self.input.per_host))
        async with self.all, slot:
            page = await self._fetch(url, parsed, depth)
        self.done += 1
        self.failed += page.error is not None
        note = f"{self.done} pages, {self.failed} failed"
        await self.ctx.progress(min(self.done / self.expected, 0.99), note)
        return page

    async def _fetch(self, url: str, parsed: httpx.URL, depth: int) -> Page:
        from worker.job_types.html import MAX_TEXT_CHARS, extract  # here: the web process never parses a page

        try:
            refused = await self.robots.verdict(parsed)
            if refused is not None:
                return Page(url=url, depth=depth, error=refused)
            response = await self.ctx.http.get(
                url,
                headers={"accept": ACCEPT},
                timeout_s=self.input.page_timeout_s,
                max_bytes=self.input.max_page_bytes,
            )
        except EgressError as exc:
            return Page(url=url, depth=depth, error=PageError(exc.type, str(exc)))
        page = Page(url=url, depth=depth, final_url=str(response.url), status=response.status_code)
        if response.status_code >= 400:
            page.error = PageError("http_status", f"answered {response.status_code}")
            return page
        kind = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind in ("text/html", "application/xhtml+xml", ""):
            try:
                found = extract(response.text, page.final_url or url)
            except Exception as exc:  # a parser's bug is this page's failure, never the job's traceback
                log.warning("scrape: %s could not be parsed", page.final_url, exc_info=True)
                page.error = PageError("parse_error", f"the page could not be parsed ({type(exc).__name__})")
                return page
            page.title, page.text, page.truncated, page.links = found.title, found.text, found.truncated, found.links
        elif kind.startswith("text/"):
            text = response.text.replace("\x00", "")
            page.text, page.truncated = text[:MAX_TEXT_CHARS], len(text) > MAX_TEXT_CHARS
        return page


def _key(url: str) -> str:
    """A URL as the crawl tells pages apart: without its fragment."""
    return url.partition("#")[0]


async def run(input: Input, ctx: Context) -> Output:
    return await _Crawl(input, ctx).run()


JOB_TYPE = JobType(
    "scrape",
    Input,
    run,
    timeout_s=3_600,
    description="Fetch `urls` (and same-host links, `max_depth` deep) as robots.txt allows: title, text and links.",
)
