"""What every request and every job attempt needs, built once per process: the config, PostgreSQL, Redis, and the
followers' doorbell rung after each change."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from arq.connections import ArqRedis
from databases import Database

from worker.config import Config
from worker.connections import open_redis
from worker.database import open_database, warn_if_pooled
from worker.events import Notifier
from worker.store import Jobs


@dataclass(frozen=True)
class Deps:
    """What every request and every job attempt needs, built once per process."""

    config: Config
    db: Database
    redis: ArqRedis
    notifier: Notifier  # publishes job changes on `redis`
    jobs: Jobs  # every change to the jobs table goes through it: db, then notifier


@contextlib.asynccontextmanager
async def connect(config: Config, *, redis: ArqRedis | None = None) -> AsyncIterator[Deps]:
    db = open_database(config)
    await db.connect()
    await warn_if_pooled(db, config)
    own_redis = redis is None
    arq = redis or open_redis(config)
    notifier = Notifier(arq)
    try:
        yield Deps(config=config, db=db, redis=arq, notifier=notifier, jobs=Jobs(db, notifier))
    finally:
        await notifier.flush()
        await db.disconnect()
        if own_redis:
            await arq.aclose(close_connection_pool=True)
