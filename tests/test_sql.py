"""worker.sql: the engine's statements on asyncpg itself, named parameters kept."""

from __future__ import annotations

import asyncpg
import msgspec
import pytest

from worker import Config, Deps, sql
from worker.database import open_database


def test_named_parameters_become_positional_once_each_in_order_of_first_use() -> None:
    text, names = sql.positional("SELECT :b, :a, :b WHERE x = CAST(:a AS int)")
    assert text == "SELECT $1, $2, $1 WHERE x = CAST($2 AS int)"
    assert names == ("b", "a")


@pytest.mark.parametrize("text", ["SELECT x::text", "SELECT '12:30'::time", "SELECT '{}'::jsonb"])
def test_casts_and_time_literals_are_not_parameters(text: str) -> None:
    assert sql.positional(text) == (text, ())


async def test_values_are_bound_by_name_whatever_their_order(deps: Deps) -> None:
    row = await sql.fetch_one(deps.db, "SELECT CAST(:a AS int) AS a, CAST(:b AS text) AS b", {"b": "two", "a": 1})
    assert row is not None and (row["a"], row["b"]) == (1, "two")


async def test_statements_run_inside_the_tasks_databases_transaction(deps: Deps) -> None:
    with pytest.raises(RuntimeError):
        async with deps.db.transaction():
            await sql.execute(deps.db, "INSERT INTO tenants (id) VALUES (:id)", {"id": "sql-probe"})
            assert await deps.db.fetch_val("SELECT count(*) FROM tenants WHERE id = 'sql-probe'") == 1
            raise RuntimeError("roll back")
    assert await sql.fetch_val(deps.db, "SELECT count(*) FROM tenants WHERE id = :id", {"id": "sql-probe"}) == 0


async def test_sessions_write_timestamps_into_json_in_utc_whatever_the_servers_default(config: Config) -> None:
    name = "outlast_time_zone"
    admin = await asyncpg.connect(config.database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.execute(f"ALTER DATABASE \"{name}\" SET timezone TO 'Pacific/Auckland'")
    finally:
        await admin.close()
    url = config.database_url.rpartition("/")[0] + f"/{name}"
    db = open_database(msgspec.structs.replace(config, database_url=url))
    await db.connect()
    try:
        written = await sql.fetch_val(db, "SELECT CAST(to_json(CAST('2026-01-01 00:00:00Z' AS timestamptz)) AS text)")
    finally:
        await db.disconnect()
    assert written == '"2026-01-01T00:00:00+00:00"'
