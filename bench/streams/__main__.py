"""python -m bench.streams: what Outlast's event streams cost, next to a bare streaming app, in one run.

    .venv/bin/python -m bench.streams [--streams 10000] [--watchers 1000] [--rounds 3] [--only running ...]

Four measurements, each in ROUNDS rounds that alternate which side goes first (so the drift of a shared machine
falls on both sides), reported as ratios, min / median / max over the rounds:
  idle     STREAMS idle streams on one web process: RSS per stream, Outlast / bare; and that none was dropped
           (after the hold, one more event must reach every stream)
  fanout   one job's progress to WATCHERS streams: CPU per delivery, and publish->delivered p100, Outlast / bare
  load     POST + GET req/s on Outlast with IDLE_UNDER_LOAD idle streams open / with none
  running  issue 20's S5: RUNNING_STREAMS streams following RUNNING_JOBS running jobs that each report every
           second, written as a worker's pulse writes them: CPU per delivery, Outlast / bare, and every delivery's
           publish->received (Outlast's p99: at most 250 ms)
The bare app (bench/streams/bare.py) is the same stack fanning Redis pub/sub out to streams, nothing more. Every
server is a fresh uvicorn process per round, with the Procfile's flags. Its own embedded PostgreSQL and Valkey
(under .outlast/bench-streams), loopback only; about 5 minutes, stopped at 10.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from bench.streams.measurements import RUNNING_P99_MS, fanout, idle, load, running
from bench.streams.sides import DATA, ROOT, Bare, Outlast, Settings, free_port, raise_open_files
from worker import Config, connect
from worker.migrate import create_database, migrate

RESULTS = ROOT / "bench" / "results"
DEADLINE_S = 600.0


# -- the run ----------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


@contextlib.asynccontextmanager
async def services() -> AsyncIterator[Config]:
    from worker.tools.embedded import EmbeddedPostgres, EmbeddedValkey

    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "logs").mkdir(exist_ok=True)
    with (
        EmbeddedPostgres(DATA / "postgres", port=free_port()) as pg,
        EmbeddedValkey(DATA / "valkey", port=free_port()) as valkey,
    ):
        dsn = pg.dsn("outlast_bench_streams")
        await create_database(dsn)
        await migrate(dsn)
        yield Config(database_url=dsn, redis_url=valkey.url(0))


async def main(settings: Settings) -> dict[str, Any]:
    began = time.monotonic()
    raise_open_files(max(settings.streams, settings.running_streams) + 1_000)
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    async with services() as config, connect(config) as deps:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLAST_")}
        env.update(DATABASE_URL=config.database_url, REDIS_URL=config.redis_url)
        outlast, bare = Outlast(deps, env, config), Bare(deps, env)
        runs: dict[str, list[dict[str, Any]]] = {"idle": [], "fanout": [], "load": [], "running": []}
        for round_ in range(settings.rounds):
            if time.monotonic() - began > DEADLINE_S:
                log(f"stopping after {round_} rounds: past {DEADLINE_S:.0f} s")
                break
            order = (outlast, bare) if round_ % 2 else (bare, outlast)
            log(f"round {round_ + 1} ({order[0].name} first)")
            for name, measure in (("idle", idle), ("fanout", fanout), ("running", running)):
                if name in settings.only:
                    runs[name].append({side.name: await measure(side, settings, log) for side in order})
            if "load" in settings.only:
                runs["load"].append(await load(outlast, settings, "with" if round_ % 2 else "none", log))
    ratios = {
        name: spread(values)
        for name, values in {
            "idle_rss_per_stream": [
                r["outlast"]["rss_per_stream_kib"] / r["bare"]["rss_per_stream_kib"] for r in runs["idle"]
            ],
            "fanout_cpu_per_delivery": [
                r["outlast"]["cpu_us_per_delivery"] / r["bare"]["cpu_us_per_delivery"] for r in runs["fanout"]
            ],
            "fanout_p100": [r["outlast"]["p100_ms"] / r["bare"]["p100_ms"] for r in runs["fanout"]],
            "load_rps_with_streams": [r["rps_with_streams"] / r["rps_none"] for r in runs["load"]],
            "load_rps_per_cpu_with_streams": [r["rp_cpu_s_with_streams"] / r["rp_cpu_s_none"] for r in runs["load"]],
            "running_cpu_per_delivery": [
                r["outlast"]["cpu_us_per_delivery"] / r["bare"]["cpu_us_per_delivery"] for r in runs["running"]
            ],
        }.items()
        if values
    }
    dropped = sum(r[s]["opened"] - r[s]["alive_after_hold"] + r[s]["failed"] for r in runs["idle"] for s in r)
    limits = {
        "idle_rss_per_stream": ("<=", 1.5),
        "fanout_cpu_per_delivery": ("<=", 2.0),
        "fanout_p100": ("<=", 2.0),
        "load_rps_with_streams": (">=", 0.9),
        "load_rps_per_cpu_with_streams": (">=", 0.9),
        "running_cpu_per_delivery": ("<=", 1.3),
    }
    log("\nratios (min / median / max over the rounds)")
    for name, value in ratios.items():
        op, bound = limits[name]
        ok = value["max"] <= bound if op == "<=" else value["min"] >= bound
        log(f"  {name:<30} {value['min']:>7} {value['median']:>7} {value['max']:>7}   target {op} {bound}  {ok=}")
    log(f"  idle streams dropped or failed: {dropped}")
    for side in ("outlast", "bare"):
        if p99s := [r[side]["p99_ms"] for r in runs["running"] if r[side]["p99_ms"] is not None]:
            missing = sum(r[side]["missing"] for r in runs["running"])
            verdict = f"goal <= {RUNNING_P99_MS:.0f}  ok={max(p99s) <= RUNNING_P99_MS}" if side == "outlast" else ""
            log(f"  running p99 ms, {side:<8} {min(p99s):>7} {statistics.median(p99s):>7} {max(p99s):>7}   {verdict}")
            log(f"  running deliveries missing, {side}: {missing}")
    return {
        "settings": asdict(settings),
        "runs": runs,
        "ratios": ratios,
        "dropped": dropped,
        "seconds": round(time.monotonic() - began, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=Settings.streams)
    parser.add_argument("--watchers", type=int, default=Settings.watchers)
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--running-jobs", type=int, default=Settings.running_jobs)
    parser.add_argument("--running-streams", type=int, default=Settings.running_streams)
    parser.add_argument("--running-s", type=float, default=Settings.running_s)
    parser.add_argument("--only", nargs="+", choices=Settings.only, default=Settings.only)
    args = parser.parse_args()
    chosen = Settings(
        streams=args.streams, watchers=args.watchers, running_jobs=args.running_jobs,
        running_streams=args.running_streams, running_s=args.running_s, rounds=args.rounds, only=tuple(args.only),
    )  # fmt: skip
    report = asyncio.run(main(chosen))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"streams-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\n{report['seconds']} s; results in {path.relative_to(ROOT)}")
