"""The measurements of bench/streams (python -m bench.streams), each of one side in one round: idle, fanout,
running (issue 20's S5) and load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from bench.procs import until
from bench.streams.sides import (
    PYTHON,
    ROOT,
    Clients,
    Outlast,
    Server,
    Settings,
    Side,
    cpu_s,
    delivered_to_all,
    rss_kib,
)

RUNNING_P99_MS = 250.0  # S5's goal: a running job's report reaches its streams within this, at the 99th percentile

# -- the three measurements -------------------------------------------------------------------------


async def idle(side: Side, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    await side.reset()
    keys = await side.keys(settings.stream_jobs)
    paths = [side.path(keys[i % len(keys)]) for i in range(settings.streams)]
    async with Server(side.name, side.factory, side.env) as server:
        async with Clients(1) as warm:  # the first streams allocate what every later one reuses
            await warm.open(server.port, paths[:200])
        await asyncio.sleep(1.0)
        before = rss_kib(server.pid)
        async with Clients(settings.clients) as clients:
            started = time.monotonic()
            opened, failed = await clients.open(server.port, paths)
            open_s = time.monotonic() - started
            await asyncio.sleep(settings.hold_s)
            after = rss_kib(server.pid)
            await side.start_events(keys)
            for key in keys:
                await side.publish(key, 0, 0.5)
            found = await delivered_to_all(clients, range(1), opened, within=60)
            _, ended = await clients.report()
    result = {
        "opened": opened,
        "failed": failed,
        "open_s": round(open_s, 2),
        "rss_before_mib": round(before / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "rss_per_stream_kib": round((after - before) / max(opened, 1), 2),
        "alive_after_hold": len(found.get(0, ())),
        "ended_early": ended,
    }
    log(f"  idle   {side.name:<8} {result}")
    return result


async def fanout(side: Side, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    await side.reset()
    (key,) = await side.keys(1)
    async with Server(side.name, side.factory, side.env) as server, Clients(2) as clients:
        opened, failed = await clients.open(server.port, [side.path(key)] * settings.watchers)
        await side.start_events([key])
        await asyncio.sleep(1.0)
        cpu_before = cpu_s(server.pid)
        published = {}
        for marker in range(1, settings.fanout_events + 1):
            published[marker] = await side.publish(key, marker, marker / settings.fanout_events)
            await asyncio.sleep(settings.fanout_interval_s)
        markers = range(1, settings.fanout_events + 1)
        found = await delivered_to_all(clients, markers, opened, within=60)
        cpu_after = cpu_s(server.pid)
    latencies = sorted(t - published[m] for m in markers for t in found.get(m, ()))
    deliveries = len(latencies)
    result = {
        "watchers": opened,
        "failed": failed,
        "deliveries": deliveries,
        "missing": settings.fanout_events * opened - deliveries,
        "cpu_us_per_delivery": round((cpu_after - cpu_before) / max(deliveries, 1) * 1e6, 2),
        "p50_ms": round(latencies[len(latencies) // 2] * 1e3, 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 2) if latencies else None,
        "p100_ms": round(latencies[-1] * 1e3, 2) if latencies else None,
    }
    log(f"  fanout {side.name:<8} {result}")
    return result


async def running(side: Side, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """S5: RUNNING_STREAMS streams following RUNNING_JOBS running jobs, each job reporting every `report_s`, the
    reports written and published a tick at a time as a worker's pulse does (a job in one tick of every
    `report_s / tick_s`), for `running_s`; the web's CPU per delivery and every delivery's publish -> received."""
    await side.reset()
    keys = await side.keys(settings.running_jobs)
    await side.start_events(keys)
    groups = max(1, round(settings.report_s / settings.tick_s))
    followers = [0] * len(keys)
    paths = []
    for i in range(settings.running_streams):
        followers[i % len(keys)] += 1
        paths.append(side.path(keys[i % len(keys)]))
    ticks = round(settings.running_s / settings.tick_s)
    markers = range(1, ticks + 1)
    expected = {t: sum(followers[(t - 1) % groups :: groups]) for t in markers}
    async with Server(side.name, side.factory, side.env) as server, Clients(settings.clients) as clients:
        began = time.monotonic()
        opened, failed = await clients.open(server.port, paths)
        open_s = time.monotonic() - began
        await asyncio.sleep(1.0)
        cpu_before, started = cpu_s(server.pid), time.monotonic()
        published: dict[int, float] = {}
        late = 0.0  # how far the publisher fell behind its schedule, at worst
        for t in markers:
            wait = started + (t - 1) * settings.tick_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            late = max(late, -wait)
            group = keys[(t - 1) % groups :: groups]
            published[t] = await side.publish_many(group, t, min(1.0, t / ticks))
        publish_s = time.monotonic() - started

        async def all_delivered() -> bool:
            counted = await clients.counts()
            return all(counted.get(t, 0) >= expected[t] for t in markers)

        with contextlib.suppress(RuntimeError):  # a shortfall is reported, not raised
            await until(all_delivered, within=60, what="every stream got every report")
        cpu_after, window_s = cpu_s(server.pid), time.monotonic() - started
        found, ended = await clients.report()
    latencies = sorted(x - published[m] for m in markers for x in found.get(m, ()))
    deliveries = len(latencies)
    cpu = cpu_after - cpu_before

    def ms(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1e3, 2) if latencies else None

    result = {
        "jobs": len(keys),
        "streams": opened,
        "failed": failed,
        "open_s": round(open_s, 1),
        "deliveries": deliveries,
        "missing": sum(expected.values()) - deliveries,
        "ended_early": ended,
        "publish_s": round(publish_s, 2),
        "publisher_late_s": round(late, 3),
        "window_s": round(window_s, 2),
        "cpu_s": round(cpu, 2),
        "cpu_us_per_delivery": round(cpu / max(deliveries, 1) * 1e6, 2),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "max_ms": ms(1.0),
    }
    log(f"  running {side.name:<7} {result}")
    return result


async def run_load(port: int, seconds: float, connections: int, api_key: str) -> dict[str, Any]:
    argv = [PYTHON, "-m", "bench.streams.load", str(port), str(seconds), str(connections), api_key]
    proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    answer: dict[str, Any] = json.loads(out)
    return answer


async def load(side: Outlast, settings: Settings, first: str, log: Callable[[str], None]) -> dict[str, Any]:
    """ABBA (or BAAB): two slices of each arm, mirrored, so a drift of the machine during the round cancels."""
    await side.reset()
    keys = await side.keys(10)
    paths = [side.path(keys[i % len(keys)]) for i in range(settings.idle_under_load)]
    second = "with" if first == "none" else "none"
    done: dict[str, list[tuple[int, float, float]]] = {"none": [], "with": []}  # (requests, wall s, server CPU s)
    async with Server(side.name, side.factory, side.env) as server:
        api_key = await side.key()
        await run_load(server.port, 2.0, settings.load_connections, api_key)  # warm up
        for arm in (first, second, second, first):
            async with contextlib.AsyncExitStack() as stack:
                if arm == "with":
                    clients = await stack.enter_async_context(Clients(1))
                    await clients.open(server.port, paths)
                    await asyncio.sleep(1.0)
                cpu = cpu_s(server.pid)
                answer = await run_load(server.port, settings.load_s, settings.load_connections, api_key)
                done[arm].append((answer["requests"], answer["seconds"], cpu_s(server.pid) - cpu))
            if answer["errors"]:
                log(f"  load   {arm}: {answer['errors']} errors")

    def rate(arm: str, per: int) -> float:
        return sum(n for n, *_ in done[arm]) / sum(x[per] for x in done[arm])

    result = {
        "rps_none": round(rate("none", 1), 1),
        "rps_with_streams": round(rate("with", 1), 1),
        # requests per second of the web process's own CPU: what it can serve, whatever else the machine runs
        "rp_cpu_s_none": round(rate("none", 2), 1),
        "rp_cpu_s_with_streams": round(rate("with", 2), 1),
        "slices_rps": {arm: [round(n / wall, 1) for n, wall, _ in values] for arm, values in done.items()},
    }
    log(f"  load   outlast  {result}")
    return result
