"""What uvicorn's access log may show of a request: its query string without read tokens or keys.

A Job's links carry a read token in the query string (`?token=olt_…`), so the access line of every browser that
follows a job would hold one in full, and an API key sent in the query string (refused, but logged all the same)
would sit in the log for whoever reads it. The filter rewrites the line before any handler formats it.
"""

from __future__ import annotations

import logging
import re

from server.auth import TOKEN_PREFIX
from worker import keys

_SECRET_PARAM = re.compile(r"(?i)(?<=[?&])(token|api_key|apikey|api-key|key|access_token|auth|authorization)=[^&\s]*")
_SECRET_VALUE = re.compile(rf"(?:{keys.PREFIX}|{TOKEN_PREFIX})[^&\s\"]*")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """`text` with every query value that may be a secret, and anything shaped like a key or token, replaced."""
    return _SECRET_VALUE.sub(REDACTED, _SECRET_PARAM.sub(rf"\1={REDACTED}", text))


class Redact(logging.Filter):
    """For `uvicorn.access`: its record's arguments are (client, method, path with query, HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install() -> None:
    """Redact the access log of this process (idempotent: an app built twice adds one filter)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, Redact) for f in logger.filters):
        logger.addFilter(Redact())
