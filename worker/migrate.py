"""The migration runner: plain SQL files from migrations/, applied in name order, each in its own transaction under
a transaction-scoped advisory lock, so that it works through a transaction pooler (PgBouncer) as well as direct.

Raw asyncpg, not `databases`: SQLAlchemy's `text()` reads any `:word` as a parameter, even in a comment.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg

from worker.config import from_env
from worker.vectors import schema as vector_schema

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
LOCK_KEY = 0x6F75746C617374  # "outlast": a second release run waits for the first
_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name        text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


def pending(done: set[str], folder: Path = MIGRATIONS) -> list[tuple[str, str]]:
    """The (name, sql) pairs not applied yet, in name order."""
    return [(p.name, p.read_text()) for p in sorted(folder.glob("*.sql")) if p.name not in done]


def _to_stderr(line: str) -> None:
    print(f"migrate: {line}", file=sys.stderr)


async def migrate(dsn: str, folder: Path = MIGRATIONS, *, say: Callable[[str], None] = _to_stderr) -> list[str]:
    """Apply what is pending; return the names applied ([] when up to date). Then the optional vectors track where
    the server has pgvector (worker/vectors/schema.py), whose outcome `say` tells."""
    # No statement cache: through a transaction pooler a named statement may be missing, or another's, at the next
    # transaction; a few statements per file gain nothing from it anyway.
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        applied: list[str] = []
        while True:
            # DDL is transactional: a file applies whole or not at all. The lock ends with the transaction, so no
            # pooled server connection keeps it once we are gone (a session lock would outlive the client); a
            # second release run waits here, then reads the ledger again and finds the file applied.
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
                await conn.execute(_CREATE_LEDGER)
                done = {row["name"] for row in await conn.fetch("SELECT name FROM schema_migrations")}
                todo = pending(done, folder)
                if not todo:
                    if folder == MIGRATIONS and await vector_schema.apply(conn, done, say) is not None:
                        continue
                    return applied
                name, sql = todo[0]
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            applied.append(name)
    finally:
        await conn.close()


async def create_database(dsn: str) -> None:
    """Create the DSN's database when it is missing (development and tests; a PaaS gives one)."""
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        base, _, name = dsn.partition("?")[0].rpartition("/")
        admin = await asyncpg.connect(f"{base}/postgres")
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.DuplicateDatabaseError:
            pass
        finally:
            await admin.close()
    else:
        await conn.close()


def main() -> None:
    config = from_env(needs=("DATABASE_URL",))
    # Past the pooler when we can: a pooler's query_timeout or idle limits are set for requests, not for DDL.
    said: list[str] = []
    applied = asyncio.run(migrate(config.direct_database_url or config.database_url, say=said.append))
    print("applied: " + ", ".join(applied) if applied else "migrations: up to date", file=sys.stderr)
    for line in said:  # the vectors track's outcome, after what the core applied
        _to_stderr(line)


if __name__ == "__main__":
    main()
