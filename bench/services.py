"""The PostgreSQL and Redis a run uses: private embedded servers, or the ones BENCH_DATABASE_URL / BENCH_REDIS_URL name.

A run truncates tables and flushes Redis indexes, so it never falls back to the machine's own services on
5432/6379: those are used only when named explicitly. Even then it works in a database of its own
(`outlast_bench`) and in four Redis indexes: the URL's for Outlast, and the next three for the baselines.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
from redis.asyncio import Redis

from worker.migrate import create_database, migrate

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".outlast" / "bench"
DATABASE = "outlast_bench"


@dataclass(frozen=True)
class Services:
    admin_url: str  # another database on the same server: counters are read there, so reading adds no commits
    database_url: str  # the bench's own database, truncated at will
    redis_url: str  # Outlast's Redis index
    baseline_redis_url: str  # the bare arq and raw_submit baselines' index, flushed between rounds
    naive_redis_url: str  # the naive app's arq queue
    celery_redis_url: str  # the FastAPI + Celery app's broker
    origin: str  # "embedded" or "environment"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_database(dsn: str, name: str) -> str:
    base, _, query = dsn.partition("?")
    return f"{base.rpartition('/')[0]}/{name}" + (f"?{query}" if query else "")


def _next_index(redis_url: str, n: int = 1) -> str:
    parts = urlsplit(redis_url)
    index = int(parts.path.strip("/") or 0)
    return parts._replace(path=f"/{index + n}").geturl()


@contextlib.contextmanager
def services() -> Iterator[Services]:
    """Start what the environment does not name; stop it on the way out, whatever happened."""
    database_url, redis_url = os.environ.get("BENCH_DATABASE_URL"), os.environ.get("BENCH_REDIS_URL")
    origin = "environment" if database_url and redis_url else "embedded"
    with contextlib.ExitStack() as stack:
        if not database_url or not redis_url:
            from worker.tools.embedded import EmbeddedPostgres, EmbeddedValkey

            DATA.mkdir(parents=True, exist_ok=True)
            print(f"bench: starting private PostgreSQL and Valkey under {DATA}", file=sys.stderr)
        if not database_url:
            database_url = stack.enter_context(EmbeddedPostgres(DATA / "postgres", port=free_port())).dsn()
        if not redis_url:
            redis_url = stack.enter_context(EmbeddedValkey(DATA / "valkey", port=free_port())).url()
        yield Services(
            admin_url=database_url,
            database_url=with_database(database_url, DATABASE),
            redis_url=redis_url,
            baseline_redis_url=_next_index(redis_url),
            naive_redis_url=_next_index(redis_url, 2),
            celery_redis_url=_next_index(redis_url, 3),
            origin=origin,
        )


async def api_key(svc: Services) -> str:
    """An API key for tenant `default`, which every request to Outlast carries, as in production."""
    from databases import Database

    from worker import keys

    db = Database(svc.database_url)
    await db.connect()
    try:
        return await keys.create(db, "default", "bench")
    finally:
        await db.disconnect()


async def prepare(svc: Services) -> str:
    """A fresh, migrated bench database and empty Redis indexes; the server's version, for the record.

    Fresh every run: the schema is the working tree's, even when migrations/ was edited in place, and no
    bloat from an earlier run is measured.
    """
    if svc.database_url == svc.admin_url:
        raise SystemExit(f"BENCH_DATABASE_URL must name a database other than {DATABASE}, which the bench owns")
    conn = await asyncpg.connect(svc.admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        version = str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
    await create_database(svc.database_url)
    await migrate(svc.database_url)
    # Valkey keeps its data across restarts (AOF): a queue an earlier run left would be drained by this one's
    # workers as stale messages, each a claim that matches no row, in the middle of what is measured.
    for url in (svc.redis_url, svc.baseline_redis_url, svc.naive_redis_url, svc.celery_redis_url):
        redis = Redis.from_url(url)
        try:
            await redis.flushdb()
        finally:
            await redis.aclose()
    return version
