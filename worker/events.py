"""A job's event log: publish (the doorbell on Redis) after each change.

PostgreSQL is the truth here too. `job_events` holds every event, numbered by `jobs.event_seq` in the statement
that makes the change (store.py's transitions). After the commit the writer publishes the job's id on Redis. A
notification only says "look": a follower reads the log after the last seq it delivered, so a lost notification
can delay an event but never lose or repeat one.
"""

from __future__ import annotations

import logging
from typing import Final
from uuid import UUID

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("outlast.events")

EVERY_JOB: Final = b"*"  # the payload that pokes every followed job: the sweep moved some it does not name


def channel(redis: Redis) -> str:
    """Pub/sub ignores database numbers: deployments that share a Redis server by index must not hear each other."""
    return f"outlast:events:{redis.connection_pool.connection_kwargs.get('db', 0)}"


async def publish(redis: Redis, job_id: UUID | None) -> None:
    """Ring the followers' doorbell after a commit (None: every followed job). Never raises, so a transition can't
    fail on Redis: the log is the truth, and followers re-read it when the subscription comes back."""
    try:
        await redis.publish(channel(redis), EVERY_JOB if job_id is None else str(job_id).encode())
    except (RedisError, OSError) as exc:
        log.debug("publish %s: Redis unavailable (%s); followers will read the log", job_id or "*", exc)
