"""The header limits of server/protocol.py, against a real web process started as the Procfile starts it, over raw
sockets: a cap on the bytes of a request's header section (431) and on the time it may take to arrive (408)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import Processes, bearer, process_env, rss_kib
from worker import Config

pytestmark = pytest.mark.slow

CAP = Config().max_header_bytes  # the default, which the module's web runs with
MIB = 1_048_576
ANSWER_S = 15.0  # a deadline for an answer that should come at once, not a timing claim


@contextlib.asynccontextmanager
async def web_process(config: Config, logs: Path, **env: str) -> AsyncIterator[Processes]:
    procs = Processes(process_env(config, **env), logs)
    procs.start_web()
    try:
        await procs.ready()
        yield procs
    finally:
        procs.stop()


@pytest.fixture(scope="module")
async def web(config: Config, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Processes]:
    async with web_process(config, tmp_path_factory.mktemp("web")) as procs:
        yield procs


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    def problem(self) -> dict[str, object]:
        assert self.headers["content-type"] == "application/problem+json", self
        problem: dict[str, object] = json.loads(self.body)
        assert problem["status"] == self.status and problem["title"] and problem["detail"], problem
        return problem


class Connection:
    """One raw HTTP/1.1 connection: what is written goes out in the background (the server may answer, and close,
    before it is all sent), answers are read as they come. A plain socket, not asyncio's streams: those drop what
    was received once a write fails, and a server that closes with a request unread makes the next write fail."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.received = sock, b""
        self.sending: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, procs: Processes) -> Connection:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", procs.port))
        return cls(sock)

    def send(self, *parts: bytes | float) -> None:
        """Write `parts` in order, a float being a pause between them."""
        loop = asyncio.get_running_loop()

        async def write() -> None:
            with contextlib.suppress(ConnectionError):
                for part in parts:
                    if isinstance(part, float):
                        await asyncio.sleep(part)
                    else:
                        await loop.sock_sendall(self.sock, part)

        self.sending.append(asyncio.create_task(write()))

    async def _receive(self) -> bytes:
        """The next bytes the server sent; b"" once it has closed (a reset, when it closed with our data unread)."""
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65_536), ANSWER_S)
        except ConnectionResetError:
            return b""

    async def _more(self) -> None:
        if not (more := await self._receive()):
            raise AssertionError(f"the server closed after {self.received!r}")
        self.received += more

    async def _take(self, size: int) -> bytes:
        while len(self.received) < size:
            await self._more()
        taken, self.received = self.received[:size], self.received[size:]
        return taken

    async def answer(self) -> Answer:
        while b"\r\n\r\n" not in self.received:
            await self._more()
        head = await self._take(self.received.index(b"\r\n\r\n") + 4)
        status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        body = await self._take(int(headers.get("content-length", "0")))
        assert status_line.startswith("HTTP/1.1 "), status_line
        return Answer(int(status_line.split()[1]), headers, body)

    async def closed_by_server(self) -> bool:
        """True once the server has closed the connection, with nothing more sent."""
        return self.received == b"" and await self._receive() == b""

    async def close(self) -> None:
        for task in self.sending:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self.sending)
        self.sock.close()


@contextlib.asynccontextmanager
async def connection(procs: Processes) -> AsyncIterator[Connection]:
    conn = await Connection.open(procs)
    try:
        yield conn
    finally:
        await conn.close()


def get(size: int = 0, path: str = "/healthz") -> bytes:
    """A GET whose request line and headers take exactly `size` bytes (at least the bare request's)."""
    bare = f"GET {path} HTTP/1.1\r\nHost: test\r\nX-Pad: \r\n\r\n".encode()
    return bare.replace(b"X-Pad: ", b"X-Pad: " + b"a" * max(0, size - len(bare)))


async def test_a_1_mib_header_answers_431_problem_json_and_closes_the_connection(web: Processes) -> None:
    async with connection(web) as conn:
        conn.send(get(MIB))
        answer = await conn.answer()
        assert answer.status == 431 and answer.headers["connection"] == "close"
        assert answer.problem()["type"] == "/problems/header-too-large"
        assert await conn.closed_by_server()


