"""`ctx.http`: a job's own HTTP requests, through the same SSRF guard as webhooks, with a circuit breaker per host.

    await ctx.http.get(url)
      ─▶ UrlGuard.check (worker/webhooks/ssrf.py): every address the name resolves to must be allowed, else
         ForbiddenAddress and no connection at all
      ─▶ the host's circuit: open (N failures in a row, less than the cool-down ago): CircuitOpen, no connection
      ─▶ send_pinned: to a checked address, the name in Host and SNI, so a second DNS answer can't swap it
      ─▶ the body, read up to max_bytes (TooLarge past it, or as soon as Content-Length says so)
      ─▶ a redirect: its Location is a new hop, checked again from the top, up to max_redirects
    all of it within timeout_s, DNS to the last byte of the last hop (EgressTimeout)

Every failure is a JobError with a named `type` (forbidden_address, too_large, timeout, circuit_open, ...): a job
that does not catch one fails with it, never with a traceback. The policy is the deployment's OUTLAST_EGRESS_*
(worker/config.py), not the callbacks': a private network opened to webhook receivers stays closed to jobs' code.

One `Egress` per worker process (`shared`), closed with the worker: one httpx client whose connections are pooled
per (scheme, host name, address, port), so that a connection opened, and its certificate checked, for one name never
carries a request for another name on the same address. Each job gets an `Http` view of it that writes what the
circuits do to the job's own log.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import httpx
import msgspec

from worker import tracing
from worker.config import Config
from worker.job import JobError, LogLevel
from worker.webhooks.ssrf import DEFAULT_PORTS, Forbidden, Resolver, UrlGuard, send_pinned, system_resolver

log = logging.getLogger("outlast.egress")
USER_AGENT: Final = "Outlast/0.1 (+https://github.com/outlast; a job's request)"
REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS: Final = 10
MAX_POOLS: Final = 512  # idle pools past this many (host, address) pairs are closed, least recently used first
LogLine = Callable[[LogLevel, str], None]


# -- what a request can fail with ----------------------------------------------------------------------------------


class EgressError(JobError):
    """A request through ctx.http failed; `type` names how."""

    type = "egress_error"


class ForbiddenAddress(EgressError):
    """The URL, or an address its host resolves to, is not one Outlast connects to: nothing was sent."""

    type = "forbidden_address"


class TooLarge(EgressError):
    type = "too_large"


class TooManyRedirects(EgressError):
    type = "too_many_redirects"


class EgressTimeout(EgressError):
    type = "timeout"
    retryable = True


class CircuitOpen(EgressError):
    """The host failed too often in a row lately: skipped without a connection until its cool-down is over."""

    type = "circuit_open"
    retryable = True


class ConnectFailed(EgressError):
    type = "connect_error"
    retryable = True


class TransportFailed(EgressError):
    """The connection broke, or the peer did not speak HTTP."""

    type = "transport_error"
    retryable = True


# -- the circuit breaker -------------------------------------------------------------------------------------------


@dataclass
class _Circuit:
    failures: int = 0  # in a row
    open_until: float | None = None  # set: open until then, half-open after
    trying: bool = False  # half-open: its one trial request is under way


class Breaker:
    """Per host: after `failures` failures in a row the host is skipped for `cooldown_s`; then one request tries it
    (half-open), and its outcome closes the circuit or opens it again. Each method returns the line that says what
    changed, if anything did, for the job's log. A failure is a request that got no answer or a 5xx; any other
    answer closes the circuit."""

    def __init__(
        self, failures: int, cooldown_s: float, *, clock: Callable[[], float] = time.monotonic, max_hosts: int = 10_000
    ) -> None:
        self.failures, self.cooldown_s, self.clock, self.max_hosts = failures, cooldown_s, clock, max_hosts
        self._circuits: dict[str, _Circuit] = {}

    def admit(self, host: str) -> tuple[bool, str | None]:
        """(whether a request to `host` may go now, the change to log)."""
        circuit = self._circuits.get(host)
        if circuit is None or circuit.open_until is None:
            return True, None
        if circuit.trying or self.clock() < circuit.open_until:
            return False, None
        circuit.trying = True
        return True, f"circuit for {host} half-open: letting one request try it"

    def left_s(self, host: str) -> float:
        circuit = self._circuits.get(host)
        if circuit is None or circuit.open_until is None:
            return 0.0
        return max(0.0, circuit.open_until - self.clock())

    def succeeded(self, host: str) -> str | None:
        circuit = self._circuits.pop(host, None)
        if circuit is not None and circuit.open_until is not None:
            return f"circuit for {host} closed: it answered again"
        return None

    def failed(self, host: str, why: str) -> str | None:
        circuit = self._circuits.get(host)
        if circuit is None:
            if len(self._circuits) >= self.max_hosts:  # a bound on memory: the oldest entry goes
                self._circuits.pop(next(iter(self._circuits)))
            circuit = self._circuits[host] = _Circuit()
        circuit.failures += 1
        if circuit.trying:
            circuit.trying, circuit.open_until = False, self.clock() + self.cooldown_s
            return f"circuit for {host} open again: the trial request {why}; skipping it for {self.cooldown_s:g} s"
        if circuit.open_until is None and circuit.failures >= self.failures:
            circuit.open_until = self.clock() + self.cooldown_s
            return (
                f"circuit for {host} open: {circuit.failures} failures in a row, the last one {why};"
                f" skipping it for {self.cooldown_s:g} s"
            )
        return None

    def released(self, host: str) -> None:
        """A request ended with no verdict on the host (cancelled): a trial it was lets another one try."""
        circuit = self._circuits.get(host)
        if circuit is not None:
            circuit.trying = False


# -- the process's client ------------------------------------------------------------------------------------------


class _Pools(httpx.AsyncBaseTransport):
    """A connection pool per (scheme, host name, address, port) of the pinned request; idle ones are closed, least
    recently used first, past `MAX_POOLS`."""

    def __init__(self, verify: ssl.SSLContext | bool) -> None:
        self._verify = verify
        self._pools: OrderedDict[tuple[str, str, str, int], httpx.AsyncHTTPTransport] = OrderedDict()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        key = (url.scheme, request.headers.get("host", ""), url.host, url.port or DEFAULT_PORTS[url.scheme])
        pool = self._pools.pop(key, None)
        if pool is None:
            limits = httpx.Limits(max_connections=16, max_keepalive_connections=4, keepalive_expiry=30.0)
            pool = httpx.AsyncHTTPTransport(verify=self._verify, trust_env=False, limits=limits)
        self._pools[key] = pool
        if len(self._pools) > MAX_POOLS:
            await self._evict()
        return await pool.handle_async_request(request)

    async def _evict(self) -> None:
        for key, pool in list(self._pools.items())[: len(self._pools) - MAX_POOLS]:
            if all(connection.is_idle() for connection in pool._pool.connections):  # never one a request is using
                del self._pools[key]
                await pool.aclose()

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            await pool.aclose()


class Egress:
    """What every job's ctx.http shares in one process: the guard, the pooled client and the circuits."""

    def __init__(
        self,
        config: Config,
        *,
        resolver: Resolver = system_resolver,
        verify: ssl.SSLContext | bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.guard = guard(config, resolver)
        self.breaker = Breaker(config.egress_breaker_failures, config.egress_breaker_cooldown_s, clock=clock)
        self.client = httpx.AsyncClient(
            transport=_Pools(verify),
            timeout=config.egress_timeout_s,
            follow_redirects=False,  # followed here, each hop checked again
            trust_env=False,  # a proxy from the environment would connect where the guard never looked
            headers={"user-agent": USER_AGENT},
        )
        self.loop = asyncio.get_running_loop()

    def for_job(self, log_line: LogLine = lambda level, message: None) -> Http:
        async def this() -> Egress:
            return self

        return Http(this, log_line)

    async def aclose(self) -> None:
        await self.client.aclose()


def guard(config: Config, resolver: Resolver = system_resolver) -> UrlGuard:
    """The deployment's guard for jobs' requests; a bad setting stops the worker's start, naming its variable."""
    return UrlGuard.of(
        ("OUTLAST_EGRESS_ALLOWED_NETWORKS", config.egress_allowed_networks),
        ("OUTLAST_EGRESS_PORTS", config.egress_ports),
        allow_http=config.egress_allow_http,
        resolve_timeout_s=config.egress_timeout_s,
        resolver=resolver,
    )


_shared: Egress | None = None


async def shared(config: Config) -> Egress:
    """The process's Egress, made at its first use. A new event loop or another Config (tests) gets a new one: the
    old one's connections belong to its loop."""
    global _shared
    if _shared is not None and (_shared.loop is not asyncio.get_running_loop() or _shared.config != config):
        old, _shared = _shared, None
        if old.loop is asyncio.get_running_loop():
            await old.aclose()
    if _shared is None:
        _shared = Egress(config)
    return _shared


async def aclose() -> None:
    """Close the process's Egress (the worker's shutdown)."""
    global _shared
    old, _shared = _shared, None
    if old is not None and old.loop is asyncio.get_running_loop():
        await old.aclose()


def for_job(config: Config, log_line: LogLine) -> Http:
    """The ctx.http of one job attempt: the process's Egress, writing the circuits' changes to that job's log."""
    return Http(partial(shared, config), log_line)


async def _unattached() -> Egress:
    raise RuntimeError("this Context was made without a worker: it has no ctx.http")


def unattached() -> Http:
    return Http(_unattached, lambda level, message: None)


# -- one job's view ------------------------------------------------------------------------------------------------


class Http:
    """ctx.http: `get`, `post`, `head` and `request`, as httpx's client has them, answering a complete
    httpx.Response (its body read, at most `max_bytes`; `url` the final one, `history` the redirects)."""

    def __init__(self, egress: Callable[[], Awaitable[Egress]], log_line: LogLine) -> None:
        self._egress, self._log = egress, log_line
        self._told: set[str] = set()  # hosts this job was told are skipped: once each

    async def get(self, url: str, **options: Any) -> httpx.Response:
        return await self.request("GET", url, **options)

    async def head(self, url: str, **options: Any) -> httpx.Response:
        return await self.request("HEAD", url, **options)

    async def post(self, url: str, **options: Any) -> httpx.Response:
        return await self.request("POST", url, **options)

    async def request(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        json: Any = None,
        timeout_s: float | None = None,
        max_bytes: int | None = None,
        follow_redirects: bool = True,
        max_redirects: int = MAX_REDIRECTS,
    ) -> httpx.Response:
        """One request, redirects followed (each hop through the guard again) unless asked not to. Raises an
        EgressError (a JobError with a named `type`) for anything but an answer; a 4xx or 5xx is an answer."""
        egress = await self._egress()
        config = egress.config
        limit = config.egress_max_bytes if max_bytes is None else max_bytes
        within = config.egress_timeout_s if timeout_s is None else timeout_s
        sent = {name.lower(): value for name, value in (headers or {}).items()}
        if json is not None:
            content = msgspec.json.encode(json)
            sent.setdefault("content-type", "application/json")
        text = str(httpx.URL(str(url), params=params) if params else url)
        history: list[httpx.Response] = []
        hop = _Hop()
        try:
            async with asyncio.timeout(within):
                while True:
                    response = await self._hop(egress, hop, method, text, sent, content, limit, history)
                    location = response.headers.get("location")
                    if not follow_redirects or response.status_code not in REDIRECTS or location is None:
                        return response
                    if len(history) >= max_redirects:
                        raise TooManyRedirects(f"{_shown(text)}: more than {max_redirects} redirects")
                    history.append(response)
                    method, text, sent, content = _redirected(response, location, method, sent, content)
        except TimeoutError:
            if hop.host is not None:  # the deadline cut a request short: the host did not answer in time
                self._note(egress.breaker.failed(hop.host, "timed out"))
                hop.host = None
            raise EgressTimeout(f"{_shown(text)}: no complete answer within {within:g} s") from None
        finally:
            if hop.host is not None:  # no verdict on the host (cancelled, or a bug): a trial it was lets another try
                egress.breaker.released(hop.host)

    async def _hop(
        self,
        egress: Egress,
        hop: _Hop,
        method: str,
        url: str,
        headers: Mapping[str, str],
        content: bytes | None,
        limit: int,
        history: list[httpx.Response],
    ) -> httpx.Response:
        shown = _shown(url)
        try:
            target = await egress.guard.check(url)
        except Forbidden as exc:
            log.info("ctx.http to %s refused: %s", shown, exc.detail)  # what it resolved to: the worker's log only
            raise ForbiddenAddress(f"{shown} refused: {exc}") from None
        host = f"{target.host}:{target.url.port or DEFAULT_PORTS[target.url.scheme]}"
        admitted, change = egress.breaker.admit(host)
        self._note(change)
        if not admitted:
            left = egress.breaker.left_s(host)
            if host not in self._told:
                self._told.add(host)
                self._log("warning", f"skipping {host}: its circuit is open (about {left:.0f} s more)")
            raise CircuitOpen(f"{shown}: {host} is skipped for about {left:.0f} s more after failing repeatedly")
        hop.host = host
        with tracing.outgoing(method, url, name=f"ctx.http {method}") as traced:
            try:
                raw = await send_pinned(egress.client, method, target, headers={**headers, **traced}, content=content)
            except httpx.TimeoutException:
                raise self._failed(egress, hop, "timed out", EgressTimeout(f"{shown}: no answer in time")) from None
            except httpx.ConnectError as exc:
                why = f"could not connect ({exc})"
                raise self._failed(egress, hop, why, ConnectFailed(f"{shown}: {why}")) from None
            except (httpx.TransportError, OSError) as exc:
                why = f"broke off ({type(exc).__name__}: {exc})"
                raise self._failed(egress, hop, why, TransportFailed(f"{shown}: {why}")) from None
            try:
                body = await _read(raw, limit, shown)
            except TooLarge:
                self._note(egress.breaker.succeeded(host))  # it answered: the cap is this request's, not the host's
                hop.host = None
                tracing.answered(raw.status_code, error="too large")
                raise
            except httpx.TimeoutException:
                slow = EgressTimeout(f"{shown}: the body came too slowly")
                raise self._failed(egress, hop, "timed out", slow) from None
            except (httpx.TransportError, OSError) as exc:
                why = f"broke off in the body ({type(exc).__name__}: {exc})"
                raise self._failed(egress, hop, why, TransportFailed(f"{shown}: {why}")) from None
            finally:
                await raw.aclose()
            tracing.answered(raw.status_code)
        hop.host = None
        self._note(
            egress.breaker.failed(host, f"answered {raw.status_code}")
            if raw.status_code >= 500
            else egress.breaker.succeeded(host)
        )
        kept = [(k, v) for k, v in raw.headers.multi_items() if k not in ("content-encoding", "content-length")]
        request = httpx.Request(method, target.url, headers=headers)
        return httpx.Response(raw.status_code, headers=kept, content=body, request=request, history=list(history))

    def _failed(self, egress: Egress, hop: _Hop, why: str, error: EgressError) -> EgressError:
        assert hop.host is not None
        self._note(egress.breaker.failed(hop.host, why))
        hop.host = None
        tracing.answered(None, error=str(error))
        return error

    def _note(self, change: str | None) -> None:
        if change is not None:
            log.info("ctx.http: %s", change)
            self._log("warning" if " open" in change else "info", change)


def _redirected(
    response: httpx.Response, location: str, method: str, headers: dict[str, str], content: bytes | None
) -> tuple[str, str, dict[str, str], bytes | None]:
    """The next hop's (method, URL, headers, body), as browsers and httpx follow a redirect."""
    following = response.url.join(location)
    if following.host != response.url.host:  # credentials are for the host they were given to
        headers = {k: v for k, v in headers.items() if k not in ("authorization", "cookie")}
    if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
        method, content = ("HEAD" if method == "HEAD" else "GET"), None
        headers = {k: v for k, v in headers.items() if k not in ("content-type", "content-length")}
    return method, str(following), headers, content


class _Hop:
    """The host of the request under way, while its outcome is not yet the breaker's."""

    __slots__ = ("host",)

    def __init__(self) -> None:
        self.host: str | None = None


async def _read(raw: httpx.Response, limit: int, shown: str) -> bytes:
    """The body, decoded, or TooLarge once it passes `limit` bytes (at once when Content-Length says it will)."""
    declared = raw.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"{shown}: the body is {int(declared)} bytes, over the cap of {limit}")
    chunks, size = [], 0
    async for chunk in raw.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"{shown}: the body is over the cap of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _shown(url: str) -> str:
    """A URL as an error or a log line may show it: no user, password or query (where tokens travel)."""
    try:
        return tracing.shown_url(url)[:300]
    except ValueError:
        return "the URL"
