"""Jobs/s and every tier's CPU per job for 1 web and M = 1, 2 and 4 worker processes (issue 20's scaling model).

`python -m bench --only scaling`: not in the default run (about 4 minutes on a quiet machine at 5 rounds; 13 with
`--rounds 3 --jobs 400` on 2026-12-03's busy one). Each round runs the three configurations in an order that
changes every round (each M first, second and last once in three rounds), and PostgreSQL's commit ceiling (8
connections of one-row INSERTs, as bench/noop_jobs.py measures it) first or last. A configuration is the end-to-end
noop load of bench/noop_jobs.py on fresh processes: one web (`python -m server`) and M workers (`arq
worker.settings.WorkerSettings`, each with its own OUTLAST_WORKER_NAME, as a deployment names them); a warm-up
batch of a quarter of the jobs; 3 s idle, whose CPU and Redis commands are each process's floor; then the timed
batch, 3 x --jobs noop POSTs from --concurrency connections until the jobs table says all succeeded. Over the timed
batch, from its first row to the load generator's exit:

- CPU per job of each process from /proc/<pid>/stat: the web, each worker, PostgreSQL (the postmaster with its
  live backends and the ones it reaped), the load generator (from the moment its first job is in) and this process;
  Valkey's from `INFO cpu` (all threads, and its main thread, the one every command runs on); and each, less its
  floor over the same seconds, as `*_marginal_ms`;
- the machine's busy CPU from /proc/stat (steal included): what is not ours is the neighbours';
- write transactions per job (the transaction-id counter, exact, the sweep's included) and Redis commands per job
  (`INFO commandstats`, INFO itself left out);
- and over the whole life of the configuration's processes, counted once they have exited, every commit
  (pg_stat_database.xact_commit, read-only ones too) per job of the warm-up and timed batches, all in.

The table's ratios are each M against 1 in the same round, and each configuration's jobs/s against what `predict`
makes of the round's 1-worker figures: docs/performance.md "What limits scaling".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from bench.compare import Comparison, Figures, Metric
from bench.noop_jobs import POLL_CONNECT_XACTS, next_xid, reset_outlast, truncate
from bench.procs import CLOCK_TICKS, load, tree_cpu_s
from bench.run import Run, outlast_env
from bench.services import DATABASE
from worker.connections import QUEUE

WEB = "scaling-web"  # the processes, and their logs' names: scaling-worker-1 … -4 beside it
WORKERS = (1, 2, 4)
# Round i runs ORDERS[i % 6]: a Latin square (each M once in each place every three rounds), then its mirror.
ORDERS = ((1, 2, 4), (2, 4, 1), (4, 1, 2), (4, 2, 1), (1, 4, 2), (2, 1, 4))
BATCHES = 3  # the timed batch is this many --jobs: at ~1,000 jobs/s, 3 s against the load generator's start
PROBE_CONNECTIONS, PROBE_S = 8, 2.0  # PostgreSQL's commit ceiling, as bench/noop_jobs.py measures it
FIRST_ROW_POLL_S = 0.005
# The tiers whose CPU a job costs on this machine; their sum is what the CPU budget is divided by.
TIERS = ("web_ms", "workers_ms", "postgres_ms", "valkey_ms", "load_ms", "bench_ms")
# The tiers that cost something with nothing to run (polls, the sweep, autovacuum): their floor is measured apart.
FLOORED = ("web", "workers", "postgres", "valkey", "valkey_main")
IDLE_S = 3.0


def worker_name(i: int) -> str:
    return f"scaling-worker-{i}"


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot, every core, steal included (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def load_pid() -> int | None:
    """The load generator this process started: its child running bench.load."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text().rpartition(")")[2].split()
                if int(stat[1]) == os.getpid() and b"bench.load" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
    return None


async def postmaster_pid(admin: asyncpg.Connection) -> int | None:
    """PostgreSQL's postmaster, when it runs on this machine: the parent of our own backend."""
    return _postgres_parent(int(await admin.fetchval("SELECT pg_backend_pid()")))


def _postgres_parent(backend: int) -> int | None:
    try:
        parent = int(Path(f"/proc/{backend}/stat").read_text().rpartition(")")[2].split()[1])
        if b"postgres" in Path(f"/proc/{parent}/cmdline").read_bytes():
            return parent
    except (OSError, ValueError):
        pass
    return None  # a server elsewhere (BENCH_DATABASE_URL): its CPU is not ours to read


