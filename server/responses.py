"""Responses rendered by msgspec: one encoder, built at import."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

_encoder = msgspec.json.Encoder()


class MsgspecResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


class ProblemResponse(MsgspecResponse):
    media_type = "application/problem+json"
