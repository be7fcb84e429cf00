"""The vectors' tables, an optional track of migrations (migrations/vectors/) applied by `migrate` where the server
has pgvector, and skipped with a line saying what to add where it has not.

Optional, not a numbered migration of the core: Outlast's jobs need nothing but PostgreSQL, and a server without
pgvector (Debian 12's own PostgreSQL, a role that may not create extensions) must still migrate and run every other
job type. Once the extension is added, the next `migrate` applies the track; meanwhile vector jobs fail with
`vectors_unavailable`, carrying the same advice, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import asyncpg

FOLDER = Path(__file__).resolve().parent.parent.parent / "migrations" / "vectors"
PREFIX = "vectors/"  # their names in schema_migrations
MIN_VERSION = (0, 5)  # HNSW indexes
HOW_TO_ADD = (
    "add pgvector to the PostgreSQL server (Debian 13: apt-get install postgresql-17-pgvector; Debian 12: "
    "postgresql-15-pgvector from the PostgreSQL project's apt repository; a managed PostgreSQL ships it: enable it "
    "with CREATE EXTENSION vector), then run `outlast migrate` again"
)
UNAVAILABLE = f"vectors are off: this database has no `vector` extension (pgvector) — {HOW_TO_ADD}"


def version_of(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


async def _extension(conn: asyncpg.Connection) -> str:
    """The installed extension's version, after creating it where it is available; _Off, saying why, where it
    can't be had."""
    installed: str | None = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    if installed is not None:
        return installed
    if await conn.fetchval("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'") is None:
        raise _Off(
            "vectors are off: the PostgreSQL server has no `vector` extension (pgvector) installed — " + HOW_TO_ADD
        )
    try:
        async with conn.transaction():  # a savepoint: a refusal leaves the migration's transaction usable
            await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except asyncpg.InsufficientPrivilegeError as exc:
        database = await conn.fetchval("SELECT current_database()")
        raise _Off(
            f"vectors are off: the server has pgvector but this role may not create the `vector` extension ({exc})"
            f" — have a superuser run CREATE EXTENSION vector in database {database}, then run `outlast migrate`"
            " again"
        ) from None
    version: str = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    return version


class _Off(Exception):
    pass


async def apply(conn: asyncpg.Connection, done: set[str], say: Callable[[str], None]) -> str | None:
    """In the caller's transaction (which holds the migration lock): the next pending file of the track applied and
    recorded, its name returned; None once none is pending or the track can't apply (then `say` tells why)."""
    todo = [p for p in sorted(FOLDER.glob("*.sql")) if PREFIX + p.name not in done]
    if not todo:
        return None
    try:
        version = await _extension(conn)
    except _Off as off:
        say(str(off))
        return None
    if version_of(version) < MIN_VERSION:
        say(f"vectors are off: pgvector {version} is older than 0.5, which brought HNSW indexes — update it, then run"
            " `outlast migrate` again")  # fmt: skip
        return None
    name = PREFIX + todo[0].name
    await conn.execute(todo[0].read_text())
    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
    say(f"vectors: applied {name} (pgvector {version})")
    return name
