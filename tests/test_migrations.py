"""The migration runner and the schema it builds."""

from __future__ import annotations

import asyncio
import re
from typing import get_args

import asyncpg

from worker import Config, Status
from worker.migrate import MIGRATIONS, create_database, migrate


async def empty_database(config: Config, name: str) -> str:
    base = config.database_url.rpartition("/")[0]
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    await create_database(f"{base}/{name}")
    return f"{base}/{name}"


async def test_migrations_apply_to_an_empty_database_and_a_second_run_applies_nothing(config: Config) -> None:
    dsn = await empty_database(config, "outlast_migrate_test")
    assert await migrate(dsn) == sorted(p.name for p in MIGRATIONS.glob("*.sql"))
    assert await migrate(dsn) == []
    conn = await asyncpg.connect(dsn)
    try:
        tables = {
            r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    finally:
        await conn.close()
    assert {"jobs", "job_events", "webhook_deliveries", "tenants", "api_keys", "schema_migrations"} <= tables


async def test_status_literal_matches_the_check_constraint(pg_connection: asyncpg.Connection) -> None:
    check = await pg_connection.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'jobs'::regclass AND contype = 'c' AND pg_get_constraintdef(oid) LIKE '%queued%running%'"
        " ORDER BY length(pg_get_constraintdef(oid)) LIMIT 1"
    )
    assert set(re.findall(r"'(\w+)'::text", check)) == set(get_args(Status))


async def test_concurrent_release_runs_apply_each_migration_once(config: Config) -> None:
    dsn = await empty_database(config, "outlast_migrate_race")
    runs = await asyncio.gather(*(migrate(dsn) for _ in range(4)))
    applied = [name for run in runs for name in run]
    assert sorted(applied) == sorted(p.name for p in MIGRATIONS.glob("*.sql"))
