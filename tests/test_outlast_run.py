"""`outlast run` (what `make run` starts), as a new user meets it: embedded stores, a job module of their own in the
directory they started it from, every other command finding its stores without copied URLs, and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import eventually, free_port
from worker.config import STORES_FILE

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MY_JOBS = """
import msgspec
from worker import Context, JobType


class Input(msgspec.Struct):
    name: str


async def run(input: Input, ctx: Context) -> str:
    return f"hello, {input.name}"


JOB_TYPE = JobType("hello", Input, run, timeout_s=30)
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTLAST_", "DATABASE_URL", "REDIS_URL", "PORT"))}
    return {**env, **extra}


def command(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, dict[str, str]]]:
    (tmp_path / "myjobs.py").write_text(MY_JOBS)
    env = clean_env(PORT=str(free_port()), OUTLAST_JOB_MODULES="myjobs")
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "outlast"), "run"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # Ctrl-C reaches a terminal's whole foreground group: the test signals the group
    )  # fmt: skip
    try:
        yield proc, tmp_path, env
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


async def test_make_run_serves_a_job_module_from_its_directory_tells_every_command_its_stores_and_stops_on_ctrl_c(
    running: tuple[subprocess.Popen[str], Path, dict[str, str]],
) -> None:
    proc, here, env = running
    stores = here / ".outlast" / STORES_FILE

    async def up() -> str | None:
        if not stores.exists():
            return None
        url = dict(line.split("=", 1) for line in stores.read_text().splitlines() if "=" in line)["OUTLAST_URL"]
        try:
            async with httpx.AsyncClient() as client:
                return url if (await client.get(f"{url}/readyz")).status_code == 200 else None
        except httpx.TransportError:
            return None

    url = await eventually(up, within=120)
    banner = (here / "run.log").read_text()
    assert "Running open" in banner and "curl -si -X POST" in banner

    async with httpx.AsyncClient(base_url=url) as client:  # open mode: no key yet
        job = (await client.post("/v1/jobs", json={"type": "hello", "input": {"name": "you"}})).json()

        async def done() -> dict[str, object] | None:
            shown: dict[str, object] = (await client.get(f"/v1/jobs/{job['id']}")).json()
            return shown if shown["done"] else None

        assert (await eventually(done, within=30))["result"] == "hello, you"  # myjobs.py, imported from here

    # No URL in the environment: each command finds the stores of the `make run` up in this directory.
    listed = command([str(BIN / "outlast"), "keys", "list"], here, env)
    assert listed.returncode == 0, listed.stderr
    jobs = command([str(BIN / "outlast"), "jobs", "list", "--json"], here, env)
    assert jobs.returncode == 0, jobs.stderr
    assert [j["id"] for j in map(json.loads, jobs.stdout.splitlines())] == [job["id"]]
    waited = command([str(BIN / "outlast"), "jobs", "wait", str(job["id"])], here, env)  # Redis too
    assert waited.returncode == 0, waited.stderr
    checked = command([str(BIN / "arq"), "--check", "worker.settings.WorkerSettings"], here, env)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    assert proc.wait(60) == 0  # asked to stop, and stopped: make prints no Error 130
    assert not stores.exists()


def test_without_urls_or_a_make_run_a_command_says_what_to_set_in_one_line(tmp_path: Path) -> None:
    """It used to connect to 127.0.0.1:5432 (whoever answers there) and end in an asyncpg traceback."""
    answer = command([str(BIN / "outlast"), "keys", "list"], tmp_path, clean_env())
    assert answer.returncode != 0 and "Traceback" not in answer.stderr
    assert answer.stderr.strip().count("\n") == 0, answer.stderr
    assert "DATABASE_URL is not set" in answer.stderr and "make run" in answer.stderr  # all `keys` needs
    check = command([str(BIN / "arq"), "--check", "worker.settings.WorkerSettings"], tmp_path, clean_env())
    assert check.returncode != 0 and "DATABASE_URL" in check.stderr and "Traceback" not in check.stderr
