"""What every measurement gets: the services, the fleet of processes, the settings and a scratch folder."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Fleet, load
from bench.services import Services

# the job types Outlast's processes register
JOB_MODULES = "bench.noop_job,bench.keyed_job,bench.progress_job,bench.workflow_job"
SECRET_KEY = secrets.token_urlsafe(32)  # signs the job read tokens in Job links; this run's only


@dataclass(frozen=True)
class Settings:
    rounds: int
    duration_s: float  # per side per round, for fixed-duration load
    warmup_s: float  # load before each timed window, not counted
    concurrency: int  # keep-alive connections, or concurrent enqueuers
    jobs: int  # noop jobs per batch
    seed_jobs: int  # succeeded jobs to GET at random
    latency_samples: int  # idle submits per side per round
    drain_jobs: int  # preloaded noop jobs per drain
    progress_jobs: int  # jobs per commits-per-job batch
    running_jobs: int = 2_000  # jobs running at once on one worker (bench/running.py); --scale


@dataclass(frozen=True)
class Run:
    svc: Services
    fleet: Fleet
    settings: Settings
    scratch: Path
    api_key: str  # `Authorization: Bearer` on every request to Outlast (the baselines ignore it)

    async def http_load(self, command: str, name: str, url: str, *args: str, expect: int) -> dict[str, Any]:
        """`python -m bench.load <command>` against the web process `name` at `url`, for the run's concurrency and
        duration, with that process's CPU per request added as `cpu_us`. Any answer but `expect` stops the bench."""
        s = self.settings
        timing = ["--concurrency", str(s.concurrency), "--warmup", str(s.warmup_s), "--duration", str(s.duration_s)]
        cpu0 = self.fleet.cpu_s(name)
        figures = await load(command, "--url", url, *args, *timing, "--api-key", self.api_key)
        figures["cpu_us"] = 1e6 * (self.fleet.cpu_s(name) - cpu0) / figures["served"]
        if figures["errors"]:
            raise RuntimeError(f"{url} answered {figures['errors']} requests with other than {expect}")
        return figures


def outlast_env(svc: Services) -> dict[str, str]:
    """The environment of Outlast's web and worker: our services and the noop type.

    Other OUTLAST_* variables pass through, so a tuning (say OUTLAST_WORKER_MAX_JOBS) can be measured; the
    report lists them.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "PORT")}
    env.update(DATABASE_URL=svc.database_url, REDIS_URL=svc.redis_url, OUTLAST_JOB_MODULES=JOB_MODULES)
    env.setdefault("OUTLAST_SECRET_KEY", SECRET_KEY)
    # The per-key submit limit (20/s by default) is a policy, not a cost: lifted, so the bench measures what
    # a submit costs. The bucket is still checked on every submit.
    env.setdefault("OUTLAST_SUBMIT_RATE_PER_S", "1000000")
    env.setdefault("OUTLAST_SUBMIT_BURST", "1000000")
    return env


def baseline_env(svc: Services) -> dict[str, str]:
    """The environment of every baseline process: no OUTLAST_* tuning, and each baseline's own services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLAST_")}
    env.update(
        BENCH_DATABASE_URL=svc.database_url,
        BENCH_BASELINE_REDIS_URL=svc.baseline_redis_url,
        BENCH_NAIVE_REDIS_URL=svc.naive_redis_url,
        BENCH_CELERY_REDIS_URL=svc.celery_redis_url,
        BENCH_CELERY_DATABASE_URL="postgresql+psycopg://" + svc.database_url.split("://", 1)[1],
    )
    return env


def tuning() -> dict[str, str]:
    """OUTLAST_* variables set by the caller, which change what is measured."""
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith("OUTLAST_") and k not in ("OUTLAST_JOB_MODULES", "OUTLAST_SECRET_KEY")
    }
