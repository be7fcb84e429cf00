"""The migration runner: plain SQL files from migrations/, applied in name order under an advisory lock.

Raw asyncpg, not `databases`: SQLAlchemy's `text()` reads any `:word` as a parameter, even in a comment.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import asyncpg

from worker.config import from_env

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


async def migrate(dsn: str, folder: Path = MIGRATIONS) -> list[str]:
    """Apply what is pending; return the names applied ([] when up to date)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        await conn.execute(_CREATE_LEDGER)
        done = {row["name"] for row in await conn.fetch("SELECT name FROM schema_migrations")}
        applied = []
        for name, sql in pending(done, folder):
            async with conn.transaction():  # DDL is transactional: a file applies whole or not at all
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            applied.append(name)
        return applied
    finally:
        await conn.close()  # closing the connection releases the lock


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
    applied = asyncio.run(migrate(from_env(needs=("DATABASE_URL",)).database_url))
    print("applied: " + ", ".join(applied) if applied else "migrations: up to date", file=sys.stderr)


if __name__ == "__main__":
    main()
