"""`outlast run` (what `make run` starts): embedded stores, migrations, web + worker; Ctrl-C leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, eventually, free_port, wait_done

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        # Its own process group, as a terminal's foreground job: Ctrl-C signals the whole group.
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)


async def test_outlast_run_starts_everything_and_ctrl_c_stops_all_it_started(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL") and "OUTLAST" not in k}
    env.update(PORT=str(port), OUTLAST_DATA_DIR=str(tmp_path / "data"))
    outlast = Path(sys.executable).parent / "outlast"
    run = spawn([str(outlast), "run"], env, tmp_path / "run.log")
    started: set[int] = set()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def up() -> bool | None:
                started.update(descendants(run.pid))
                try:
                    return (await client.get("/readyz")).status_code == 200 or None
                except httpx.TransportError:
                    assert run.poll() is None, (tmp_path / "run.log").read_text()
                    return None

            await eventually(up, within=90)
            submitted = await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [1, 2, 3]}})
            assert submitted.status_code == 202
            assert (await wait_done(client, submitted.json()["id"]))["result"] == 14
            started.update(descendants(run.pid))
        printed = (tmp_path / "run.log").read_text()
        assert f"http://127.0.0.1:{port}" in printed and "curl" in printed
        # Its own embedded database and no key yet: open, and loud about it.
        assert "OUTLAST IS RUNNING OPEN" in printed and "outlast keys create" in printed
        assert (tmp_path / "data" / "valkey" / "appendonlydir").exists()  # persistence is on

        os.killpg(run.pid, signal.SIGINT)
        await asyncio.to_thread(run.wait, 60)
        left = sorted(pid for pid in started if alive(pid))
        assert not left, f"still running after Ctrl-C: {left}"
        assert len(started) >= 4  # postgres, valkey, web, worker at least
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        for pid in started:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