async def settled_commits(admin: asyncpg.Connection) -> int:
    """xact_commit of the bench database once no session is left on it: a backend reports its counts at most once
    a second while busy, 10 s after it goes idle, and always as it exits (bench/noop_jobs.py counts the same way)."""
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'"
    deadline = time.monotonic() + 30
    while await admin.fetchval(sessions, DATABASE):
        if time.monotonic() > deadline:
            raise RuntimeError(f"sessions on {DATABASE} did not end")
        await asyncio.sleep(0.05)
    return int(await admin.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = $1", DATABASE))


@dataclass(frozen=True)
class Sample:
    at: float
    web_s: float
    worker_s: tuple[float, ...]
    postgres_s: float
    valkey_s: float
    valkey_main_s: float
    redis_calls: int
    commands: dict[str, tuple[int, int]]  # per Redis command: calls, microseconds spent on them
    busy_s: float
    bench_s: float


class Meter:
    """Every counter a configuration's figures are deltas of, read at once."""

    def __init__(self, run: Run, redis: Redis, postmaster: int | None) -> None:
        self.run, self.redis, self.postmaster = run, redis, postmaster

    async def sample(self, workers: int) -> Sample:
        info = await self.redis.execute_command("INFO", "cpu", "commandstats")
        fleet = self.run.fleet
        own = resource.getrusage(resource.RUSAGE_SELF)
        return Sample(
            at=time.monotonic(),
            web_s=fleet.cpu_s(WEB),
            worker_s=tuple(fleet.cpu_s(worker_name(i)) for i in range(1, workers + 1)),
            postgres_s=tree_cpu_s(self.postmaster) if self.postmaster else 0.0,
            valkey_s=float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            # Valkey runs every command on its main thread: the one whose core is its ceiling.
            valkey_main_s=float(info.get("used_cpu_sys_main_thread", info["used_cpu_sys"]))
            + float(info.get("used_cpu_user_main_thread", info["used_cpu_user"])),
            redis_calls=sum(
                int(v["calls"]) for k, v in info.items() if k.startswith("cmdstat_") and k != "cmdstat_info"
            ),
            commands={k[8:]: (int(v["calls"]), int(v["usec"])) for k, v in info.items() if k.startswith("cmdstat_")},
            busy_s=machine_busy_s(),
            bench_s=own.ru_utime + own.ru_stime,
        )


def commands_per_job(before: Sample, after: Sample, jobs: int) -> dict[str, list[float]]:
    """Each Redis command's calls and microseconds per job between two samples, the costliest first."""
    deltas = {
        name: (calls - before.commands.get(name, (0, 0))[0], usec - before.commands.get(name, (0, 0))[1])
        for name, (calls, usec) in after.commands.items()
    }
    ranked = sorted(deltas.items(), key=lambda d: -d[1][1])
    return {name: [calls / jobs, usec / jobs] for name, (calls, usec) in ranked if calls}


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have exited: the load generator, once it has."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


async def start(run: Run, workers: int) -> str:
    """One web and `workers` workers, fresh, all at once; the web's URL once each answers (a worker: its
    health-check key, named by its instance)."""
    env = outlast_env(run.svc)
    redis = Redis.from_url(run.svc.redis_url)

    async def one(i: int) -> None:
        name = worker_name(i)
        key = f"{QUEUE}:health-check:{name}"

        async def ready() -> bool:
            return bool(await redis.exists(key))

        argv = [sys.executable, "-m", "arq", "worker.settings.WorkerSettings"]
        await run.fleet.process(name, argv, {**env, "OUTLAST_WORKER_NAME": name}, ready)

    try:
        url, *_ = await asyncio.gather(run.fleet.outlast(WEB, env), *(one(i) for i in range(1, workers + 1)))
    finally:
        await redis.aclose()
    return str(url)


async def stop(run: Run) -> None:
    await run.fleet.stop(WEB)
    for i in range(1, max(WORKERS) + 1):
        await run.fleet.stop(worker_name(i))


class Bench:
    def __init__(self, run: Run, admin: asyncpg.Connection, meter: Meter) -> None:
        self.run, self.admin, self.meter = run, admin, meter
        self.jobs = BATCHES * run.settings.jobs
        self.per_worker: dict[int, list[list[float]]] = {m: [] for m in WORKERS}  # each worker's CPU ms per job
        self.commands: dict[int, list[dict[str, list[float]]]] = {m: [] for m in WORKERS}  # calls, µs per job

    def _load_args(self, url: str, jobs: int) -> list[str]:
        s = self.run.settings
        return ["submit", "--url", url, "--database-url", self.run.svc.database_url, "--jobs", str(jobs),
                "--concurrency", str(s.concurrency), "--api-key", self.run.api_key]  # fmt: skip

    async def configuration(self, workers: int) -> Figures:
        run = self.run
        await reset_outlast(run)
        loadavg = os.getloadavg()[0]
        commits0 = await settled_commits(self.admin)
        polls = 0
        try:
            url = await start(run, workers)
            warm = await load(*self._load_args(url, max(1, self.jobs // 4)))
            await truncate(run.svc.database_url)  # the timed batch's poller counts succeeded jobs: from none
            idle = await self._idle(workers)
            figures, polls = await self._timed(url, workers)
            figures.update(idle)
            for tier in FLOORED:  # what the batch cost above the processes' idle floor, over the same window
                figures[f"{tier}_marginal_ms"] = figures[f"{tier}_ms"] - 1000 * idle[f"{tier}_idle_cores"] * (
                    figures["window_s"] / self.jobs
                )
            figures["redis_commands_marginal_per_job"] = figures["redis_commands_per_job"] - idle[
                "redis_idle_commands_per_s"
            ] * (figures["window_s"] / self.jobs)
            polls += warm["polls"] + POLL_CONNECT_XACTS
        finally:
            await stop(run)
        commits = await settled_commits(self.admin) - commits0 - polls
        figures["commits_per_job_all_in"] = commits / (self.jobs + max(1, self.jobs // 4))
        figures["loadavg"] = loadavg
        return figures

    async def _idle(self, workers: int) -> Figures:
        """The processes' floor: CPU (in cores) and Redis commands a second with nothing to run, warm."""
        s0 = await self.meter.sample(workers)
        await asyncio.sleep(IDLE_S)
        s1 = await self.meter.sample(workers)
        wall = s1.at - s0.at
        return {
            "web_idle_cores": (s1.web_s - s0.web_s) / wall,
            "workers_idle_cores": (sum(s1.worker_s) - sum(s0.worker_s)) / wall,
            "postgres_idle_cores": (s1.postgres_s - s0.postgres_s) / wall,
            "valkey_idle_cores": (s1.valkey_s - s0.valkey_s) / wall,
            "valkey_main_idle_cores": (s1.valkey_main_s - s0.valkey_main_s) / wall,
            "redis_idle_commands_per_s": (s1.redis_calls - s0.redis_calls) / wall,
        }

    async def _timed(self, url: str, workers: int) -> tuple[Figures, int]:
        """The timed batch's figures, and the read-only commits the bench's own pollers made meanwhile."""
        xid0, reaped0 = await next_xid(self.admin), children_cpu_s()
        loading = asyncio.ensure_future(load(*self._load_args(url, self.jobs)))
        db = await asyncpg.connect(self.run.svc.database_url)
        try:
            polls = 1  # the connection's own
            while not await db.fetchval("SELECT EXISTS (SELECT FROM jobs)"):
                polls += 1
                if loading.done():
                    loading.result()  # a load that failed before its first job: say why
                await asyncio.sleep(FIRST_ROW_POLL_S)
            pid = load_pid()
            load0 = tree_cpu_s(pid) if pid else 0.0
            s0 = await self.meter.sample(workers)
        finally:
            await db.close()
        batch = await loading
        s1 = await self.meter.sample(workers)
        xid1, reaped = await next_xid(self.admin), children_cpu_s() - reaped0
        n, wall = self.jobs, s1.at - s0.at
        worker_s = [b - a for a, b in zip(s0.worker_s, s1.worker_s, strict=True)]
        self.per_worker[workers].append([1000 * w / n for w in worker_s])
        self.commands[workers].append(commands_per_job(s0, s1, n))
        figures = {
            "jobs_per_s": batch["jobs_per_s"],
            "submitted_s": batch["submitted_s"],
            "window_s": wall,
            "web_ms": 1000 * (s1.web_s - s0.web_s) / n,
            "workers_ms": 1000 * sum(worker_s) / n,
            "postgres_ms": 1000 * (s1.postgres_s - s0.postgres_s) / n,
            "valkey_ms": 1000 * (s1.valkey_s - s0.valkey_s) / n,
            "valkey_main_ms": 1000 * (s1.valkey_main_s - s0.valkey_main_s) / n,
            "load_ms": 1000 * (reaped - load0) / n,
            "bench_ms": 1000 * (s1.bench_s - s0.bench_s) / n,
            "write_xacts_per_job": (xid1 - xid0) / n,
            "redis_commands_per_job": (s1.redis_calls - s0.redis_calls) / n,
            "machine_cores": (s1.busy_s - s0.busy_s) / wall,
        }
        ours = sum(figures[t] for t in TIERS) * n / 1000 / wall
        figures["ours_cores"] = ours
        figures["others_cores"] = max(0.0, figures["machine_cores"] - ours)
        return figures, polls


def predict(base: Figures, workers: int, cores: float, others: float, commits_per_s: float) -> dict[str, float]:
    """The model: jobs/s for 1 web and `workers` worker processes on `cores` cores, `others` of them busy with the
    neighbours', from one configuration's figures: each tier's CPU per job above its idle floor, and the floors,
    a worker's (with what it costs PostgreSQL and Valkey idle: its polls and sweeps) once per worker. Each limit,
    and the least of them."""
    m = workers
    floor = base["web_idle_cores"] + m * sum(base[f"{t}_idle_cores"] for t in ("workers", "postgres", "valkey"))
    marginal = sum(base[f"{t}_marginal_ms"] for t in ("web", "workers", "postgres", "valkey"))
    marginal += base["load_ms"] + base["bench_ms"]  # the load generator and this process have no floor
    limits = {
        "cpu_budget": (cores - others - floor) / per_job_s(marginal),  # every tier shares the cores
        "web": (1 - base["web_idle_cores"]) / per_job_s(base["web_marginal_ms"]),  # one process is one core at most
        "workers": m * (1 - base["workers_idle_cores"]) / per_job_s(base["workers_marginal_ms"]),
        "valkey": (1 - m * base["valkey_main_idle_cores"]) / per_job_s(base["valkey_main_marginal_ms"]),  # one thread
        "commits": commits_per_s / base["write_xacts_per_job"],  # each write transaction a durable commit
    }
    limits["jobs_per_s"] = min(limits.values())
    return limits


def per_job_s(ms: float) -> float:
    """Milliseconds per job as seconds; at least a nanosecond, since a floor measured above a batch's cost is noise."""
    return max(ms, 1e-6) / 1000


def _shown(figures: Figures) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in figures.items())


async def measure(run: Run) -> list[Comparison]:
    s = run.settings
    cores = float(os.cpu_count() or 1)
    vs_one = {
        m: Comparison(
            f"scaling_{m}w",
            "1 web + 1 worker, same round",
            [
                Metric("jobs_per_s", f"noop jobs/s, 1 web + {m} workers", higher_is_better=True),
                Metric("cpu_ms_per_job", f"CPU ms per job, all tiers, {m} workers", higher_is_better=False),
                Metric("write_xacts_per_job", f"write transactions per job, {m} workers", higher_is_better=False),
                Metric("redis_commands_per_job", f"Redis commands per job, {m} workers", higher_is_better=False),
            ],
        )
        for m in WORKERS[1:]
    }
    model = Comparison(
        "scaling_model",
        "the model, from the round's 1-worker figures",
        [Metric(f"jobs_per_s_{m}w", f"noop jobs/s, 1 web + {m} workers, measured ÷ model", True) for m in WORKERS],
    )
    admin = await asyncpg.connect(run.svc.admin_url)
    redis = Redis.from_url(run.svc.redis_url)
    rounds: list[dict[str, Any]] = []
    try:
        bench = Bench(run, admin, Meter(run, redis, await postmaster_pid(admin)))

        async def ceiling() -> float:
            args = ["--concurrency", str(PROBE_CONNECTIONS), "--duration", str(PROBE_S)]
            return float((await load("commits", "--database-url", run.svc.database_url, *args))["commits_per_s"])

        await stop(run)
        await bench.configuration(1)  # untimed: the first start-up of all pays the page cache and imports
        for i in range(s.rounds):
            got: dict[int, Figures] = {}
            commits_per_s = await ceiling() if i % 2 else 0.0
            for m in ORDERS[i % len(ORDERS)]:
                got[m] = await bench.configuration(m)
                got[m]["cpu_ms_per_job"] = sum(got[m][t] for t in TIERS)
                print(f"bench: round {i + 1}/{s.rounds} scaling {m}w: {_shown(got[m])}", file=sys.stderr, flush=True)
            commits_per_s = commits_per_s or await ceiling()
            predicted = {
                m: predict(got[1], m, cores, got[m]["others_cores"], commits_per_s) for m in WORKERS
            }  # fmt: skip
            for m, comparison in vs_one.items():
                comparison.rounds.append((got[m], got[1]))
            model.rounds.append(
                (
                    {f"jobs_per_s_{m}w": got[m]["jobs_per_s"] for m in WORKERS},
                    {f"jobs_per_s_{m}w": predicted[m]["jobs_per_s"] for m in WORKERS},
                )
            )
            rounds.append({"order": ORDERS[i % len(ORDERS)], "commits_per_s": commits_per_s, "figures": got,
                           "predicted": predicted})  # fmt: skip
            shown = ", ".join(f"{m}w {predicted[m]['jobs_per_s']:.0f}" for m in WORKERS)
            print(f"bench: round {i + 1}/{s.rounds} scaling model: {shown}; commits/s {commits_per_s:.0f}",
                  file=sys.stderr, flush=True)  # fmt: skip
    finally:
        await stop(run)
        await redis.aclose()
        await admin.close()
    model.notes.update(
        jobs=bench.jobs, concurrency=s.concurrency, cores=cores, rounds=rounds, worker_cpu_ms_per_job=bench.per_worker,
        redis_commands_per_job=bench.commands,
        medians={
            m: {k: statistics.median(r["figures"][m][k] for r in rounds) for k in rounds[0]["figures"][m]}
            for m in WORKERS
        },
    )  # fmt: skip
    return [*vs_one.values(), model]
