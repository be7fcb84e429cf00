"""Responses rendered by msgspec: one encoder, built at import. Every JSON answer says `nosniff` and `no-store`:
a job's result is whatever its code returned, and no browser should sniff it into HTML, nor any cache keep it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from starlette.responses import Response

_encoder = msgspec.json.Encoder()
_GUARDS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"))


class JSONResponse(Response):
    """JSON that is already bytes (a stored result), with the guards every JSON answer carries."""

    media_type = "application/json"

    def init_headers(self, headers: Mapping[str, str] | None = None) -> None:
        super().init_headers(headers)
        present = {name for name, _ in self.raw_headers}
        self.raw_headers.extend(guard for guard in _GUARDS if guard[0] not in present)


class MsgspecResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


class ProblemResponse(MsgspecResponse):
    media_type = "application/problem+json"
