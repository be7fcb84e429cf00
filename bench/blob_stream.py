"""A 100 MB result streamed by GET /v1/jobs/{id}/result (the blob store, PostgreSQL chunks) against a bare Starlette
FileResponse of the same bytes from a file, each one uvicorn process with the same flags, downloads alternating;
and how much the web's resident memory grows while it streams (issue 17: >= 0.8x the FileResponse, <= 20 MB).

    python -m bench --only blob_stream            (in the whole run too: about 40 s of it)
    python -m bench.blob_stream [--mb 100] [--rounds 5]

The store is read as a job's code would leave it: the result written through worker/blobs.py, the row pointing at
it. One client at a time (a download is bandwidth, not a request rate); the client discards what it reads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
from databases import Database
from uuid_utils.compat import uuid7

from bench.compare import Comparison, Figures, Metric, alternate
from bench.procs import Fleet, tree_cpu_s
from bench.report import table
from bench.run import Run, baseline_env, outlast_env
from bench.services import Services, api_key, free_port, prepare, services

WEB, BARE = "blob-web", "blob-file-response"
MB = 100
RSS_GOAL_MB = 20.0  # the web's resident memory may grow this much at most while it streams
STREAM = [
    Metric("mb_s", "GET …/result of a 100 MB stored result, MB/s", higher_is_better=True, goal=0.8),
    # On a shared machine throughput is the scheduler's share as much as the work: CPU per MB is the work. The
    # stored side's is the web's and PostgreSQL's (every process of the server), the bare side's its one process.
    Metric("cpu_ms_per_mb", "the server side's CPU per MB streamed, ms", higher_is_better=False),
]

_JOB = """
INSERT INTO jobs (id, type, status, input, attempt, max_attempts, timeout_s, retry_safe, progress, result_size,
                  started_at, finished_at, expires_at, event_seq)
VALUES (:id, 'noop', 'succeeded', '{}', 1, 3, 60, true, '{"fraction": 1.0, "message": null}', :size,
        now(), now(), now() + interval '7 days', 3)
"""
_FILE_APP = """
import os
from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Route

PATH = os.environ["BENCH_FILE"]

async def file(request):
    return FileResponse(PATH, media_type="application/json")

