"""API keys (worker/keys.py) and the `outlast keys` commands: shown once, stored as a hash, revocable."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from worker import Config, Deps, keys


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
    assert await keys.verify(deps.db, key) == "acme"
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
    assert await keys.verify(deps.db, key) == "acme"

    listed = await asyncio.to_thread(outlast, config, "keys", "list")
    assert listed.returncode == 0 and keys.key_id(key) in listed.stdout and "ci runner" in listed.stdout
    assert key not in listed.stdout

    revoked = await asyncio.to_thread(outlast, config, "keys", "revoke", keys.key_id(key) or "")
    assert revoked.returncode == 0, revoked.stderr
    assert await keys.verify(deps.db, key) is None
    again = await asyncio.to_thread(outlast, config, "keys", "revoke", keys.key_id(key) or "")
    assert again.returncode == 1
    bad = await asyncio.to_thread(outlast, config, "keys", "create", "Bad Tenant")
    assert bad.returncode != 0 and "not a tenant id" in bad.stderr
