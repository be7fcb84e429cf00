"""The API keys this web process verified, kept in memory only while this process would hear them change: by LISTEN,
or, with only a transaction pooler to reach PostgreSQL through, by polling the keys' revision (worker/keys.py makes,
stores and verifies keys; migrations/0004 notifies on every change of one, and 0019 counts them)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator

import asyncpg
from databases import Database

from worker import keys
from worker.database import UNAVAILABLE

LISTENER = "outlast-key-listener"  # its application_name in pg_stat_activity
CHANGED = "outlast_api_keys"  # migrations/0004's trigger names each key whose row changed on this channel
log = logging.getLogger("outlast.keys")
_LISTEN_LOST: tuple[type[BaseException], ...] = (*UNAVAILABLE, asyncpg.PostgresError)


class KeyCache:
    """The keys this process verified, so that a request costs no lookup, kept only while a LISTEN connection would
    hear them change.

    `listening()` holds that connection: migrations/0004 notifies on every revocation, deletion or rewrite of a key,
    whoever made it, and the key is dropped within a round trip. While the connection is down nothing is cached, and
    losing it drops everything, since changes made meanwhile went unheard. A lookup that raced a change does not
    cache its answer (the generation moved under it). `MAX_AGE_S` bounds what a connection that died without a word
    could leave behind; the listener also checks its connection every `CHECK_S`.

    Through a transaction pooler a LISTEN lasts one transaction and hears nothing, so without a direct URL the cache
    polls instead: every `POLL_S` it reads the keys' revision and empties itself when it moved, or when the poll
    fails or takes longer than `POLL_S`. A revoked key then stops working within `POLL_BOUND_S` of the commit.
    """

    MAX_AGE_S = 60.0
    CHECK_S = 5.0
    POLL_S = 2.0
    # The poll in flight at the commit may miss it (its snapshot was older), and the next starts POLL_S after it
    # ended and takes at most POLL_S: past that the cache is emptied either way.
    POLL_BOUND_S = 3 * POLL_S
    MAX_KEYS = 10_000  # only valid keys get in, so this is a bound on memory, not a defence

    def __init__(self) -> None:
        self.listening_now = False
        self._heard_from = asyncio.Event()
        self._keys: dict[str, tuple[bytes, keys.Grant, float]] = {}  # key id: (hash, what it grants, good until)
        self._generation = 0

    async def verify(self, db: Database, key: str) -> keys.Grant | None:
        """As `keys.verify`, from memory when this process already verified the key."""
        id, hashed = keys.key_id(key), keys.digest(key)
        entry = None if id is None else self._keys.get(id)
        if entry is not None and entry[2] > time.monotonic() and hmac.compare_digest(entry[0], hashed):
            return entry[1]
        generation = self._generation
        grant = await keys.verify(db, key)
        if grant is not None and id is not None and self.listening_now and generation == self._generation:
            if len(self._keys) >= self.MAX_KEYS:
                self._keys.clear()
            self._keys[id] = (hashed, grant, time.monotonic() + self.MAX_AGE_S)
        return grant

    async def grant_of(self, db: Database, id: str) -> keys.Grant | None:
        """What the usable key with this id grants, from memory under the same rules as `verify` (a dashboard
        session holds the key's id, never the key)."""
        entry = self._keys.get(id)
        if entry is not None and entry[2] > time.monotonic():
            return entry[1]
        generation = self._generation
        found = await keys.grant_of(db, id)
        if found is None:
            return None
        grant, hashed = found
        if self.listening_now and generation == self._generation:
            if len(self._keys) >= self.MAX_KEYS:
                self._keys.clear()
            self._keys[id] = (hashed, grant, time.monotonic() + self.MAX_AGE_S)
        return grant

    def forget(self, id: str | None = None) -> None:
        """Drop one key, or all of them."""
        self._generation += 1
        if id is None:
            self._keys.clear()
        else:
            self._keys.pop(id, None)

    @contextlib.asynccontextmanager
    async def listening(self, listen_url: str | None, db: Database, *, timeout_s: float) -> AsyncIterator[None]:
        """Keep the cache while key changes are heard: by LISTEN on `listen_url`, a connection that stays one
        session, or with None (a transaction pooler, no direct URL) by polling `db`."""
        if listen_url is None:
            log.warning(
                "keys: DATABASE_URL is a transaction pooler (OUTLAST_DATABASE_POOLER=transaction), where LISTEN hears"
                " nothing, and OUTLAST_DIRECT_DATABASE_URL is unset: polling for key changes every %.0f s instead, so"
                " a revoked key may still work for up to %.0f s here (set OUTLAST_DIRECT_DATABASE_URL to listen)",
                self.POLL_S,
                self.POLL_BOUND_S,
            )
            task = asyncio.create_task(self._poll(db))
        else:
            task = asyncio.create_task(self._listen(listen_url, timeout_s))
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

    async def _poll(self, db: Database) -> None:
        seen: int | None = None
        while True:
            try:
                revision = await asyncio.wait_for(keys.revision(db), self.POLL_S)
            except _LISTEN_LOST as exc:  # a slow poll too: TimeoutError is one
                if self.listening_now or seen is None:
                    log.warning("keys: can't poll for key changes (%r); every request looks its key up until then", exc)
                self._deaf()
                seen = -1  # whatever the next poll reads is news: nothing was cached meanwhile
            else:
                if revision != seen:
                    self.forget()
                    seen = revision
                self.listening_now = True
                self._heard_from.set()
            await asyncio.sleep(self.POLL_S)

    def _deaf(self) -> None:
        self.listening_now = False
        self.forget()
