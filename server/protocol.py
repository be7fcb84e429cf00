"""The web's HTTP/1.1 protocol: uvicorn's httptools one, with a cap on the size of a request's header section
(request line and headers) and on the time it may take to arrive.

httptools has neither. It keeps a header value that has not ended yet in memory however long it grows, and uvicorn
arms no timer before a connection's first response, so a client could hold megabytes per connection for as long as it
liked. Here each request gets its own budget of bytes and of time, counted from the first byte read of it (for a
connection's first request, from the moment it opened); an idle keep-alive connection is uvicorn's to close. Past
either, the answer is `431` or `408` problem+json with `Connection: close`, and the connection closes.

The bytes are counted before the parser sees them, so it never holds more than the cap of one header section: a read
that would cross the cap is parsed up to it, and the rest only if the section ended there (a first read may hold small
headers and a large body). One exception, bounded by a read: a request pipelined behind another in the same read is
counted from the next read on.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from server.problems import HeaderTooLarge, ProblemError, RequestTimeout, as_response

_BODY = -1  # `_header_bytes` while a request's body is read: uvicorn's flow control bounds it, the app its time


class HeaderLimitedProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        max_header_bytes: int,
        header_timeout_s: float,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._max_header_bytes = max_header_bytes
        self._header_timeout_s = header_timeout_s
        # Bytes read of the open header section (0 before the first byte of the next request), or _BODY.
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self._header_timeout_s, self._too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_bytes == _BODY:
            super().data_received(data)
            return
        if len(data) > self._max_header_bytes - self._header_bytes:
            self._parse_up_to_the_cap(data)
            return
        self._header_bytes += len(data)
        super().data_received(data)
        if self._header_bytes > 0 and self._header_timer is None:
            # A later request whose headers did not all come in its first read: its clock starts with that read.
            # (One whose headers did, as most do, costs no timer.)
            self._header_timer = self.loop.call_later(self._header_timeout_s, self._too_slow)

    def _parse_up_to_the_cap(self, data: bytes) -> None:
        """Parse what fits under the cap. If the section is still open after it, it is too large; if it ended there,
        the rest is a body or the next request, and is read as any read is."""
        room = self._max_header_bytes - self._header_bytes
        self._header_bytes = self._max_header_bytes  # any callback of the parser changes it: the section ended
        view = memoryview(data)
        super().data_received(view[:room])  # type: ignore[arg-type]  # httptools parses any buffer
        if self._header_bytes == self._max_header_bytes:
            self._too_large()
        elif not self.transport.is_closing():
            self.data_received(view[room:])  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        self._header_bytes = _BODY
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._header_bytes = 0  # the next byte read is the next request's first

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        self._refuse(RequestTimeout(f"the request line and headers must arrive within {self._header_timeout_s:g} s"))

    def _too_large(self) -> None:
        self._refuse(HeaderTooLarge(f"the request line and headers must fit in {self._max_header_bytes} bytes"))

    def _refuse(self, problem: ProblemError) -> None:
        """Answer `problem` and close: the rest of this request is unread, so the connection can't carry another."""
        self._stop_header_timer()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # An earlier request, pipelined, is still being answered: that answer must not be cut. It ends the
            # connection, and nothing more is read meanwhile.
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        response = as_response(problem)
        status = f"HTTP/1.1 {problem.status} {HTTPStatus(problem.status).phrase}".encode()
        headers = [name + b": " + value for name, value in [*self.server_state.default_headers, *response.raw_headers]]
        self.transport.write(b"\r\n".join([status, *headers, b"", response.body]))
        self.transport.close()
        client = "{}:{}".format(*self.client) if self.client else "-"
        self.logger.info("%s - %d: %s; connection closed", client, problem.status, problem.detail)
