"""Webhook receivers for the tests: a tiny HTTP/1.1 server on a loopback address that records every
connection and request and answers what the test scripts, and a fake DNS an attacker would run."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
from starlette.applications import Starlette

from server.app import create_app
from tests.conftest import bearer, free_port
from tests.engine import deliver_due
from worker import Config, Deps, UrlGuard
from worker.webhooks.deliver import Sender, secrets_in_force


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names lowercased
    body: bytes


def answer(status: int, headers: Mapping[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", "content-length: 0", "connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


Answer = Callable[[Received, int], Awaitable[bytes]]  # (the request, how many came before it) -> the response


async def ok(request: Received, before: int) -> bytes:
    return answer(204)


def fail_first(k: int, status: int = 500) -> Answer:
    async def script(request: Received, before: int) -> bytes:
        return answer(status if before < k else 204)

    return script


@dataclass
class Receiver:
    """An HTTP server on `host`, answering each request with `script`; `ssl` makes it https."""

    script: Answer = ok
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    ssl: ssl.SSLContext | None = None
    connections: int = 0
    requests: list[Received] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://{self.host}:{self.port}/hooks"

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, ssl=self.ssl)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ", 2)
            headers = dict((k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in head[1:] if h))
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = Received(method, path, headers, body)
            before = len(self.requests)
            self.requests.append(request)
            writer.write(await self.script(request, before))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


class DribblingReceiver(Receiver):
    """A hostile receiver: a status line, then one header byte every 0.2 s, forever. Each read arrives well
    within any per-read timeout; only a deadline on the whole attempt ends it."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            self.requests.append(Received("POST", head.split(" ")[1], {}, b""))
            writer.write(b"HTTP/1.1 200 OK\r\nx-slow: ")
            while True:
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(b"a")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


@dataclass
class FakeDNS:
    """A resolver that answers from a table the test controls (and may change between two lookups)."""

    table: dict[str, Sequence[str]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        if host not in self.table:
            raise OSError(f"[Errno -2] Name or service not known: {host}")
        return self.table[host]


# -- fixtures (imported by the test modules that use them) ------------------------------------------


@dataclass
class Hooks:
    """A deployment that allows 127.0.0.1 and plain http, with the fake DNS behind both its guards: the
    web app's (submit) and the delivery Sender's."""

    deps: Deps
    client: httpx.AsyncClient
    app: Starlette
    sender: Sender
    dns: FakeDNS

    async def submit(self, type: str, input: dict[str, Any], **extra: Any) -> str:
        response = await self.client.post("/v1/jobs", json={"type": type, "input": input, **extra})
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    async def deliver(self) -> int:
        """One pass of the delivery worker: every due delivery gets one attempt."""
        return await deliver_due(self.deps, self.sender)

    async def make_due(self) -> None:
        """As if the schedule's wait had passed."""
        await self.deps.db.execute("UPDATE webhook_deliveries SET next_try_at = now() WHERE status = 'pending'")

    async def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        response = await self.client.get(f"/v1/jobs/{job_id}/deliveries")
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def secret(self) -> str:
        """The default tenant's current signing secret."""
        return (await secrets_in_force(self.deps.db, "default", self.deps.config.webhook_secret))[0][0]


@pytest.fixture
def hooks_config(config: Config) -> Config:
    return msgspec.structs.replace(
        config,
        allowed_callback_networks="127.0.0.1/32",
        allow_http_callbacks=True,
        callback_ports="443,1024-65535",
        webhook_timeout_s=2.0,
    )


@pytest.fixture
async def hooks(hooks_config: Config, deps: Deps, api_key: str) -> AsyncIterator[Hooks]:
    dns = FakeDNS()
    guard = UrlGuard.from_config(hooks_config, resolver=dns)
    app = create_app(hooks_config, resolver=dns)
    sender = Sender(guard, timeout_s=hooks_config.webhook_timeout_s)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=bearer(api_key)) as client:
            try:
                yield Hooks(
                    dataclasses.replace(deps, config=hooks_config),
                    client,
                    app,
                    sender,
                    dns,
                )
            finally:
                await sender.aclose()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A receiver on 127.0.0.1 (the one allowed address), answering 204 unless a test scripts it."""
    server = await Receiver().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def canaries() -> AsyncIterator[list[Receiver]]:
    """Listeners on 127.0.0.2-5 (Linux routes all of 127/8 to lo), one port: any connection is a leak."""
    port = free_port()
    servers = [await Receiver(host=f"127.0.0.{i}", port=port).start() for i in range(2, 6)]
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()
