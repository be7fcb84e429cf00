"""`python -m bench.profile get|post|drain`: where Outlast's CPU goes, sampled with py-spy under the bench's load.

- get: the web process under the GET load of bench/get_job.py;
- post: the web process under the POST load of bench/submit_job.py;
- drain: the worker draining preloaded noop jobs, as in bench/drain.py.

It starts the same private services and processes as the bench, records the process with py-spy (`--nonblocking`,
so the process is never paused) for a few seconds, and prints the samples grouped by the package that was
running (the innermost Python frame; C code, such as asyncpg's protocol, counts for the frame that called it;
anything below SQLAlchemy counts as SQLAlchemy), the lines with the most samples, and the CPU per request or job
from /proc. The raw stacks are kept in .outlast/bench/profile-<what>.txt for a flame graph. py-spy needs
ptrace: root, or CAP_SYS_PTRACE.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import sys
from pathlib import Path

from bench.get_job import seed
from bench.noop_jobs import reset_outlast
from bench.procs import Fleet, load
from bench.run import Run, Settings, outlast_env
from bench.services import DATA, ROOT, api_key, prepare, services
from worker.connections import QUEUE

_FRAME = re.compile(r"^(.*) \((.*?):(\d+)\)$")
_SITE = re.compile(r"^.*/site-packages/")
_STDLIB = re.compile(r"^.*/python3\.\d+/")
SETTINGS = Settings(
    rounds=3, duration_s=1.0, warmup_s=1.0, concurrency=32, jobs=1, seed_jobs=3000,
    latency_samples=1, drain_jobs=8000, progress_jobs=1,
)  # fmt: skip


def _short(path: str) -> str:
    return _STDLIB.sub("", _SITE.sub("", path.replace(f"{ROOT}/", "")))


def _category(files: list[str]) -> str:
    if any(f.startswith(("sqlalchemy/", "<sqlalchemy")) for f in files):
        return "sqlalchemy (under databases, or an ORM)"
    leaf = files[-1]
    if leaf.split("/")[0] in ("server", "worker", "bench"):
        return leaf
    if leaf in ("asyncio/runners.py", "asyncio/base_events.py", "selectors.py"):
        return "the event loop (and the I/O it waits on)"
    return leaf.split("/")[0]


def summarize(raw: Path, top: int = 12) -> str:
    by_category: collections.Counter[str] = collections.Counter()
    by_line: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n, frames = int(count), [m for f in stack.split(";") if (m := _FRAME.match(f))]
        total += n
        if not frames:
            by_category["(no Python frame)"] += n
            continue
        by_category[_category([_short(m.group(2)) for m in frames])] += n
        leaf = frames[-1]
        by_line[f"{_short(leaf.group(2))}:{leaf.group(3)} {leaf.group(1)}"] += n
    out = [f"{total} samples; by what was running:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in by_category.most_common(top)]
    out.append("the lines with the most samples:")
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in by_line.most_common(top)]
    return "\n".join(out)


async def _spy(pid: int, out: Path, seconds: float) -> asyncio.subprocess.Process:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return await asyncio.create_subprocess_exec(
        py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200", "--format", "raw",
        "--output", str(out), "--nonblocking", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def _profile(what: str, seconds: float, out: Path) -> str:
    scratch = DATA / "run"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    fleet = Fleet(scratch)
    with services() as svc:
        await prepare(svc)
        run = Run(svc, fleet, SETTINGS, scratch, await api_key(svc))
        try:
            if what == "drain":
                from bench.drain import preload_outlast

                await reset_outlast(run)
                await preload_outlast(run, SETTINGS.drain_jobs)
                name, unit = "profile-worker", "job"
                await fleet.worker(name, "worker.settings.WorkerSettings", outlast_env(svc), svc.redis_url, QUEUE)
                cpu0, spy = fleet.cpu_s(name), await _spy(fleet.pid(name), out, seconds)
                await spy.wait()
                count = int(await _count_succeeded(svc.database_url))
                note = f"{count} jobs done since the worker started (its start-up included in the CPU)"
                cpu = fleet.cpu_s(name)
            else:
                name, unit = "profile-web", "request"
                url = await fleet.outlast(name, outlast_env(svc))
                args = [
                    "--concurrency",
                    "32",
                    "--warmup",
                    "0.5",
                    "--duration",
                    str(seconds + 1),
                    "--api-key",
                    run.api_key,
                ]
                if what == "get":
                    ids = scratch / "ids.txt"
                    ids.write_text("\n".join(await seed(svc.database_url, SETTINGS.seed_jobs, celery=False)))
                    args = ["get", "--url", url, "--ids", str(ids), *args]
                else:
                    args = ["post", "--url", url, *args]
                cpu0 = fleet.cpu_s(name)
                loading = asyncio.ensure_future(load(*args))
                await asyncio.sleep(0.5)
                spy = await _spy(fleet.pid(name), out, seconds)
                figures = await loading
                await spy.wait()
                count, cpu = figures["served"], fleet.cpu_s(name)
                note = f"{figures['rps']:,.0f} req/s"
            if spy.returncode:
                raise SystemExit(f"py-spy exited with {spy.returncode}: is it installed, and may it ptrace?")
        finally:
            await fleet.stop_all()
    return f"{what}: {1e6 * (cpu - cpu0) / count:,.0f} us of CPU per {unit}; {note}\n{summarize(out)}"


async def _count_succeeded(database_url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'succeeded'"))
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("what", choices=("get", "post", "drain"))
    parser.add_argument("--seconds", type=float, default=6.0, help="how long to sample")
    args = parser.parse_args(argv)
    out = DATA / f"profile-{args.what}.txt"
    print(asyncio.run(_profile(args.what, args.seconds, out)))
    print(f"raw stacks: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