async def test_a_header_section_of_exactly_the_cap_is_served_and_one_byte_more_is_431(web: Processes) -> None:
    async with connection(web) as conn:
        conn.send(get(CAP))
        assert (await conn.answer()).status == 200
    async with connection(web) as conn:
        conn.send(get(CAP + 1))
        assert (await conn.answer()).status == 431
        assert await conn.closed_by_server()


async def test_a_post_whose_first_write_holds_small_headers_and_a_600_kb_body_is_served(
    web: Processes, api_key: str
) -> None:
    body = json.dumps({"type": "square_sum", "input": {"data": [10_000] * 100_000}}).encode()
    assert len(body) > 600_000
    head = f"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nAuthorization: {bearer(api_key)['Authorization']}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    async with connection(web) as conn:
        conn.send(head.encode() + body)  # one write: the server's first read holds the headers and body both
        answer = await conn.answer()
        assert answer.status == 202, answer
        assert json.loads(answer.body)["status"] == "queued"


async def test_two_keep_alive_requests_each_under_the_cap_are_served_though_together_they_exceed_it(
    web: Processes,
) -> None:
    async with connection(web) as conn:
        for _ in range(2):
            conn.send(get(CAP * 3 // 4))
            answer = await conn.answer()
            assert answer.status == 200 and answer.headers.get("connection") != "close"


async def test_two_pipelined_requests_in_one_write_each_under_the_cap_are_both_served(web: Processes) -> None:
    async with connection(web) as conn:
        conn.send(get(CAP * 3 // 4) + get(CAP * 3 // 4, "/readyz"))
        assert [(await conn.answer()).status for _ in range(2)] == [200, 200]


async def test_20_connections_each_sending_5_mib_of_unfinished_headers_get_431_and_the_web_stays_small(
    web: Processes,
) -> None:
    assert web.web is not None
    before = rss_kib(web.web.pid)

    async def flood() -> None:
        async with connection(web) as conn:
            # 5 MiB of one header value that never ends, in 64 KiB writes, as fast as the server takes them.
            conn.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Pad: ", *[b"a" * 65_536] * 80)
            answer = await conn.answer()
            assert answer.status == 431 and answer.problem()["type"] == "/problems/header-too-large"
            assert await conn.closed_by_server()

    await asyncio.gather(*(flood() for _ in range(20)))
    grown_mib = (rss_kib(web.web.pid) - before) / 1024
    print(f"\nweb RSS grew {grown_mib:.1f} MiB over 20 connections of 5 MiB unfinished headers")
    assert grown_mib < 20
    async with connection(web) as conn:  # and it still serves
        conn.send(get())
        assert (await conn.answer()).status == 200


# -- the header timeout, on a web process of its own with OUTLAST_HEADER_TIMEOUT_S=1 -------------------------------


@pytest.fixture(scope="module")
async def impatient(config: Config, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Processes]:
    async with web_process(config, tmp_path_factory.mktemp("impatient"), OUTLAST_HEADER_TIMEOUT_S="1") as procs:
        yield procs


async def test_headers_that_trickle_in_past_the_timeout_get_408_problem_json_and_the_connection_closes(
    impatient: Processes,
) -> None:
    async with connection(impatient) as conn:
        # A header line every 0.2 s, each well under the size cap, for longer than the timeout.
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\n", *[x for _ in range(50) for x in (0.2, b"X-A: b\r\n")])
        answer = await conn.answer()
        assert answer.status == 408 and answer.headers["connection"] == "close"
        assert answer.problem()["type"] == "/problems/request-timeout"
        assert await conn.closed_by_server()


async def test_a_connection_that_sends_nothing_gets_408_once_the_timeout_passes(impatient: Processes) -> None:
    async with connection(impatient) as conn:
        answer = await conn.answer()
        assert answer.status == 408 and answer.problem()["type"] == "/problems/request-timeout"
        assert await conn.closed_by_server()


async def test_a_keep_alive_connection_idle_past_the_header_timeout_still_serves_its_next_request(
    impatient: Processes,
) -> None:
    """The clock of a later request starts at its first byte; between requests uvicorn's keep-alive (5 s) rules."""
    async with connection(impatient) as conn:
        conn.send(get())
        assert (await conn.answer()).status == 200
        conn.send(1.5, get())  # idle past the 1 s header timeout, within the keep-alive
        assert (await conn.answer()).status == 200
