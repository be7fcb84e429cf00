"""API keys (worker/keys.py) and the `outlast keys` commands: shown once, stored as a hash, revocable, and read-only
when made so."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import bearer, eventually, open_app
from tests.test_auth import ROUTES, SQUARES, call
from worker import Config, Deps, keys, schedules
from worker.cron import Cron


async def test_only_a_hash_of_the_key_is_stored(deps: Deps) -> None:
    key = await keys.create(deps.db, "acme", "ci")
    assert re.fullmatch(r"olk_[0-9a-f]{12}_[0-9A-Za-z]{43}", key)
    row = await deps.db.fetch_one("SELECT * FROM api_keys WHERE tenant_id = 'acme'")
    assert row is not None
    stored = " ".join(str(v) for v in dict(row._mapping).values())
    assert key not in stored and key.rpartition("_")[2] not in stored
    assert bytes(row["key_hash"]) == keys.digest(key)


async def test_a_key_verifies_to_its_tenant_until_revoked(deps: Deps) -> None:
    key = await keys.create(deps.db, "acme")
    assert await keys.verify(deps.db, key) == keys.Grant("acme", read_only=False)
    wrong_secret = key[:-1] + ("a" if key[-1] != "a" else "b")
    for bad in (wrong_secret, keys.new_key(), "olk_", "", "Bearer " + key, key + " "):
        assert await keys.verify(deps.db, bad) is None, bad
    assert await keys.revoke(deps.db, keys.key_id(key) or "")
    assert await keys.verify(deps.db, key) is None
    assert not await keys.revoke(deps.db, key)  # already revoked (a whole key names its id too)


async def test_a_bad_tenant_id_is_refused(deps: Deps) -> None:
    for tenant in ("Not A Tenant", "", "-leading-dash", "x" * 64):
        with pytest.raises(ValueError, match="not a tenant id"):
            await keys.create(deps.db, tenant)


def outlast(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLAST_")} | {"DATABASE_URL": config.database_url}
    argv = [str(Path(sys.executable).parent / "outlast"), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


async def test_outlast_keys_create_list_revoke(config: Config, deps: Deps) -> None:
    created = await asyncio.to_thread(outlast, config, "keys", "create", "acme", "--name", "ci runner")
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]  # alone on the last line: KEY=$(outlast keys create acme)
    assert created.stdout.strip() == key and "shown this once" in created.stderr
    assert await keys.verify(deps.db, key) == keys.Grant("acme", read_only=False)

    listed = await asyncio.to_thread(outlast, config, "keys", "list")
    assert listed.returncode == 0 and keys.key_id(key) in listed.stdout and "ci runner" in listed.stdout
    assert "read-write" in listed.stdout
    assert key not in listed.stdout

    revoked = await asyncio.to_thread(outlast, config, "keys", "revoke", keys.key_id(key) or "")
    assert revoked.returncode == 0, revoked.stderr
    assert await keys.verify(deps.db, key) is None
    again = await asyncio.to_thread(outlast, config, "keys", "revoke", keys.key_id(key) or "")
    assert again.returncode == 1
    bad = await asyncio.to_thread(outlast, config, "keys", "create", "Bad Tenant")
    assert bad.returncode != 0 and "not a tenant id" in bad.stderr


# -- read-only keys ------------------------------------------------------------------------------------


async def test_outlast_keys_create_read_only_makes_a_key_that_list_shows_as_such(config: Config, deps: Deps) -> None:
    created = await asyncio.to_thread(outlast, config, "keys", "create", "acme", "--read-only", "--name", "dash")
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]
    assert "read-only" in created.stderr
    assert await keys.verify(deps.db, key) == keys.Grant("acme", read_only=True)
    listed = await asyncio.to_thread(outlast, config, "keys", "list", "--tenant", "acme")
    (row,) = [line for line in listed.stdout.splitlines() if line.startswith(keys.key_id(key) or "?")]
    assert row.split()[2] == "read-only", listed.stdout


@pytest.fixture
async def done_job(config: Config, deps: Deps, api_key: str, drain: Callable[[], Awaitable[None]]) -> str:
    """A finished job of tenant `default`, with its result and a whole event stream to read."""
    async with open_app(config) as client:
        response = await client.post("/v1/jobs", json=SQUARES, headers=bearer(api_key))
    assert response.status_code == 202, response.text
    await drain()
    return str(response.json()["id"])


async def test_a_read_only_key_reads_every_route_and_gets_403_on_every_write(
    config: Config, deps: Deps, done_job: str
) -> None:
    reader = bearer(await keys.create(deps.db, "default", read_only=True))
    # a schedule under the job's id, so that /v1/schedules/{id} and its writes name one too
    every_night = schedules.Definition(
        tenant="default", id=done_job, cron=Cron.parse("0 3 * * *"), type="sleep", input=b"{}", metadata=b"{}"
    )
    assert await schedules.create(deps.db, every_night) is not None
    # and an ended workflow under it too, so that its event stream is a replay that ends; its cancel must be refused
    # for the key (403) before the state (409) is looked at
    await deps.db.execute(
        "INSERT INTO workflows (id, tenant_id, status, finished_at) VALUES (:id, 'default', 'succeeded', now())",
        {"id": done_job},
    )
    await deps.db.execute(
        "INSERT INTO workflow_steps (workflow_id, name, position, status, type, input, max_attempts, timeout_s,"
        " retry_safe) VALUES (:id, 'only', 0, 'succeeded', 'sleep', '{}', 1, 60, false)",
        {"id": done_job},
    )
    jobs_before = await deps.db.fetch_val("SELECT count(*) FROM jobs")
    async with open_app(config) as client:
        for method, path in ROUTES:
            response = await call(client, method, path, done_job, headers=reader)
            if method == "GET":
                assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text}"
                continue
            assert response.status_code == 403, f"{method} {path}: {response.status_code} {response.text}"
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["type"] == "/problems/forbidden"
            assert "this key is read-only" in response.json()["detail"]
        assert (await client.get(f"/v1/jobs/{done_job}/result", headers=reader)).json() == 14
        assert (await client.head(f"/v1/jobs/{done_job}", headers=reader)).status_code == 200
        assert (await client.request("PATCH", f"/v1/jobs/{done_job}", headers=reader)).status_code == 403
    assert any(method != "GET" for method, _ in ROUTES)  # the matrix holds writes at all
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == jobs_before
    assert await deps.db.fetch_val("SELECT status FROM jobs WHERE id = :id", {"id": done_job}) == "succeeded"


async def forbidden_now(client: httpx.AsyncClient, key: str) -> httpx.Response | None:
    response = await client.post("/v1/jobs", json=SQUARES, headers=bearer(key))
    return response if response.status_code == 403 else None


async def test_a_key_made_read_only_by_plain_sql_stops_writing_at_once(config: Config, deps: Deps) -> None:
    """The web caches the keys it verified: the flag changing must reach that cache as a revocation does."""
    key = await keys.create(deps.db, "default")
    async with open_app(config) as client:
        assert (await client.post("/v1/jobs", json=SQUARES, headers=bearer(key))).status_code == 202
        await deps.db.execute("UPDATE api_keys SET read_only = true WHERE id = :id", {"id": keys.key_id(key)})
        await eventually(lambda: forbidden_now(client, key))  # the cache keeps a key 60 s unheard
        assert (await client.get("/v1/jobs", headers=bearer(key))).status_code == 200