app = Starlette(routes=[Route("/file", file)])
"""
UVICORN = [
    "--host",
    "127.0.0.1",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--no-access-log",
    "--log-level",
    "warning",
]


def _pieces(total: int) -> Iterator[bytes]:
    block = (b'"' + b"0123456789abcdef" * 65_536)[: 1 << 20]
    sent = 0
    while sent < total:
        piece = block[: min(len(block), total - sent)]
        sent += len(piece)
        yield piece


async def _aiter(total: int) -> AsyncIterator[bytes]:
    for piece in _pieces(total):
        yield piece


async def seed(svc: Services, total: int) -> str:
    from worker import Config, blobs

    db = Database(svc.database_url)
    await db.connect()
    try:
        job_id = uuid7()
        await db.execute(_JOB, {"id": job_id, "size": total})
        store = blobs.of(Config(database_url=svc.database_url), db)
        await store.write(
            _aiter(total), tenant="default", kind="result", content_type="application/json", job_id=job_id, attempt=1
        )
        await db.execute("VACUUM ANALYZE blob_chunks")
        return str(job_id)
    finally:
        await db.disconnect()


def write_file(path: Path, total: int) -> None:
    with path.open("wb") as out:
        for piece in _pieces(total):
            out.write(piece)


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


async def download(url: str, headers: dict[str, str], pid: int) -> tuple[float, int, int]:
    """(MB/s, bytes, the server's peak RSS growth in KiB) of one whole download."""
    base = rss_kib(pid)
    peak = base
    got = 0
    async with httpx.AsyncClient(timeout=120) as client:
        began = time.perf_counter()
        async with client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200, response.status_code
            async for piece in response.aiter_raw(1 << 20):
                got += len(piece)
                peak = max(peak, rss_kib(pid))
        elapsed = time.perf_counter() - began
    return got / elapsed / 1e6, got, peak - base


async def measure(run: Run) -> Comparison:
    """`python -m bench --only blob_stream`: the comparison, one download a side a round."""
    return await compare(run.svc, run.fleet, run.scratch, run.api_key, MB, run.settings.rounds)


async def compare(svc: Services, fleet: Fleet, scratch: Path, key: str, mb: int, rounds: int) -> Comparison:
    total = mb * 1_000_000
    job_id = await seed(svc, total)
    folder = scratch / "blob_stream"
    folder.mkdir(exist_ok=True)
    path = folder / "result.json"
    write_file(path, total)
    (folder / "file_app.py").write_text(_FILE_APP)
    ours_port, file_port = free_port(), free_port()
    uvicorn = [sys.executable, "-m", "uvicorn", *UVICORN]
    await fleet.start(WEB, [*uvicorn, "--factory", "server.app:create_app", "--port", str(ours_port)], outlast_env(svc))
    await fleet.start(BARE, [*uvicorn, "--app-dir", str(folder), "file_app:app", "--port", str(file_port)],
                      {**baseline_env(svc), "BENCH_FILE": str(path)})  # fmt: skip
    try:
        ours_url = f"http://127.0.0.1:{ours_port}/v1/jobs/{job_id}/result"
        bare_url = f"http://127.0.0.1:{file_port}/file"
        await wait_up(f"http://127.0.0.1:{ours_port}/healthz")
        await wait_up(bare_url)
        auth = {"Authorization": f"Bearer {key}"}
        await download(ours_url, auth, fleet.pid(WEB))  # warm: connections, caches, the page cache
        await download(bare_url, {}, fleet.pid(BARE))
        grew: list[float] = []
        postmaster = await _postmaster(svc)

        def server_cpu_s() -> float:
            return fleet.cpu_s(WEB) + (tree_cpu_s(postmaster) if postmaster else 0.0)

        async def outlast() -> Figures:
            cpu = server_cpu_s()
            rate, got, rss = await download(ours_url, auth, fleet.pid(WEB))
            assert got == total, got
            grew.append(rss / 1024)
            return {"mb_s": rate, "cpu_ms_per_mb": 1000 * (server_cpu_s() - cpu) / mb}

        async def bare() -> Figures:
            cpu = fleet.cpu_s(BARE)
            rate, got, _ = await download(bare_url, {}, fleet.pid(BARE))
            assert got == total, got
            return {"mb_s": rate, "cpu_ms_per_mb": 1000 * (fleet.cpu_s(BARE) - cpu) / mb}

        comparison = Comparison("blob_stream", "a bare Starlette FileResponse of the same bytes", STREAM)
        await alternate(comparison, outlast, bare, rounds)
        comparison.notes.update(mb=mb, rss_growth_mb=[round(g, 1) for g in grew], rss_goal_mb=RSS_GOAL_MB)
        return comparison
    finally:
        await fleet.stop(WEB)
        await fleet.stop(BARE)


async def _postmaster(svc: Services) -> int | None:
    """PostgreSQL's postmaster when it runs on this machine (the parent of a backend of ours), else None."""
    conn = await asyncpg.connect(svc.database_url)
    try:
        return _parent(await conn.fetchval("SELECT pg_backend_pid()"))
    finally:
        await conn.close()


def _parent(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    return None


async def wait_up(url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(1200):
            with contextlib.suppress(httpx.TransportError):
                await client.get(url)
                return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def main(mb: int, rounds: int) -> Comparison:
    with services() as svc, tempfile.TemporaryDirectory() as scratch:
        await prepare(svc)
        fleet = Fleet(Path(scratch))
        try:
            return await compare(svc, fleet, Path(scratch), await api_key(svc), mb, rounds)
        finally:
            await fleet.stop_all()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=MB)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    comparison = asyncio.run(main(args.mb, args.rounds))
    print(table([comparison]))
    print(json.dumps({"summary": comparison.summary(), "notes": comparison.notes}, indent=2, default=str))
