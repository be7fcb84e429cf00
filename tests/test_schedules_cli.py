"""`outlast schedules list|pause|resume|trigger` (worker/tools/schedules_cli.py), run as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from tests.conftest import job_row
from tests.test_schedules import create
from worker import Config, Deps


def outlast(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLAST_")}
    env |= {"DATABASE_URL": config.database_url, "REDIS_URL": config.redis_url}
    argv = [str(Path(sys.executable).parent / "outlast"), "schedules", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


async def test_outlast_schedules_list_pause_resume_trigger(
    client: httpx.AsyncClient, deps: Deps, config: Config, drain: Callable[[], Awaitable[None]]
) -> None:
    await create(client, id="report", timezone="Europe/Paris")
    listed = await asyncio.to_thread(outlast, config, "list")
    assert listed.returncode == 0, listed.stderr
    [header, line] = listed.stdout.splitlines()
    assert header.split()[:3] == ["tenant", "id", "cron"]
    assert line.split()[:8] == ["default", "report", "*/5", "*", "*", "*", "*", "Europe/Paris"] and "active" in line
    assert "CES" in line or "CET" in line  # the next run on the schedule's own clock

    paused = await asyncio.to_thread(outlast, config, "pause", "report")
    assert paused.returncode == 0 and "paused default/report" in paused.stderr, paused.stderr
    assert (await client.get("/v1/schedules/report")).json()["paused"] is True
    resumed = await asyncio.to_thread(outlast, config, "resume", "report")
    assert resumed.returncode == 0 and "next run" in resumed.stderr, resumed.stderr
    assert (await client.get("/v1/schedules/report")).json()["paused"] is False

    triggered = await asyncio.to_thread(outlast, config, "trigger", "report")
    assert triggered.returncode == 0, triggered.stderr
    job_id = json.loads(triggered.stdout)["id"]
    await drain()  # the CLI rang the doorbell: a burst worker finds it
    assert (await job_row(deps, job_id))["status"] == "succeeded"

    assert (await asyncio.to_thread(outlast, config, "trigger", "nope")).returncode == 1
    assert (await asyncio.to_thread(outlast, config, "pause", "report", "--tenant", "beta")).returncode == 1
    others = await asyncio.to_thread(outlast, config, "list", "--tenant", "beta")
    assert others.returncode == 0 and len(others.stdout.splitlines()) == 1 and "no schedules" in others.stderr
