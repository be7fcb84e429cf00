"""For event-stream tests: a real uvicorn server in the test's own event loop, and a small SSE reader.

httpx's ASGITransport buffers a whole response, so a stream that follows a live job needs a real server; running
it in this loop lets a test look at the app's own state (its hub, its pool) while clients stream over TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import uvicorn
from starlette.applications import Starlette

from server.app import create_app
from tests.conftest import bearer, eventually, free_port
from worker import Config, keys


@dataclass(frozen=True)
class Frame:
    """One SSE event (`event` is "comment" for a comment line)."""

    event: str
    data: Any = None
    id: int | None = None
    retry: int | None = None


@dataclass
class Live:
    app: Starlette
    url: str
    server: uvicorn.Server
    key: str  # an API key of tenant `default`

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(30.0), headers=bearer(self.key), **kwargs)

    async def open_stream(self, job_id: str, *, last_event_id: int | None = None) -> RawStream:
        return await RawStream.open(self.url, job_id, key=self.key, last_event_id=last_event_id)


@contextlib.asynccontextmanager
async def live_server(config: Config) -> AsyncIterator[Live]:
    # Tests open hundreds of streams with one key: the per-key stream limit has its own tests.
    if config.max_streams_per_key == Config().max_streams_per_key:
        config = msgspec.structs.replace(config, max_streams_per_key=100_000)
    app = create_app(config)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, http="httptools", log_config=None, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())

    async def started() -> bool | None:
        if serving.done():
            serving.result()  # a failed start fails the test here, with its own error
        return server.started or None

    await eventually(started)
    try:
        yield Live(app, f"http://127.0.0.1:{port}", server, await keys.create(app.state.web.deps.db, "default", "live"))
    finally:
        server.should_exit = True
        await serving


def parse(lines: list[str]) -> Frame:
    fields: dict[str, str] = {}
    comment = None
    for line in lines:
        if line.startswith(":"):
            comment = line[1:].strip()
            continue
        name, _, value = line.partition(":")
        fields[name] = fields.get(name, "") + value.removeprefix(" ")
    if comment is not None and not fields:
        return Frame("comment", comment)
    data = msgspec.json.decode(fields["data"]) if "data" in fields else None
    return Frame(
        fields.get("event", "message"),
        data,
        int(fields["id"]) if "id" in fields else None,
        int(fields["retry"]) if "retry" in fields else None,
    )


async def frames(response: httpx.Response) -> AsyncIterator[Frame]:
    """The frames of an open event stream, comments included, until the server ends it."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if line:
            lines.append(line)
        elif lines:
            yield parse(lines)
            lines = []


async def read_stream(client: httpx.AsyncClient, job_id: str, *, last_event_id: int | None = None) -> list[Frame]:
    """A whole stream, up to the server's end of it, without comments."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        return [f async for f in frames(response) if f.event != "comment"]


class RawStream:
    """An event stream over a bare socket, for tests that open many and end them rudely or politely."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(
        cls, url: str, job_id: str, *, key: str = "", last_event_id: int | None = None, path: str = ""
    ) -> RawStream:
        """A stream of `job_id`'s events, or of `path` (e.g. a Job's `links.events`) when given."""
        stream, head = await cls.request(url, path or f"/v1/jobs/{job_id}/events", key=key, last_event_id=last_event_id)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"transfer-encoding: chunked" in head.lower()
        return stream

    @classmethod
    async def request(
        cls, url: str, path: str, *, key: str = "", last_event_id: int | None = None
    ) -> tuple[RawStream, bytes]:
        """GET `path`: the connection, and the head of the answer (whatever its status)."""
        host, _, port = url.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        resume = "" if last_event_id is None else f"Last-Event-ID: {last_event_id}\r\n"
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}{resume}\r\n".encode())
        await writer.drain()
        return cls(reader, writer), await reader.readuntil(b"\r\n\r\n")

    async def next_frame(self) -> Frame | None:
        """The next event (comments skipped); None when the server ended the stream."""
        while True:
            text = await self._chunk()
            if text is None:
                return None
            frame = parse(text.splitlines())
            if frame.event != "comment":
                return frame

    async def _chunk(self) -> str | None:
        # uvicorn writes each event as one chunk of the chunked body; a zero-size chunk ends it.
        size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
        body = await self.reader.readexactly(size + 2)
        return None if size == 0 else body[:-2].decode()

    def reset(self) -> None:
        """Close with a TCP RST, as a crashed client or a dropped network does."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        """Close politely (FIN)."""
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def rest(self) -> list[Frame]:
        """Every event up to the server's end of the stream."""
        found = []
        while (frame := await self.next_frame()) is not None:
            found.append(frame)
        await self.close()
        return found
