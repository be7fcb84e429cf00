"""ctx.http (worker/egress.py): a job's requests go through the webhooks' SSRF guard, pinned to the checked address,
each redirect checked again, bounded in size and time, with a circuit breaker per host whose changes reach the
job's log; and they carry the job's trace context when tracing is on. Nothing reaches the canaries on 127.0.0.2-5."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.conftest import free_port
from tests.receivers import DribblingReceiver, FakeDNS, Received, Receiver, answer
from worker import Config, egress, tracing
from worker.egress import (
    CircuitOpen,
    ConnectFailed,
    Egress,
    EgressTimeout,
    ForbiddenAddress,
    Http,
    TooLarge,
    TooManyRedirects,
)
from worker.job import LogLevel

# Loopback's 127.0.0.1 only, and unprivileged ports: the canaries on 127.0.0.2-5 stay forbidden.
CONFIG = Config(egress_allowed_networks="127.0.0.1/32", egress_ports="1024-65535", egress_breaker_failures=2)


def page(status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, length: bool = True) -> bytes:
    """A response that closes its connection; without `length` the body runs to the close (no Content-Length)."""
    lines = [f"HTTP/1.1 {status} X", "connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if length:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(list[tuple[LogLevel, str]]):
    """What a job's log got."""

    def __call__(self, level: LogLevel, message: str) -> None:
        self.append((level, message))

    def text(self) -> str:
        return "\n".join(message for _, message in self)


@pytest.fixture
async def dns() -> FakeDNS:
    return FakeDNS({"site.test": ["127.0.0.1"], "evil.test": ["127.0.0.3"], "mixed.test": ["127.0.0.1", "127.0.0.4"]})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def shared_egress(dns: FakeDNS, clock: Clock) -> AsyncIterator[Egress]:
    made = Egress(CONFIG, resolver=dns, clock=clock)
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
def lines() -> Lines:
    return Lines()


@pytest.fixture
def http(shared_egress: Egress, lines: Lines) -> Http:
    return shared_egress.for_job(lines)


async def serve(script: dict[str, bytes]) -> Receiver:
    async def answer_path(request: Received, before: int) -> bytes:
        return script.get(request.path, page(404))

    return await Receiver(answer_path).start()


async def test_a_request_reaches_an_allowed_address_by_name_with_the_name_in_host(http: Http) -> None:
    site = await serve({"/": page(200, b"hello", {"content-type": "text/plain"})})
    try:
        response = await http.get(f"http://site.test:{site.port}/")
    finally:
        await site.stop()
    assert (response.status_code, response.text) == (200, "hello")
    assert str(response.url) == f"http://site.test:{site.port}/"  # the name, never the pinned address
    assert site.requests[0].headers["host"] == f"site.test:{site.port}"


