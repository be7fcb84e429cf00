"""API keys: create, list, revoke, verify. A key is printed once; only its SHA-256 is stored.

A key reads `olk_<id>_<secret>`. The prefix lets secret scanners and people recognise a leaked key; the id (12 hex
digits, public) finds the key's row without a search over hashes; the secret (43 base62 characters, 256 bits) is what
makes a key unguessable, so a fast hash is enough (there is nothing to brute-force, unlike a password). Verification
compares the stored and presented hashes in constant time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import string
import time
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import msgspec
from databases import Database

from worker import sql
from worker.store import UNAVAILABLE

PREFIX = "olk_"
_ALPHABET = string.ascii_letters + string.digits
_SECRET_LENGTH = 43  # 43 base62 characters: 256 bits
_KEY = re.compile(rf"{PREFIX}([0-9a-f]{{12}})_([0-9A-Za-z]{{{_SECRET_LENGTH}}})")
_NO_MATCH = hashlib.sha256(b"").digest()
TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # as the tenants table's CHECK
LISTENER = "outlast-key-listener"  # its application_name in pg_stat_activity
CHANGED = "outlast_api_keys"  # migrations/0004's trigger names each key whose row changed on this channel
log = logging.getLogger("outlast.keys")
_LISTEN_LOST: tuple[type[BaseException], ...] = (*UNAVAILABLE, asyncpg.PostgresError)


class KeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A key as `outlast keys list` shows it: everything but the key."""

    id: str
    tenant: str
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


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


async def create(db: Database, tenant: str, name: str = "") -> str:
    """A new key for `tenant` (created if missing). The caller shows it once: it can't be read back."""
    if not TENANT.fullmatch(tenant):
        raise ValueError(f"{tenant!r} is not a tenant id: 1 to 63 lowercase letters, digits, - and _")
    key = new_key()
    async with db.transaction():
        await sql.execute(db, "INSERT INTO tenants (id) VALUES (:tenant) ON CONFLICT DO NOTHING", {"tenant": tenant})
        await sql.execute(
            db,
            "INSERT INTO api_keys (id, tenant_id, key_hash, name) VALUES (:id, :tenant, :hash, :name)",
            {"id": key_id(key), "tenant": tenant, "hash": digest(key), "name": name},
        )
    return key


_LIST = """
SELECT id, tenant_id AS tenant, name, created_at, last_used_at, revoked_at FROM api_keys
 WHERE CAST(:tenant AS text) IS NULL OR tenant_id = :tenant ORDER BY tenant_id, created_at
"""


async def list_keys(db: Database, tenant: str | None = None) -> list[KeyInfo]:
    return [msgspec.convert(dict(r), KeyInfo) for r in await sql.fetch_all(db, _LIST, {"tenant": tenant})]


async def revoke(db: Database, id: str) -> bool:
    """Revoke the key with this id (or this whole key). False: no such key, or already revoked."""
    id = key_id(id) or id
    query = "UPDATE api_keys SET revoked_at = now() WHERE id = :id AND revoked_at IS NULL RETURNING id"
    return await sql.fetch_val(db, query, {"id": id}) is not None


_VERIFY = "SELECT tenant_id, key_hash, revoked_at IS NULL AS active FROM api_keys WHERE id = :id"


async def verify(db: Database, key: str) -> str | None:
    """The tenant of a usable key; None for a malformed, unknown or revoked one."""
    id = key_id(key)
    if id is None:
        return None
    row = await sql.fetch_one(db, _VERIFY, {"id": id})
    stored = _NO_MATCH if row is None else bytes(row["key_hash"])
    # Constant time: how much of the hash matched must not show in how long the answer took.
    if not hmac.compare_digest(stored, digest(key)) or row is None or not row["active"]:
        return None
    return str(row["tenant_id"])


async def touch(db: Database, id: str) -> None:
    await sql.execute(db, "UPDATE api_keys SET last_used_at = now() WHERE id = :id", {"id": id})


async def any_active(db: Database) -> bool:
    return bool(await sql.fetch_val(db, "SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked_at IS NULL)"))


class KeyCache:
    """The keys this process verified, so that a request costs no lookup, kept only while a LISTEN connection would
    hear them change.

    `listening()` holds that connection: migrations/0004 notifies on every revocation, deletion or rewrite of a key,
    whoever made it, and the key is dropped within a round trip. While the connection is down nothing is cached, and
    losing it drops everything, since changes made meanwhile went unheard. A lookup that raced a change does not
    cache its answer (the generation moved under it). `MAX_AGE_S` bounds what a connection that died without a word
    could leave behind; the listener also checks its connection every `CHECK_S`.
    """

    MAX_AGE_S = 60.0
    CHECK_S = 5.0
    MAX_KEYS = 10_000  # only valid keys get in, so this is a bound on memory, not a defence

    def __init__(self) -> None:
        self.listening_now = False
        self._heard_from = asyncio.Event()
        self._keys: dict[str, tuple[bytes, str, float]] = {}  # key id: (hash, tenant, good until)
        self._generation = 0

    async def verify(self, db: Database, key: str) -> str | None:
        """As the module's `verify`, from memory when this process already verified the key."""
        id, hashed = key_id(key), digest(key)
        entry = None if id is None else self._keys.get(id)
        if entry is not None and entry[2] > time.monotonic() and hmac.compare_digest(entry[0], hashed):
            return entry[1]
        generation = self._generation
        tenant = await verify(db, key)
        if tenant is not None and id is not None and self.listening_now and generation == self._generation:
            if len(self._keys) >= self.MAX_KEYS:
                self._keys.clear()
            self._keys[id] = (hashed, tenant, time.monotonic() + self.MAX_AGE_S)
        return tenant

    def forget(self, id: str | None = None) -> None:
        """Drop one key, or all of them."""
        self._generation += 1
        if id is None:
            self._keys.clear()
        else:
            self._keys.pop(id, None)

    @contextlib.asynccontextmanager
    async def listening(self, database_url: str, *, timeout_s: float) -> AsyncIterator[None]:
        task = asyncio.create_task(self._listen(database_url, timeout_s))
        try:
            # Start serving with the cache working, unless the listener can't connect in time (it keeps trying).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._heard_from.wait(), timeout_s)
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _listen(self, database_url: str, timeout_s: float) -> None:
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(
                    database_url, timeout=timeout_s, server_settings={"application_name": LISTENER}
                )
                connection.add_termination_listener(lambda _: self._deaf())
                await connection.add_listener(CHANGED, lambda _c, _p, _ch, id: self.forget(id))
                self.forget()
                self.listening_now = True
                self._heard_from.set()
                while True:
                    await asyncio.sleep(self.CHECK_S)
                    await connection.fetchval("SELECT 1", timeout=timeout_s)
            except _LISTEN_LOST as exc:
                log.warning("keys: not listening for key changes (%r); every request looks its key up until then", exc)
            finally:
                self._deaf()
                if connection is not None:
                    connection.terminate()  # no goodbye over a connection that may be dead
            await asyncio.sleep(self.CHECK_S)

    def _deaf(self) -> None:
        self.listening_now = False
        self.forget()
