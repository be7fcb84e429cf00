"""Redis, as both processes reach it: the client (arq's, lazily connected, bounded), what it raises when Redis can't
be reached, and the Lua scripts run on it, each registered once per client."""

from __future__ import annotations

import weakref
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import msgspec
from arq.connections import ArqRedis, RedisSettings
from redis.asyncio import BlockingConnectionPool, Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.config import Config

QUEUE: Final = "outlast:queue"
# Never pickle: a queue message is only "{job_id}:{attempt}", and msgpack can't execute anything.
serialize = msgspec.msgpack.encode
deserialize = msgspec.msgpack.decode
# What an unreachable or restarting Redis raises. Redis is a doorbell: whoever meets one of these carries on without
# it (the rows are the truth) and logs it.
REDIS_DOWN: Final[tuple[type[BaseException], ...]] = (RedisError, OSError)
# The narrower part of it: Redis could not be reached. Where a refused command is a bug to surface rather than an
# outage to wait out (the worker's poll, worker/wake.py), only these are caught.
REDIS_UNREACHABLE: Final[tuple[type[BaseException], ...]] = (RedisConnectionError, RedisTimeoutError, OSError)


def tls(config: Config) -> dict[str, Any]:
    """redis-py's TLS arguments for `config.redis_url`, the same for every client of both processes and arq's: none
    for redis://; for rediss://, the certificate policy (OUTLAST_REDIS_TLS_VERIFY, or the URL's own
    `ssl_cert_reqs`, which managed plans' docs tell users to add) and the CA file to check against."""
    url = urlsplit(config.redis_url)
    if url.scheme != "rediss":
        return {}
    verify = parse_qs(url.query).get("ssl_cert_reqs", [config.redis_tls_verify])[-1]
    if verify not in ("required", "none"):
        raise ValueError(f"REDIS_URL: ssl_cert_reqs must be required or none, not {verify!r}")
    return {
        "ssl_cert_reqs": verify,
        "ssl_ca_certs": config.redis_tls_ca_file or None,
        "ssl_check_hostname": verify == "required",
    }


def redis_settings(config: Config) -> RedisSettings:
    """arq's settings: `RedisSettings.from_dsn` keeps only the URL's host, port, password and db, so the TLS policy
    is set here, as every other client gets it."""
    settings = RedisSettings.from_dsn(config.redis_url)
    settings.conn_timeout = int(config.redis_timeout_s) or 1
    for name, value in tls(config).items():
        setattr(settings, name, value)
    return settings


def open_redis(config: Config) -> ArqRedis:
    """An ArqRedis that connects lazily: a process starts, and answers, while Redis is down. Its pool is bounded:
    a burst of requests waits for a connection instead of opening one per request."""
    pool = BlockingConnectionPool.from_url(
        config.redis_url,
        max_connections=config.redis_pool_max,
        timeout=config.redis_timeout_s,
        socket_connect_timeout=config.redis_timeout_s,
        socket_timeout=config.redis_timeout_s,
        health_check_interval=30,
        **tls(config),
    )
    return ArqRedis(pool, job_serializer=serialize, job_deserializer=deserialize, default_queue_name=QUEUE)


_scripts: weakref.WeakKeyDictionary[Redis, dict[str, AsyncScript]] = weakref.WeakKeyDictionary()


def script(redis: Redis, source: str) -> AsyncScript:
    """`source` registered on this client once: EVALSHA, loading the script again on NOSCRIPT (a restarted Redis)."""
    registered = _scripts.setdefault(redis, {})
    found = registered.get(source)
    if found is None:
        found = registered[source] = redis.register_script(source)
    return found
