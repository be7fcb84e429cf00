"""Metrics: the engine counts what happens to jobs wherever it runs, a worker serves them on its own port, the web
reads the queue's gauges from the table, and with several processes a scrape reads the deployment's sum."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Processes, eventually, free_port, process_env, wait_done
from worker import Config, Deps
from worker import metrics as engine


def value(name: str, **labels: str) -> float:
    return engine.REGISTRY.get_sample_value(name, labels) or 0.0


def scraped(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples with these labels (among others: a pid's, in multiprocess mode)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        series, _, number = line.rpartition(" ")
        if series.partition("{")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', series))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(number)
    return total


async def test_an_attempts_end_is_counted_by_type_and_outcome_with_its_run_time_and_queue_wait(
    client: httpx.AsyncClient, drain: Callable[[], Awaitable[None]]
) -> None:
    before = {
        "attempts": value("outlast_job_attempts_total", type="flaky"),
        "retries": value("outlast_job_retries_total", type="flaky"),
        "succeeded": value("outlast_jobs_finished_total", type="flaky", status="succeeded"),
        "failed": value("outlast_jobs_finished_total", type="refuse", status="failed"),
        "runs": value("outlast_job_run_seconds_count", type="flaky"),
        "waits": value("outlast_job_queue_wait_seconds_count", type="flaky"),
    }
    flaky = (await client.post("/v1/jobs", json={"type": "flaky", "input": {"failures": 1}})).json()
    refused = (await client.post("/v1/jobs", json={"type": "refuse", "input": {}})).json()
    await drain()
    assert (await wait_done(client, flaky["id"]))["status"] == "succeeded"
    assert (await wait_done(client, refused["id"]))["status"] == "failed"

    assert value("outlast_job_attempts_total", type="flaky") - before["attempts"] == 2
    assert value("outlast_job_retries_total", type="flaky") - before["retries"] == 1
    assert value("outlast_jobs_finished_total", type="flaky", status="succeeded") - before["succeeded"] == 1
    assert value("outlast_jobs_finished_total", type="refuse", status="failed") - before["failed"] == 1
    assert value("outlast_job_run_seconds_count", type="flaky") - before["runs"] == 2
    assert value("outlast_job_queue_wait_seconds_count", type="flaky") - before["waits"] == 2


async def test_the_webs_metrics_read_the_queue_from_the_table_by_type_and_state(client: httpx.AsyncClient) -> None:
    for _ in range(2):
        await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [1]}})
    await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [1]}, "delay_s": 3600})
    text = (await client.get("/metrics")).text  # no worker: the first two wait, the third is due in an hour
    assert scraped(text, "outlast_jobs", type="square_sum", state="queued") == 2
    assert scraped(text, "outlast_jobs", type="square_sum", state="scheduled") == 1
    assert scraped(text, "outlast_jobs", type="square_sum", state="running") == 0
    assert scraped(text, "outlast_oldest_queued_seconds", type="square_sum") >= 0
    assert "outlast_job_attempts" in text  # the engine's metrics are served beside the web's


async def test_a_workers_metrics_port_answers_metrics_and_only_metrics() -> None:
    async with engine.serving(0, host="127.0.0.1") as port:
        assert port is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            response = await http.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            assert "outlast_worker_slots" in response.text
            assert (await http.get("/other")).status_code == 404


async def test_a_second_worker_on_a_taken_port_says_so_and_runs_on(caplog: pytest.LogCaptureFixture) -> None:
    async with engine.serving(0, host="127.0.0.1") as port:
        assert port is not None
        with caplog.at_level(logging.WARNING, "outlast.metrics"):
            async with engine.serving(port, host="127.0.0.1") as second:
                assert second is None
        assert "OUTLAST_WORKER_METRICS_PORT" in caplog.text


async def test_stats_count_the_tenants_own_live_jobs_workers_and_last_hour(
    client: httpx.AsyncClient, deps: Deps, drain: Callable[[], Awaitable[None]]
) -> None:
    # another tenant's queued job, put in by SQL: no key of theirs is needed to show it is not counted
    await deps.db.execute("INSERT INTO tenants (id) VALUES ('other')")
    await deps.db.execute(
        "INSERT INTO jobs (id, tenant_id, type, input, max_attempts, timeout_s, retry_safe, expires_at)"
        " VALUES (gen_random_uuid(), 'other', 'square_sum', '{}', 1, 10, true, now() + interval '1 day')"
    )
    done = (await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [2]}})).json()
    await drain()
    await wait_done(client, done["id"])
    await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [1]}})
    await client.post("/v1/jobs", json={"type": "flaky", "input": {"failures": 0}, "delay_s": 3600})
    await deps.db.execute("INSERT INTO workers (name, host, pid, slots) VALUES ('w1', 'h', 1, 8), ('gone', 'h', 2, 8)")
    await deps.db.execute("UPDATE workers SET seen_at = now() - interval '1 hour' WHERE name = 'gone'")

    response = await client.get("/v1/stats")
    assert response.status_code == 200
    stats = response.json()
    assert (stats["queued"], stats["scheduled"], stats["running"], stats["waiting"]) == (1, 1, 0, 0)
    assert stats["types"]["square_sum"] == {"queued": 1, "scheduled": 0, "waiting": 0, "running": 0}
    assert stats["types"]["flaky"]["scheduled"] == 1
    assert stats["oldest_queued_age_s"] >= 0 and set(stats["oldest_queued_age_s_by_type"]) == {"square_sum"}
    assert stats["last_hour"] == {"succeeded": 1, "failed": 0, "cancelled": 0, "expired": 0}
    assert stats["last_hour_by_type"] == {"square_sum": {"succeeded": 1}}
    assert [w["name"] for w in stats["workers"]] == ["w1"]  # a worker not seen lately is not live
    assert stats["workers"][0]["slots"] == 8 and stats["workers"][0]["running"] == 0


@pytest.mark.slow
async def test_with_three_web_processes_and_two_workers_every_scrape_reads_the_deployments_sum(
    config: Config, deps: Deps, api_key: str, tmp_path: Path
) -> None:
    """The issue's reading was 38, 9, 13, 38, 9, 13: each uvicorn worker answered for itself."""
    procs = Processes(process_env(config, WEB_CONCURRENCY="3"), tmp_path, api_key)
    procs.start_web()
    shared = tmp_path / "worker-metrics"
    shared.mkdir()
    worker_port = free_port()
    procs.env.update(PROMETHEUS_MULTIPROC_DIR=str(shared), OUTLAST_WORKER_METRICS_PORT=str(worker_port))
    procs.start_worker("w1")
    procs.start_worker("w2")
    try:
        await procs.ready()
        jobs = 30
        # a connection each, so that the three processes share the submits
        fresh = httpx.Limits(max_keepalive_connections=0)
        async with procs.client(limits=fresh) as http:
            posted = await asyncio.gather(
                *(http.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [i]}}) for i in range(jobs))
            )
            assert {r.status_code for r in posted} == {202}
            for r in posted:
                assert (await wait_done(http, r.json()["id"]))["status"] == "succeeded"
            readings = [(await http.get("/metrics")).text for _ in range(6)]
        assert [scraped(t, "outlast_jobs_submitted_total", type="square_sum") for t in readings] == [jobs] * 6
        route = {"method": "POST", "route": "/v1/jobs", "status": "202"}
        assert [scraped(t, "outlast_http_requests_total", **route) for t in readings] == [jobs] * 6

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{worker_port}", limits=fresh) as http:

            async def served() -> str | None:
                try:
                    return (await http.get("/metrics")).text
                except httpx.TransportError:
                    return None

            worker_readings = [await eventually(served) for _ in range(6)]
        finished = {"type": "square_sum", "status": "succeeded"}
        assert [scraped(t, "outlast_jobs_finished_total", **finished) for t in worker_readings] == [jobs] * 6
        assert [scraped(t, "outlast_job_attempts_total", type="square_sum") for t in worker_readings] == [jobs] * 6
        # both workers' slots, a pid label each, all free again
        busy = [line for line in worker_readings[-1].splitlines() if line.startswith("outlast_worker_slots{")]
        busy = [line for line in busy if 'state="busy"' in line]
        assert len({re.search(r'pid="(\d+)"', line)[1] for line in busy}) == 2  # type: ignore[index]
        assert {line.rpartition(" ")[2] for line in busy} == {"0.0"}
    finally:
        procs.stop()


def _families(text: str) -> set[str]:
    """Every metric family a scrape names (`# TYPE`; a counter's with its `_total`)."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


async def test_the_grafana_dashboard_and_the_alert_table_name_every_metric_served_and_no_other(
    client: httpx.AsyncClient,
) -> None:
    served = _families((await client.get("/metrics")).text)  # the engine's registry is the process's: all of them
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = {re.sub(r"_(bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"\boutlast_\w+", e)}
    assert named == served
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {"${DS_PROMETHEUS}"}  # picked at import
    table = (ROOT / "docs" / "operations.md").read_text().partition("## Metrics and alerts")[2].partition("\n## ")[0]
    documented = set(re.findall(r"^\| `(outlast_\w+)", table, re.M)) | set(re.findall(r"`, `(outlast_\w+)`", table))
    assert documented == served
