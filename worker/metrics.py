"""The engine's Prometheus metrics, the queue's gauges read from the jobs table, and how a process exposes them.

Counters and histograms are this process's (`REGISTRY`, one per process: the engine's code counts wherever it runs,
in a web process or a worker). A scrape must read a deployment's sum, not whichever process the port's listener
handed it to, so with `PROMETHEUS_MULTIPROC_DIR` set (prometheus-client's multiprocess mode, which `python -m
server` turns on by itself when it runs several uvicorn workers) every process writes its values to files there
and any one of them answers with the sum of all. Workers on one host may share a directory and a port that way;
one per pod, each is scraped on its own and Prometheus sums them.

The queue's gauges (queued, running, scheduled by type, the oldest due job's age) are not counted but read from
the table (worker/stats.py), cached for `QUEUE_CACHE_S`, and only a web process's /metrics shows them: every process
would read the same truth, and a sum over web and workers would count it once per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Iterable, Sequence

from databases import Database
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from worker import stats

log = logging.getLogger("outlast.metrics")
QUEUE_CACHE_S = 5.0
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A job runs from milliseconds to an hour; its wait for a worker should be under a second.
RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, float("inf"))
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))

# A `_created` series beside every counter and histogram doubles a scrape for what `rate()` never reads; the
# multiprocess mode writes none anyway, so a scrape reads the same series in both modes.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry()
attempts = Counter("outlast_job_attempts", "Attempts started, by job type", ["type"], registry=REGISTRY)
finished = Counter(
    "outlast_jobs_finished",
    "Attempts that ended their job, by type and status (succeeded, failed, cancelled)",
    ["type", "status"],
    registry=REGISTRY,
)
retries = Counter("outlast_job_retries", "Failed attempts to be tried again, by type", ["type"], registry=REGISTRY)
run_seconds = Histogram(
    "outlast_job_run_seconds", "How long an attempt ran, by type", ["type"], buckets=RUN_BUCKETS, registry=REGISTRY
)
queue_wait_seconds = Histogram(
    "outlast_job_queue_wait_seconds",
    "How long a job waited, from due to claimed, by type",
    ["type"],
    buckets=WAIT_BUCKETS,
    registry=REGISTRY,
)
rescued = Counter("outlast_jobs_rescued", "Running jobs the sweep took back from a lost worker", registry=REGISTRY)
expired = Counter("outlast_jobs_expired", "Jobs the sweep ended as past their expires_at", registry=REGISTRY)
slots = Gauge(
    "outlast_worker_slots",
    "This worker's job slots, busy or free",
    ["state"],
    multiprocess_mode="liveall",  # per worker process: a pid label each
    registry=REGISTRY,
)
webhooks = Counter(
    "outlast_webhook_deliveries",
    "Webhook delivery attempts, by outcome (delivered, retrying, failed)",
    ["outcome"],
    registry=REGISTRY,
)
webhook_seconds = Histogram(
    "outlast_webhook_latency_seconds",
    "How long a receiver took to answer a delivery attempt",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
database_errors = Counter(
    "outlast_database_errors", "Statements that found PostgreSQL unreachable or too slow", registry=REGISTRY
)
redis_errors = Counter("outlast_redis_errors", "Redis commands that found Redis unreachable", registry=REGISTRY)
sweep_seconds = Histogram(
    "outlast_sweep_seconds",
    "How long a sweep pass took",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, float("inf")),
    registry=REGISTRY,
)


class Slots:
    """This worker's busy and free slots, as its attempts start and end."""

    def __init__(self, total: int) -> None:
        self.total, self.busy = total, 0
        self._set()

    def take(self) -> None:
        self.busy += 1
        self._set()

    def give_back(self) -> None:
        self.busy -= 1
        self._set()

    def _set(self) -> None:
        slots.labels("busy").set(self.busy)
        slots.labels("free").set(max(0, self.total - self.busy))


class QueueGauges(Collector):
    """The deployment's queue from the jobs table, read at most every QUEUE_CACHE_S by `refresh` (a scrape's
    `collect` can't await)."""

    def __init__(self) -> None:
        self._live = stats.Live({}, {})
        self._read_at = -QUEUE_CACHE_S
        self._lock = asyncio.Lock()

    async def refresh(self, db: Database) -> None:
        async with self._lock:
            if time.monotonic() - self._read_at < QUEUE_CACHE_S:
                return
            self._live = await stats.live(db)
            self._read_at = time.monotonic()

    def collect(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily(
            "outlast_jobs", "Live jobs by type and state, from the jobs table", labels=["type", "state"]
        )
        for type_, counts in self._live.types.items():
            for state in ("queued", "scheduled", "waiting", "running"):
                jobs.add_metric([type_, state], getattr(counts, state))
        oldest = GaugeMetricFamily(
            "outlast_oldest_queued_seconds", "Age of the longest-due queued job, by type", labels=["type"]
        )
        for type_, age in self._live.oldest_s.items():
            oldest.add_metric([type_], age)
        yield jobs
        yield oldest


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


_LIVE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db$")


def _forget_dead(path: str) -> None:
    """Drop the live gauges of processes that died without saying so (a kill -9, a restarted uvicorn worker)."""
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        if (match := _LIVE_FILE.search(name)) is None:
            continue
        pid = int(match[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, another user's


def exposition(registries: Sequence[CollectorRegistry], queue: QueueGauges | None = None) -> bytes:
    """The text a scrape reads: this process's `registries` (the engine's and, in a web process, the app's), or
    in multiprocess mode every process's, summed; and the queue's gauges."""
    registry = CollectorRegistry()
    if (path := multiprocess_dir()) is not None:
        _forget_dead(path)
        MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
        parts = [generate_latest(registry)]
    else:
        parts = [generate_latest(r) for r in registries]
    if queue is not None:
        parts.append(generate_latest(_single(queue)))
    return b"".join(parts)


def _single(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


@contextlib.asynccontextmanager
async def serving(port: int | None, *, host: str = "0.0.0.0") -> AsyncIterator[int | None]:
    """A worker's `GET /metrics` (the engine's counters, no queue gauges) on `port` (OUTLAST_WORKER_METRICS_PORT;
    None: not served; 0: any free port), yielding the port it listens on. In multiprocess mode the port is shared
    (SO_REUSEPORT) by the workers of the host, each answering for all; else a second worker on the same port is
    told so and goes on without."""
    if port is None:
        yield None
        return

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path.split(b"?")[0] != b"/metrics":
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            else:
                body = exposition([REGISTRY])
                head = f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\nContent-Length: {len(body)}\r\n"
                writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    shared = multiprocess_dir() is not None
    try:
        server = await asyncio.start_server(answer, host, port, reuse_port=shared or None)
    except OSError as exc:
        log.warning(
            "metrics: can't listen on port %d (%s); this worker's metrics are not served: give each worker its own "
            "OUTLAST_WORKER_METRICS_PORT, or share one through %s",
            port,
            exc,
            MULTIPROC_ENV,
        )
        yield None
        return
    async with server:
        bound = int(server.sockets[0].getsockname()[1])
        log.info("metrics: GET /metrics on port %d", bound)
        yield bound
