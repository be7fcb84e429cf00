"""URL-safe base64 without padding, for read tokens and list cursors: one spelling out, and only that one back in."""

from __future__ import annotations

import base64
import binascii


def encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def decode(text: str) -> bytes:
    """The bytes `text` encodes, if `text` is exactly what `encode` makes of them; else ValueError. base64 that
    decodes to the same bytes (padding, unused low bits, characters the decoder skips) would make one token many."""
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if encode(data) != text:
        raise ValueError("not in its canonical spelling")
    return data
