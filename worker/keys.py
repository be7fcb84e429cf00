"""API keys: create, list, revoke, verify. A key is printed once; only its SHA-256 is stored.

A key reads `olk_<id>_<secret>`. The prefix lets secret scanners and people recognise a leaked key; the id (12 hex
digits, public) finds the key's row without a search over hashes; the secret (43 base62 characters, 256 bits) is what
makes a key unguessable, so a fast hash is enough (there is nothing to brute-force, unlike a password). Verification
compares the stored and presented hashes in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from datetime import datetime
from typing import NamedTuple

import msgspec
from databases import Database

from worker import sql

PREFIX = "olk_"
_ALPHABET = string.ascii_letters + string.digits
_SECRET_LENGTH = 43  # 43 base62 characters: 256 bits
_KEY = re.compile(rf"{PREFIX}([0-9a-f]{{12}})_([0-9A-Za-z]{{{_SECRET_LENGTH}}})")
_NO_MATCH = hashlib.sha256(b"").digest()
TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # as the tenants table's CHECK


class KeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A key as `outlast keys list` shows it: everything but the key."""

    id: str
    tenant: str
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    read_only: bool


class Grant(NamedTuple):
    """What a usable key lets its holder do: its tenant's jobs, and whether only to read them."""

    tenant: str
    read_only: bool


def key_id(key: str) -> str | None:
    """The id of a well-formed key, else None."""
    match = _KEY.fullmatch(key)
    return None if match is None else match[1]


def looks_like_key(text: str) -> bool:
    """True for anything that starts like a key: the query string refuses it whole, valid or not."""
    return text.startswith(PREFIX)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> str:
    return f"{PREFIX}{secrets.token_hex(6)}_{''.join(secrets.choice(_ALPHABET) for _ in range(_SECRET_LENGTH))}"


def check_tenant(tenant: str) -> None:
    """Raise ValueError, saying what a tenant id is, unless `tenant` is one."""
    if not TENANT.fullmatch(tenant):
        raise ValueError(f"{tenant!r} is not a tenant id: 1 to 63 lowercase letters, digits, - and _")


async def ensure_tenant(db: Database, tenant: str) -> None:
    """Create the tenant unless it exists (a tenant an identity provider's token names on first use)."""
    check_tenant(tenant)
    await sql.execute(db, "INSERT INTO tenants (id) VALUES (:tenant) ON CONFLICT DO NOTHING", {"tenant": tenant})


async def create(db: Database, tenant: str, name: str = "", *, read_only: bool = False) -> str:
    """A new key for `tenant` (created if missing). The caller shows it once: it can't be read back."""
    key = new_key()
    async with db.transaction():
        await ensure_tenant(db, tenant)
        await sql.execute(
            db,
            "INSERT INTO api_keys (id, tenant_id, key_hash, name, read_only)"
            " VALUES (:id, :tenant, :hash, :name, :read_only)",
            {"id": key_id(key), "tenant": tenant, "hash": digest(key), "name": name, "read_only": read_only},
        )
    return key


_LIST = """
SELECT id, tenant_id AS tenant, name, created_at, last_used_at, revoked_at, read_only FROM api_keys
 WHERE CAST(:tenant AS text) IS NULL OR tenant_id = :tenant ORDER BY tenant_id, created_at
"""


async def list_keys(db: Database, tenant: str | None = None) -> list[KeyInfo]:
    return [msgspec.convert(dict(r), KeyInfo) for r in await sql.fetch_all(db, _LIST, {"tenant": tenant})]


async def revoke(db: Database, id: str) -> bool:
    """Revoke the key with this id (or this whole key). False: no such key, or already revoked."""
    id = key_id(id) or id
    query = "UPDATE api_keys SET revoked_at = now() WHERE id = :id AND revoked_at IS NULL RETURNING id"
    return await sql.fetch_val(db, query, {"id": id}) is not None


_VERIFY = "SELECT tenant_id, key_hash, read_only, revoked_at IS NULL AS active FROM api_keys WHERE id = :id"


async def verify(db: Database, key: str) -> Grant | None:
    """What a usable key grants; None for a malformed, unknown or revoked one."""
    id = key_id(key)
    if id is None:
        return None
    row = await sql.fetch_one(db, _VERIFY, {"id": id})
    stored = _NO_MATCH if row is None else bytes(row["key_hash"])
    # Constant time: how much of the hash matched must not show in how long the answer took.
    if not hmac.compare_digest(stored, digest(key)) or row is None or not row["active"]:
        return None
    return Grant(str(row["tenant_id"]), bool(row["read_only"]))


async def touch(db: Database, id: str) -> None:
    await sql.execute(db, "UPDATE api_keys SET last_used_at = now() WHERE id = :id", {"id": id})


async def revision(db: Database) -> int:
    """A number that changes whenever a key is revoked, deleted or rewritten (migrations/0019), for a process that
    can't LISTEN for those changes."""
    return int(await sql.fetch_val(db, "SELECT revision FROM api_key_revision"))


async def any_active(db: Database) -> bool:
    return bool(await sql.fetch_val(db, "SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked_at IS NULL)"))


_GRANT = "SELECT tenant_id, read_only, key_hash FROM api_keys WHERE id = :id AND revoked_at IS NULL"


async def grant_of(db: Database, id: str) -> tuple[Grant, bytes] | None:
    """What the key with this id grants while it is usable, and its hash (a dashboard session holds the id, never
    the key)."""
    row = await sql.fetch_one(db, _GRANT, {"id": id})
    return None if row is None else (Grant(str(row["tenant_id"]), bool(row["read_only"])), bytes(row["key_hash"]))
