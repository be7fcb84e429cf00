"""What every measurement gets: the services, the fleet of processes, the settings and a scratch folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Fleet
from bench.services import Services


@dataclass(frozen=True)
class Settings:
    rounds: int
    duration_s: float  # per side per round, for fixed-duration load
    warmup_s: float  # load before each timed window, not counted
    concurrency: int  # keep-alive connections, or concurrent enqueuers
    jobs: int  # noop jobs per batch
    seed_jobs: int  # succeeded jobs to GET at random


@dataclass(frozen=True)
class Run:
    svc: Services
    fleet: Fleet
    settings: Settings
    scratch: Path


def outlast_env(svc: Services) -> dict[str, str]:
    """The environment of Outlast's web and worker: our services and the noop type.

    Other OUTLAST_* variables pass through, so a tuning (say OUTLAST_WORKER_MAX_JOBS) can be measured; the
    report lists them.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "PORT")}
    env.update(DATABASE_URL=svc.database_url, REDIS_URL=svc.redis_url, OUTLAST_JOB_MODULES="bench.noop_job")
    return env


def tuning() -> dict[str, str]:
    """OUTLAST_* variables set by the caller, which change what is measured."""
    return {k: v for k, v in os.environ.items() if k.startswith("OUTLAST_") and k != "OUTLAST_JOB_MODULES"}
