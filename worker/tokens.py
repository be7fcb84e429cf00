"""Job read tokens: one job, read-only, until an expiry, signed with OUTLAST_SECRET_KEY (HMAC-SHA256). The web
mints them for a Job's `links` and checks them (server/auth.py); the worker mints them for a webhook's
`result_link`, so a receiver fetches a large result without an API key."""

from __future__ import annotations

import base64
import hmac
import time
from typing import Final
from uuid import UUID

PREFIX: Final = "olt_"
CONTEXT: Final = (
    b"outlast job read token v1\0"  # what the MAC covers besides the payload: these bytes sign nothing else
)


def b64(data: bytes) -> str:
    """URL-safe base64 without padding: the one spelling a token is accepted in (server/b64.py reads it back)."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def mint(secret: bytes, tenant: str, job_id: UUID, ttl_s: int) -> str:
    """A read-only token for one job: its id, an expiry and its tenant, signed."""
    expires = int(time.time()) + ttl_s
    payload = job_id.bytes + expires.to_bytes(8, "big") + tenant.encode()
    mac = hmac.digest(secret, CONTEXT + payload, "sha256")
    return f"{PREFIX}{b64(payload)}.{b64(mac)}"
