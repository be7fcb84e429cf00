"""A request's JSON body, read and checked before any decoder sees it: its media type, its size and the time it
takes to arrive, how deep it nests, and keys given twice.

The checks run here, once, so that a decoder further on never meets what would make it fail in a way the client
can't be told about: JSON nested a few hundred levels deep makes Python's recursion limit a 500 (or a connection
reset), and a key given twice would be taken last-wins without a word.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from itertools import accumulate
from typing import Any, Final

from starlette.requests import ClientDisconnect, Request

from server.problems import FieldError, InvalidBody, PayloadTooLarge, RequestTimeout, UnsupportedMediaType

MAX_DEPTH: Final = 64  # arrays and objects inside one another, the outermost counting 1
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included, in one regex step
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def nesting(data: bytes) -> int:
    """How deep the JSON text `data` nests, counted without recursion (and in C loops: a regex, a translate, an
    accumulate). Brackets inside strings don't count."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> None:
    keys = set()
    for key, _ in pairs:
        if key in keys:
            raise _Duplicate(key)
        keys.add(key)


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_body(request: Request, limit: int, *, timeout_s: float = 30.0) -> bytes:
    """The body, refused with 413 as soon as it passes `limit`, whatever Content-Length claimed, and with 408
    unless all of it arrives within `timeout_s` (a slow or stalled sender, or a Content-Length larger than the data,
    would otherwise hold the request open for as long as it likes)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the body passed the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the whole body must arrive within {timeout_s:g} s") from None
    except ClientDisconnect:
        raise InvalidBody("the client went away before the body was complete") from None
    return b"".join(chunks)


async def json_body(request: Request, limit: int, *, timeout_s: float, what: str) -> bytes:
    """The body as JSON text that any decoder can take: 415 unless it is declared JSON (or not declared at all),
    400 when it is empty, not JSON, nested deeper than MAX_DEPTH or repeats a key in an object. `what` says what
    the body should hold, for the empty case."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        msg = f"the body must be JSON (Content-Type: application/json), not {content_type[:100]!r}"
        raise UnsupportedMediaType(msg, [FieldError("Content-Type", msg)])
    body = await read_body(request, limit, timeout_s=timeout_s)
    if not body.strip():
        raise InvalidBody(f"the body is empty; send {what}")
    if (depth := nesting(body)) > MAX_DEPTH:
        raise InvalidBody(f"the JSON is nested {depth} levels deep; at most {MAX_DEPTH} are accepted")
    try:
        _keys_once(body)
    except _Duplicate as exc:
        raise InvalidBody(f"the key {exc.key[:200]!r} appears twice in one object; give each key once") from None
    return body


def _keys_once(body: bytes) -> None:
    """Raise _Duplicate for a key given twice in one object. Invalid JSON passes: the typed decoder says where it
    is wrong, in its own words."""
    try:
        json.loads(body, object_pairs_hook=_unique)
    except (json.JSONDecodeError, UnicodeDecodeError):  # the second is a ValueError too: not the digit limit
        pass
    except ValueError:  # an integer past Python's digit limit for int(): read the numbers as text instead
        with contextlib.suppress(json.JSONDecodeError):
            json.loads(body, object_pairs_hook=_unique, parse_int=str)
