"""worker.sql: the engine's statements on asyncpg itself, named parameters kept."""

from __future__ import annotations

import pytest

from worker import Deps, sql


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


async def test_outside_a_transaction_statements_go_straight_to_the_pool(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_borrowing() -> None:
        raise AssertionError("borrowed a connection through databases outside a transaction")

    monkeypatch.setattr(deps.db, "connection", no_borrowing)
    assert await sql.fetch_val(deps.db, "SELECT CAST(:n AS int) + 1", {"n": 1}) == 2
    assert (await sql.fetch_one(deps.db, "SELECT 1 AS one")) is not None
    assert len(await sql.fetch_all(deps.db, "SELECT generate_series(1, 3)")) == 3
    await sql.execute(deps.db, "SELECT 1")
