"""The one registry of job types: the built-in demos plus the modules named in OUTLAST_JOB_MODULES."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import msgspec

from worker.job import JobType
from worker.job_types import chunks, flaky, report, scrape, sleep, sums, vectors

BUILT_IN: tuple[JobType, ...] = (sums.SQUARE_SUM, sums.CUBE_SUM, sleep.JOB_TYPE, flaky.JOB_TYPE)
BUILT_IN += (chunks.SPLIT, chunks.CHUNK_SUM, chunks.TOTAL, chunks.SPAWN_SUM)  # the workflow demos
BUILT_IN += (scrape.JOB_TYPE,)  # real work: the web, through ctx.http's guard
BUILT_IN += (vectors.VECTOR_INDEX, vectors.VECTOR_SEARCH)  # real work: pgvector, a bundled model
BUILT_IN += (report.JOB_TYPE,)  # real work: CSV and Parquet files in the blob store


def load(modules: str = "") -> Mapping[str, JobType]:
    """Built-in types and those of `modules` (comma-separated), each module exposing JOB_TYPE or JOB_TYPES (or only
    SCHEDULES)."""
    found = list(BUILT_IN)
    for name in filter(None, (m.strip() for m in modules.split(","))):
        module = importlib.import_module(name)
        types = list(getattr(module, "JOB_TYPES", ()))
        if hasattr(module, "JOB_TYPE"):
            types.append(module.JOB_TYPE)
        if not types and not hasattr(module, "SCHEDULES"):  # a module may declare only schedules (worker/schedules.py)
            raise RuntimeError(f"job module {name!r} defines none of JOB_TYPE, JOB_TYPES and SCHEDULES")
        found.extend(types)
    registry: dict[str, JobType] = {}
    for job_type in found:
        if not isinstance(job_type, JobType):
            raise RuntimeError(f"{job_type!r} is not a worker.JobType")
        if job_type.name in registry:
            raise RuntimeError(f"job type {job_type.name!r} is registered twice")
        registry[job_type.name] = job_type
    return registry


class JobTypeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A job type as GET /v1/job-types and `outlast types --json` show it."""

    name: str
    description: str
    retry_safe: bool
    timeout_s: int
    max_attempts: int
    input_schema: dict[str, Any]


def describe(types: Mapping[str, JobType], default_max_attempts: int) -> list[JobTypeInfo]:
    return [
        JobTypeInfo(
            name=t.name,
            description=t.description,
            retry_safe=t.retry_safe,
            timeout_s=t.timeout_s,
            max_attempts=t.max_attempts or default_max_attempts,
            input_schema=msgspec.json.schema(t.input),
        )
        for t in types.values()
    ]