class KeepAlive(Receiver):
    """A server that keeps each connection open for as many requests as the client sends on it."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, path, _ = head[0].split(" ", 2)
                headers = dict((k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in head[1:] if h))
                self.requests.append(Received(method, path, headers, b""))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


async def test_a_connection_is_reused_for_its_own_name_only_never_for_another_name_on_the_same_address(
    http: Http, dns: FakeDNS
) -> None:
    dns.table["alias.test"] = ["127.0.0.1"]
    server = await KeepAlive().start()
    try:
        for _ in range(3):
            assert (await http.get(f"http://site.test:{server.port}/")).text == "ok"
        reused = server.connections
        await http.get(f"http://alias.test:{server.port}/")  # same address: a connection of its own
        await http.get(f"http://site.test:{server.port}/")
    finally:
        await server.stop()
    assert (reused, server.connections) == (1, 2)
    assert [r.headers["host"].partition(":")[0] for r in server.requests] == ["site.test"] * 3 + [
        "alias.test",
        "site.test",
    ]


async def test_a_forbidden_address_fails_the_request_and_nothing_connects(
    http: Http, canaries: list[Receiver], dns: FakeDNS
) -> None:
    port = canaries[0].port
    urls = [
        f"http://127.0.0.2:{port}/",  # loopback outside the allowed 127.0.0.1/32
        f"http://evil.test:{port}/",  # a name that resolves there
        f"http://mixed.test:{port}/",  # one allowed answer and one not: every answer must pass
        f"http://[::ffff:127.0.0.5]:{port}/",  # IPv4 hidden in IPv6
        f"http://2130706436:{port}/",  # a decimal spelling of 127.0.0.4
        "http://169.254.169.254:8080/latest/meta-data/",  # the cloud metadata address
        "file:///etc/passwd",
        f"http://127.0.0.1:{port}\\@evil.test/",
    ]
    for url in urls:
        with pytest.raises(ForbiddenAddress) as refused:
            await http.get(url)
        assert refused.value.type == "forbidden_address" and not refused.value.retryable
    assert [canary.connections for canary in canaries] == [0, 0, 0, 0]


async def test_a_redirect_to_a_forbidden_address_is_refused_at_that_hop_and_never_connected(
    http: Http, canaries: list[Receiver]
) -> None:
    site = await serve({"/away": page(302, headers={"location": f"http://127.0.0.2:{canaries[0].port}/x"})})
    try:
        with pytest.raises(ForbiddenAddress, match=r"127\.0\.0\.2"):
            await http.get(f"http://127.0.0.1:{site.port}/away")
    finally:
        await site.stop()
    assert len(site.requests) == 1 and canaries[0].connections == 0


async def test_redirects_are_followed_hop_by_hop_to_the_final_url(http: Http) -> None:
    site = await serve(
        {"/a": page(301, headers={"location": "/b"}), "/b": page(303, headers={"location": "c"}), "/c": page(200, b"c")}
    )
    try:
        response = await http.post(f"http://site.test:{site.port}/a", json={"x": 1})
        with pytest.raises(TooManyRedirects):
            await http.get(f"http://site.test:{site.port}/a", max_redirects=1)
    finally:
        await site.stop()
    assert (response.status_code, response.content, str(response.url)) == (200, b"c", f"http://site.test:{site.port}/c")
    assert [r.status_code for r in response.history] == [301, 303]
    assert [(r.method, r.path) for r in site.requests[:3]] == [("POST", "/a"), ("GET", "/b"), ("GET", "/c")]
    assert site.requests[0].body == b'{"x":1}' and site.requests[1].body == b""


async def test_a_body_over_the_cap_fails_too_large_whether_declared_or_streamed(http: Http) -> None:
    site = await serve({"/declared": page(200, b"x" * 5000), "/streamed": page(200, b"y" * 5000, length=False)})
    try:
        for path in ("/declared", "/streamed"):
            with pytest.raises(TooLarge) as over:
                await http.get(f"http://site.test:{site.port}{path}", max_bytes=4096)
            assert over.value.type == "too_large"
        assert (await http.get(f"http://site.test:{site.port}/streamed", max_bytes=5000)).content == b"y" * 5000
    finally:
        await site.stop()


async def test_a_receiver_that_never_finishes_fails_with_timeout_not_a_hang(http: Http) -> None:
    slow = await DribblingReceiver().start()
    try:
        with pytest.raises(EgressTimeout) as late:
            await http.get(f"http://127.0.0.1:{slow.port}/", timeout_s=0.5)
    finally:
        await slow.stop()
    assert late.value.type == "timeout" and late.value.retryable


async def test_a_host_failing_n_times_in_a_row_is_skipped_until_its_cool_down_then_one_trial_closes_it(
    http: Http, lines: Lines, clock: Clock, shared_egress: Egress
) -> None:
    site = await Receiver(lambda request, before: _after(2, before)).start()
    url = f"http://site.test:{site.port}/"
    try:
        assert [(await http.get(url)).status_code for _ in range(2)] == [503, 503]  # answers, counted as failures
        assert "circuit for site.test:" in lines.text() and "open: 2 failures in a row" in lines.text()
        with pytest.raises(CircuitOpen) as skipped:
            await http.get(url)
        assert skipped.value.retryable and len(site.requests) == 2  # skipped: no connection was made
        another_job = shared_egress.for_job(Lines())  # the circuit is the process's, not one job's
        with pytest.raises(CircuitOpen):
            await another_job.get(url)
        clock.now += CONFIG.egress_breaker_cooldown_s
        assert (await http.get(url)).status_code == 204  # the one trial, answered: closed
        assert (await http.get(url)).status_code == 204
    finally:
        await site.stop()
    assert "half-open" in lines.text() and "closed: it answered again" in lines.text()
    assert len(site.requests) == 4


async def _after(k: int, before: int) -> bytes:
    return answer(503 if before < k else 204)


async def test_connection_failures_count_toward_the_circuit_and_a_failed_trial_opens_it_again(
    http: Http, lines: Lines, clock: Clock
) -> None:
    url = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    for _ in range(2):
        with pytest.raises(ConnectFailed):
            await http.get(url)
    with pytest.raises(CircuitOpen):
        await http.get(url)
    clock.now += CONFIG.egress_breaker_cooldown_s
    with pytest.raises(ConnectFailed):
        await http.get(url)  # the trial
    with pytest.raises(CircuitOpen):
        await http.get(url)
    assert "open again: the trial request could not connect" in lines.text()


async def test_with_tracing_on_a_request_carries_the_current_trace_and_is_a_client_span_of_it(
    http: Http, spans: InMemorySpanExporter
) -> None:
    site = await serve({"/": page(200)})
    try:
        with tracing.incoming("POST", "/v1/jobs", {}):
            await http.get(f"http://site.test:{site.port}/?token=secret")
    finally:
        await site.stop()
    (client,) = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    (server,) = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    sent = site.requests[0].headers["traceparent"].split("-")
    assert sent[1:3] == [f"{client.context.trace_id:032x}", f"{client.context.span_id:016x}"]
    assert client.attributes is not None and client.attributes["url.full"] == f"http://site.test:{site.port}/"


async def test_without_tracing_a_request_carries_no_trace_context(http: Http) -> None:
    site = await serve({"/": page(200)})
    try:
        await http.get(f"http://site.test:{site.port}/")
    finally:
        await site.stop()
    assert "traceparent" not in site.requests[0].headers


async def test_one_egress_per_process_and_config_closed_on_shutdown() -> None:
    first = await egress.shared(CONFIG)
    assert await egress.shared(CONFIG) is first
    changed = msgspec.structs.replace(CONFIG, egress_timeout_s=5.0)
    second = await egress.shared(changed)
    assert second is not first and first.client.is_closed
    await egress.aclose()
    assert second.client.is_closed


def test_a_bad_egress_setting_stops_the_start_naming_its_variable() -> None:
    with pytest.raises(SystemExit, match="OUTLAST_EGRESS_PORTS"):
        egress.guard(Config(egress_ports="80,99999"))
    with pytest.raises(SystemExit, match="OUTLAST_EGRESS_ALLOWED_NETWORKS"):
        egress.guard(Config(egress_allowed_networks="10.0.0.0/33"))


async def test_a_context_made_without_a_worker_says_so_at_its_first_request() -> None:
    from worker.job import Context

    ctx = Context(job_id=None, attempt=1, max_attempts=1, _report=lambda progress: None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="without a worker"):
        await ctx.http.get("https://example.com/")
