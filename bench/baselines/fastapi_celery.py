"""The popular alternative: "start a job, poll its status" with FastAPI + Celery + Redis + PostgreSQL.

Written the way the tutorials teach it, and no worse:

- FastAPI with pydantic models, synchronous `def` routes (FastAPI runs them in its thread pool) and a
  SQLAlchemy `Session` per request from a `get_db` dependency, as in FastAPI's own SQL tutorial;
- SQLAlchemy 2 ORM on psycopg 3, the engine's default pool (5 connections + 10 overflow);
- Celery with the Redis broker. The status lives in a row the task updates (`queued` → `running` →
  `succeeded`, one commit each, as Outlast's three), not in Celery's result backend: its PostgreSQL backend
  (`db+postgresql://`) opens a new connection for every `AsyncResult` read in a process that did not fork
  (`celery.backends.database.session.SessionManager.get_engine` uses a NullPool there), which would make
  this baseline slower than anyone would ship;
- `POST /v1/jobs` inserts the row, commits, refreshes it and calls `run_job.delay(id)`; `GET /v1/jobs/{id}`
  is `db.get(Job, id)` through a `response_model`.

The web: `uvicorn --factory bench.baselines.fastapi_celery:create_app`, with the same flags as Outlast's. The
worker: `celery -A bench.baselines.fastapi_celery worker --concurrency 2 --loglevel info` (the prefork pool,
Celery's default; see bench/noop_jobs.py for why 2). Both read BENCH_CELERY_DATABASE_URL (a
`postgresql+psycopg://` URL) and BENCH_CELERY_REDIS_URL; neither has a default.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

import redis
from celery import Celery
from celery.signals import worker_ready
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict
from sqlalchemy import JSON, DateTime, String, create_engine, func
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

engine = create_engine(os.environ["BENCH_CELERY_DATABASE_URL"])
SessionLocal = sessionmaker(bind=engine)
celery = Celery("fastapi_celery", broker=os.environ["BENCH_CELERY_REDIS_URL"])
# Set by the worker once it consumes: how the bench knows it has started. bench/noop_jobs.py reads both names
# without importing this module, which needs its environment to import.
READY_KEY = "bench:celery:ready"
TABLE = "celery_jobs"


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = TABLE

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    type: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="queued")
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


# -- the task ---------------------------------------------------------------------------------------


@celery.task
def run_job(job_id: str) -> None:
    with SessionLocal() as db:
        job = db.get(Job, uuid.UUID(job_id))
        assert job is not None
        job.status, job.started_at = "running", datetime.now(UTC)
        db.commit()
        # the noop itself
        job.status, job.result, job.finished_at = "succeeded", None, datetime.now(UTC)
        db.commit()


@worker_ready.connect
def _ready(**_: Any) -> None:
    redis.Redis.from_url(os.environ["BENCH_CELERY_REDIS_URL"]).set(READY_KEY, 1)


# -- the web ----------------------------------------------------------------------------------------


class JobIn(BaseModel):
    type: str
    input: dict[str, Any] = {}


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    type: str
    status: str
    input: dict[str, Any]
    result: Any | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


def get_db() -> Iterator[Session]:
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


SessionDep = Annotated[Session, Depends(get_db)]


def create_app() -> FastAPI:
    Base.metadata.create_all(bind=engine)  # as the tutorials do at start-up
    app = FastAPI()

    @app.post("/v1/jobs", status_code=202, response_model=JobOut)
    def submit(body: JobIn, db: SessionDep) -> Job:
        job = Job(type=body.type, input=body.input)
        db.add(job)
        db.commit()
        db.refresh(job)
        run_job.delay(str(job.id))
        return job

    @app.get("/v1/jobs/{job_id}", response_model=JobOut)
    def show(job_id: uuid.UUID, db: SessionDep) -> Job:
        job = db.get(Job, job_id)
        if job is None:
            raise HTTPException(status_code=404, detail="not found")
        return job

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
