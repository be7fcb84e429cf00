"""A counting proxy between one process and PostgreSQL: every statement the process sends, exactly, by its text.

    async with counting(database_url) as (url, tally):   the process gets `url`; `tally` counts what it sends
        before = tally.snapshot()
        ...
        sent = tally.snapshot() - before                   statements by text, over that span

It reads only the client's side of the wire protocol (v3): a simple Query is one statement, and so is each Execute
of the extended protocol, named by the text its Bind's prepared statement was parsed from; Syncs are counted as the
round trips they end. Nothing is changed on the way: the server's answers are copied back unread. pg_stat_database
counts transactions, not statements, and lags by up to 10 s per backend; pg_stat_statements must be preloaded at
the server's start; this needs neither, and counts only the process that connects through it.

TLS is refused (the answer `N` to SSLRequest and GSSENCRequest, after which asyncpg's default `prefer` goes on in
the clear), so the proxy reaches only a server that takes plain connections, as the bench's embedded one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import Counter
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from bench.services import free_port

SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102
SYNC = "(sync: round trips)"  # the key Syncs are counted under
READ_CHUNK = 65_536


def _short(query: str) -> str:
    """A statement's text on one line: what a report lists it by."""
    return " ".join(query.split())


class Tally:
    """Statements sent through the proxy since it started, by text (and Syncs under SYNC)."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()

    def snapshot(self) -> Counter[str]:
        return Counter(self.sent)

    @staticmethod
    def statements(sent: Counter[str]) -> int:
        return sum(n for text, n in sent.items() if text != SYNC)


async def _start(reader: asyncio.StreamReader, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> bool:
    """The untyped start: SSL and GSS requests answered here, the startup message passed on. False: a cancel."""
    while True:
        head = await reader.readexactly(8)
        length, code = (int(x) for x in struct.unpack("!ii", head))
        if code in (SSL_REQUEST, GSSENC_REQUEST):
            client.write(b"N")
            continue
        server.write(head + await reader.readexactly(length - 8))
        return code != CANCEL_REQUEST


async def _client_to_server(
    reader: asyncio.StreamReader, client: asyncio.StreamWriter, server: asyncio.StreamWriter, tally: Tally
) -> None:
    if not await _start(reader, client, server):
        return
    parsed: dict[str, str] = {}  # prepared statement name -> its text, on this connection
    bound = ""  # the text of the portal last bound (asyncpg binds the unnamed portal, then executes it)
    while True:
        head = await reader.readexactly(5)
        kind, length = head[:1], int(struct.unpack("!i", head[1:])[0])
        body = await reader.readexactly(length - 4)
        server.write(head + body)
        if kind == b"Q":
            tally.sent[_short(body.split(b"\0", 1)[0].decode(errors="replace"))] += 1
        elif kind == b"P":
            name, query = body.split(b"\0", 2)[:2]
            parsed[name.decode()] = _short(query.decode(errors="replace"))
        elif kind == b"B":
            statement = body.split(b"\0", 2)[1].decode()
            bound = parsed.get(statement, f"(prepared before the count: {statement})")
        elif kind == b"E":
            tally.sent[bound] += 1
        elif kind == b"S":
            tally.sent[SYNC] += 1
        elif kind == b"X":
            return
        if server.transport.get_write_buffer_size() > READ_CHUNK:
            await server.drain()


async def _server_to_client(reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
    while data := await reader.read(READ_CHUNK):
        client.write(data)
        await client.drain()


@contextlib.asynccontextmanager
async def counting(database_url: str) -> AsyncIterator[tuple[str, Tally]]:
    """A proxy to the server `database_url` names, on a free port: the URL to it instead, and its tally."""
    parts = urlsplit(database_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    tally = Tally()
    pipes: set[asyncio.Task[None]] = set()

    async def accept(client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        try:
            server_reader, server = await asyncio.open_connection(host, port)
        except OSError:
            client.close()
            return
        ours = [
            asyncio.create_task(_client_to_server(client_reader, client, server, tally)),
            asyncio.create_task(_server_to_client(server_reader, client)),
        ]
        pipes.update(ours)
        try:
            # Either side ending ends the connection: a client's Terminate, the server closing, a reset.
            await asyncio.wait(ours, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in ours:
                task.cancel()
            await asyncio.gather(*ours, return_exceptions=True)
            pipes.difference_update(ours)
            for writer in (client, server):
                writer.close()

    listen = free_port()
    proxy = await asyncio.start_server(accept, "127.0.0.1", listen)
    userinfo = parts.netloc.rpartition("@")[0]
    url = parts._replace(netloc=f"{userinfo}@127.0.0.1:{listen}" if userinfo else f"127.0.0.1:{listen}").geturl()
    try:
        yield url, tally
    finally:
        proxy.close()
        for task in list(pipes):
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        await proxy.wait_closed()
