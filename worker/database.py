"""The database: opening it (`databases` on asyncpg), what it raises when it can't be reached, `persist` (a write
retried through an outage), and what its text and jsonb columns can hold. worker/sql.py runs the statements."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import msgspec
from databases import Database

from worker import metrics, retry
from worker.config import Config

log = logging.getLogger("outlast.db")
T = TypeVar("T")

# What a lost or restarting database raises: the web answers 503, the worker retries with backoff.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.OperatorInterventionError,
    # A pooled connection that got the server's "terminating connection" but not yet the socket's close.
    asyncpg.InternalClientError,
)


async def _keep_session(connection: object) -> None:
    """asyncpg's default reset on release (unlock all, CLOSE ALL, UNLISTEN, RESET ALL) is a round trip and a
    transaction after every query; nothing here sets session state, and asyncpg still rolls back a transaction
    left open before calling this."""


def open_database(config: Config) -> Database:
    url = config.database_url
    if url.startswith("postgres://"):  # Heroku's spelling; SQLAlchemy's URL parser wants the long one
        url = "postgresql://" + url.removeprefix("postgres://")
    pooled: dict[str, Any] = {}
    if config.database_pooler == "transaction":
        # Each transaction may get another server connection: a named statement prepared on one is missing on the
        # next ("prepared statement does not exist") or, worse, another's of the same name runs with these
        # parameters. Without its cache asyncpg prepares only unnamed statements, parsed again with each Bind before
        # one Sync, so the pooler keeps the whole exchange on one server connection.
        pooled["statement_cache_size"] = 0
    return Database(
        url,
        min_size=config.db_pool_min,
        max_size=config.db_pool_max,
        timeout=config.db_timeout_s,
        command_timeout=config.db_timeout_s * 6,
        reset=_keep_session,
        # PostgreSQL writes timestamps into JSON (the dashboard's overview, the tenant feed) in the session's time
        # zone: in UTC they decode as the UTC datetimes asyncpg gives, whatever the server's default.
        server_settings={"timezone": "UTC"},
        **pooled,
    )


_STATEMENT_ELSEWHERE = (asyncpg.DuplicatePreparedStatementError, asyncpg.InvalidSQLStatementNameError)
_NO_ANSWER: tuple[type[BaseException], ...] = (*UNAVAILABLE, asyncpg.PostgresError)


async def warn_if_pooled(db: Database, config: Config) -> None:
    """Log when DATABASE_URL answers through a pooler that OUTLAST_DATABASE_POOLER does not name: in transaction
    pooling, what breaks then (prepared statements, the key cache's LISTEN) says nothing of the pooler itself."""
    if config.database_pooler != "none":
        return
    try:
        async with db.connection() as connection:
            raw = connection.raw_connection
            # A pooler answers the client's startup itself, with a cancel key (and so a backend pid) of its own.
            pooled = raw.get_server_pid() != await raw.fetchval("SELECT pg_backend_pid()")
    except _STATEMENT_ELSEWHERE:
        pooled = True  # another client's statement of the same name, or ours gone: only a pooler does that
    except _NO_ANSWER:
        return  # no evidence; the process's own errors will say why
    if pooled:
        log.warning(
            "database: DATABASE_URL answers through a connection pooler; if it pools transactions (PgBouncer's"
            " pool_mode=transaction), set OUTLAST_DATABASE_POOLER=transaction, or prepared statements and key"
            " revocations break (docs/operations.md, PgBouncer)"
        )


def session_url(config: Config) -> str | None:
    """A URL whose connection stays one PostgreSQL session while it is open, for what must outlive a transaction
    (LISTEN): the direct URL when set, else DATABASE_URL unless a transaction pooler is in front of it."""
    if config.direct_database_url:
        return config.direct_database_url
    return None if config.database_pooler == "transaction" else config.database_url


# -- what PostgreSQL can store ----------------------------------------------------------------------

_encode = msgspec.json.Encoder().encode
# A NUL in a JSON string, as msgspec encodes it (\u0000 after an even number of backslashes): PostgreSQL's jsonb and
# text can't hold it, and a statement carrying one is refused whole.
NUL = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")
NUL_MSG = "PostgreSQL can't store the NUL character (\\u0000) in text"
_ESCAPE = b"\\u0000"  # in every NUL the encoder writes; a substring search for it is 100x the regex's speed


def has_nul(encoded: bytes) -> bool:
    """Whether JSON as msgspec encodes it holds a NUL in a string: the regex (which tells a NUL from an escaped
    backslash before `u0000`) costs 1.4 ms on 10 KB, so it runs only on a text holding `\\u0000` at all."""
    return _ESCAPE in encoded and NUL.search(encoded) is not None


def storable(value: Any) -> str:
    """`value` as JSON for a jsonb column, each NUL or lone surrogate in its strings made U+FFFD. For what a job
    reports about itself (errors, progress, log lines): one character lost rather than the whole write, and the
    job with it."""
    try:
        encoded = _encode(value)
    except UnicodeEncodeError:  # a lone surrogate (bytes decoded with surrogateescape) is no UTF-8 at all
        encoded = _encode(_utf8(msgspec.to_builtins(value)))
    return NUL.sub(rb"\1\\ufffd", encoded).decode() if _ESCAPE in encoded else encoded.decode()


def _utf8(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if isinstance(value, list):
        return [_utf8(v) for v in value]
    if isinstance(value, dict):
        return {_utf8(k): _utf8(v) for k, v in value.items()}
    return value


async def persist(call: Callable[[], Awaitable[T]], *, what: str, give_up_after_s: float = 600.0) -> T:
    """Run a write, retrying with backoff while the database is unreachable.

    Past `give_up_after_s` the error propagates; for a job's write, its lease then runs out and the sweep decides.
    """
    deadline = time.monotonic() + give_up_after_s
    attempt = 0
    while True:
        try:
            return await call()
        except UNAVAILABLE as exc:
            attempt += 1
            metrics.database_errors.inc()
            if time.monotonic() > deadline:
                raise
            delay = retry.reconnect(attempt)
            log.warning("%s: database unavailable (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
