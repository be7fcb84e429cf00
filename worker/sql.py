"""Run the engine's statements on asyncpg itself, through the connection `databases` lends.

`databases` keeps the pool, the per-task connection and transactions, used through its public API only: each
statement runs on `db.connection()`'s asyncpg connection (`raw_connection`), which inside `async with
db.transaction()` is the transaction's. But `databases`' own `fetch_one(text, values)` builds a SQLAlchemy `text()`
clause and compiles it again on every call, 110-240 µs of CPU per statement, more than asyncpg's own work
(docs/performance.md). So statements here keep their `:name` parameters; each text is turned into asyncpg's
`$1, $2…` once per process, and a call only puts the values in order.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from asyncpg import Record
from databases import Database

# `:name`, but neither a `::type` cast nor the `30` of a time literal's `12:30`.
_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")

Values = Mapping[str, Any]


@functools.lru_cache(maxsize=1024)
def positional(text: str) -> tuple[str, tuple[str, ...]]:
    """`text` with `$n` for each distinct `:name`, and the names in that order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    return _PARAM.sub(number, text), tuple(names)


def _args(text: str, values: Values | None) -> tuple[str, list[Any]]:
    query, names = positional(text)
    return query, [values[name] for name in names] if values else []


async def _run(db: Database, method: str, text: str, values: Values | None) -> Any:
    """asyncpg's `method` (fetchrow, fetch, fetchval, execute) on the task's connection (its transaction's, if any)."""
    query, args = _args(text, values)
    async with db.connection() as connection:
        return await getattr(connection.raw_connection, method)(query, *args)


async def fetch_one(db: Database, text: str, values: Values | None = None) -> Record | None:
    record: Record | None = await _run(db, "fetchrow", text, values)
    return record


async def fetch_all(db: Database, text: str, values: Values | None = None) -> list[Record]:
    records: list[Record] = await _run(db, "fetch", text, values)
    return records


async def fetch_val(db: Database, text: str, values: Values | None = None) -> Any:
    return await _run(db, "fetchval", text, values)


async def execute(db: Database, text: str, values: Values | None = None) -> None:
    await _run(db, "execute", text, values)
