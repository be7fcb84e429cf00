"""The migration runner and the schema it builds."""

from __future__ import annotations

import re
from typing import get_args

import asyncpg

from worker import Config, Status
from worker.migrate import MIGRATIONS, create_database, migrate


async def test_migrations_apply_to_an_empty_database_and_a_second_run_applies_nothing(config: Config) -> None:
    base = config.database_url.rpartition("/")[0]
    dsn = f"{base}/outlast_migrate_test"
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute("DROP DATABASE IF EXISTS outlast_migrate_test WITH (FORCE)")
    finally:
        await admin.close()
    await create_database(dsn)
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
    import asyncio

    base = config.database_url.rpartition("/")[0]
    dsn = f"{base}/outlast_migrate_race"
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute("DROP DATABASE IF EXISTS outlast_migrate_race WITH (FORCE)")
    finally:
        await admin.close()
    await create_database(dsn)
    runs = await asyncio.gather(*(migrate(dsn) for _ in range(4)))
    applied = [name for run in runs for name in run]
    assert sorted(applied) == sorted(p.name for p in MIGRATIONS.glob("*.sql"))
