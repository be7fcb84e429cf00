"""vector_index and vector_search (issue 17), each against the same work done bare.

- `vector_index` of 10,000 short texts, timed from the POST until the job reads done (`Prefer: wait`), against the
  same model embedding the same texts directly in this process, loaded and warm beforehand: texts/s, goal 0.8.
  Outlast's side also stores the vectors in pgvector, which the bare side does not.
- `vector_search` (a vector, k = 10) over one such collection, one job at a time, POST to done, against a bare
  asyncpg query of the same index (the statement the store runs) on a connection of this process: p50 ms, goal 2.

One web and one worker process; the worker's pool loads the model in a job before the rounds, as a worker that has
embedded once has.

First run (3 rounds, 2 cores at load 8 from other work): 253 texts/s against 17,753 (0.01, the goal missed): each
vector's insert into the HNSW index is the cost, about 95 % of the job (10,000 rows took 20 to 70 s in a
profile, the embedding 0.6 to 2 s). Search p50 73 ms against 4.1 ms (19x, missed): the floor is a queued job's
round trip (pickup, claim, finish, the long-polled GET), the same for any job type; the statement itself is the
baseline's, through the index (the plan is in the notes).
"""

from __future__ import annotations

import random
import statistics
import time
from datetime import datetime
from typing import Any

import asyncpg
import httpx

from bench.compare import Comparison, Figures, Metric, alternate
from bench.run import Run, outlast_env
from worker.connections import QUEUE

WEB, WORKER = "vectors-web", "vectors-worker"
TEXTS = 10_000
SEARCHES = 50  # per side per round
WORDS = (
    "cat dog market bread oven river team goal cup rain city train music film book garden coffee price bank storm "
    "school doctor phone light night summer winter sea mountain road game field paint glass stone cloud"
).split()
# Beside each goal, the job's own run time (its row's started_at to finished_at: the claim's and the finish's
# transactions, which span the run) against the same baseline: what is the job, and what is the queued round trip.
INDEX = [
    Metric("texts_per_s", "vector_index texts/s, 10,000 short texts", higher_is_better=True, goal=0.8),
    Metric("run_texts_per_s", "vector_index texts/s, the job's own run", higher_is_better=True),
]
SEARCH = [
    Metric("p50_ms", "vector_search p50 ms, k = 10", higher_is_better=False, goal=2.0),
    Metric("p90_ms", "vector_search p90 ms, k = 10", higher_is_better=False),
    Metric("run_p50_ms", "vector_search p50 ms, the job's own run", higher_is_better=False),
]


def texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(TEXTS)]


async def _job(client: httpx.AsyncClient, type: str, input: dict[str, Any]) -> dict[str, Any]:
    # An hour: on a busy machine, 10,000 inserts into an HNSW index can outlast the type's 600 s
    answer = await client.post("/v1/jobs", json={"type": type, "input": input, "timeout_s": 3600, "max_attempts": 1})
    answer.raise_for_status()
    job_id = answer.json()["id"]
    while True:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=60"})).json()
        if job["done"]:
            if job["status"] != "succeeded":
                raise RuntimeError(f"{type} ended {job['status']}: {job.get('error')}")
            return job


async def measure(run: Run) -> list[Comparison]:
    from worker.vectors.embed import embed_batch  # the model, in this process: the bare side

    env = outlast_env(run.svc)
    url = await run.fleet.outlast(WEB, env)
    await run.fleet.worker(WORKER, "worker.settings.WorkerSettings", env, run.svc.redis_url, QUEUE)
    headers = {"Authorization": f"Bearer {run.api_key}"}
    conn = await asyncpg.connect(run.svc.database_url)
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
            await _job(client, "vector_index", {"collection": "bench-warm", "texts": ["warm the pool's model"]})
            embed_batch(["warm this process's model"])
            rounds = iter(range(1_000_000))

            async def outlast_index() -> Figures:
                n = next(rounds)
                batch = texts(n)
                began = time.perf_counter()
                job = await _job(client, "vector_index", {"collection": f"bench-{n}", "texts": batch})
                elapsed = time.perf_counter() - began
                return {"texts_per_s": TEXTS / elapsed, "run_texts_per_s": TEXTS / _run_s(job)}

            async def bare_index() -> Figures:
                batch = texts(0)
                began = time.perf_counter()
                embed_batch(batch)
                elapsed = time.perf_counter() - began
                return {"texts_per_s": TEXTS / elapsed, "run_texts_per_s": TEXTS / elapsed}

            index = Comparison("vector_index", "the same model called directly in one process", INDEX)
            index.notes.update(texts=TEXTS)
            await alternate(index, outlast_index, bare_index, run.settings.rounds)

            queries = [v.tolist() for v in embed_batch(texts(99)[:SEARCHES])]
            tenant = await conn.fetchval("SELECT tenant_id FROM vector_collections WHERE name = 'bench-0'")

            async def outlast_search() -> Figures:
                took, ran = [], []
                for vector in queries:
                    began = time.perf_counter()
                    job = await _job(client, "vector_search", {"collection": "bench-0", "vector": vector, "k": 10})
                    took.append(1000 * (time.perf_counter() - began))
                    ran.append(1000 * _run_s(job))
                return {**_percentiles(took), "run_p50_ms": statistics.median(ran)}

            async def bare_search() -> Figures:
                took = []
                distance = "CAST(embedding AS vector(256)) <=> CAST($1::real[] AS vector(256))"
                statement = (
                    f"SELECT id, text, metadata, 1 - ({distance}) AS score FROM vector_items"
                    " WHERE tenant_id = $2 AND collection = $3 AND dimensions = 256"
                    f" ORDER BY {distance} LIMIT 10"
                )
                for vector in queries:
                    began = time.perf_counter()
                    async with conn.transaction():
                        await conn.execute("SET LOCAL hnsw.iterative_scan = strict_order")
                        await conn.fetch(statement, vector, tenant, "bench-0")
                    took.append(1000 * (time.perf_counter() - began))
                figures = _percentiles(took)
                return {**figures, "run_p50_ms": figures["p50_ms"]}

            search = Comparison("vector_search", "a bare asyncpg query of the same index", SEARCH)
            plan = await conn.fetch(
                "EXPLAIN SELECT id FROM vector_items WHERE tenant_id = $1 AND collection = 'bench-0'"
                " AND dimensions = 256 ORDER BY CAST(embedding AS vector(256)) <=> CAST($2::real[] AS vector(256))"
                " LIMIT 10",
                tenant,
                queries[0],
            )
            search.notes.update(searches_per_round=SEARCHES, plan=" | ".join(r[0] for r in plan))
            await alternate(search, outlast_search, bare_search, run.settings.rounds)
            return [index, search]
    finally:
        await conn.close()
        await run.fleet.stop(WORKER)
        await run.fleet.stop(WEB)


def _run_s(job: dict[str, Any]) -> float:
    started, finished = (datetime.fromisoformat(job[k]) for k in ("started_at", "finished_at"))
    return (finished - started).total_seconds()


def _percentiles(took: list[float]) -> Figures:
    cuts = statistics.quantiles(took, n=10)
    return {"p50_ms": statistics.median(took), "p90_ms": cuts[8]}
