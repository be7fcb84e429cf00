"""Structured logs (worker/logs.py, OUTLAST_LOG_FORMAT=json): every line a web and a worker process write is one JSON
object, the access log included, carrying the request's X-Request-ID in the web and the job's id, attempt and
tenant in the worker; X-Request-ID is taken from the request when sane, made otherwise, and always echoed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.conftest import running, wait_done
from worker import Config, Deps, logs


def lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a process's log, each of which must be a JSON object."""
    found = []
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if text.strip():
            try:
                found.append(json.loads(text))
            except json.JSONDecodeError:
                raise AssertionError(f"{path.name}:{n} is not JSON: {text[:200]}") from None
    return found


@pytest.mark.slow
async def test_every_line_of_both_processes_is_json_with_its_request_and_job(
    config: Config, deps: Deps, api_key: str, tmp_path: Path
) -> None:
    json_config = msgspec.structs.replace(config, log_format="json")
    async with running(json_config, api_key, tmp_path) as procs, procs.client() as client:
        answer = await client.post(
            "/v1/jobs",
            json={"type": "flaky", "input": {"failures": 1}, "max_attempts": 3},
            headers={"X-Request-ID": "req-42.checkout"},
        )
        assert answer.status_code == 202, answer.text
        assert answer.headers["x-request-id"] == "req-42.checkout"
        job_id = answer.json()["id"]
        made = await client.get("/v1/jobs", headers={"X-Request-ID": "two words; DROP"})  # not sane: one is made
        assert len(made.headers["x-request-id"]) == 32 and made.headers["x-request-id"] != "two words"
        unauthorized = await client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
        assert unauthorized.status_code == 401 and unauthorized.headers["x-request-id"]
        assert (await wait_done(client, job_id))["status"] == "succeeded"
    web, worker = lines(tmp_path / "web.log"), lines(tmp_path / "worker.log")
    for line in web + worker:
        assert {"ts", "level", "logger", "msg"} <= line.keys(), line
    [access] = [w for w in web if w.get("request_id") == "req-42.checkout"]
    assert access["logger"] == "uvicorn.access" and access["method"] == "POST" and access["path"] == "/v1/jobs"
    assert access["status"] == 202
    assert any(w["msg"].startswith("Started server process") for w in web)  # uvicorn's own lines too
    assert all(w.get("worker") == "worker" for w in worker if w["logger"].startswith("outlast"))
    retried = [w for w in worker if w.get("job_id") == job_id]
    assert retried and retried[0]["attempt"] == 1 and retried[0]["tenant"] == "default", worker
    assert "retrying in" in retried[0]["msg"]
    assert any(w["logger"] == "arq.worker" and "Starting worker" in w["msg"] for w in worker)  # from its first line


def test_a_record_outside_any_request_or_job_carries_neither() -> None:
    record = logging.LogRecord("outlast.sweep", logging.WARNING, __file__, 1, "sweep skipped: %s", ("down",), None)
    line = json.loads(logs.JsonLines().format(record))
    assert line["msg"] == "sweep skipped: down" and line["level"] == "warning"
    assert not {"request_id", "job_id"} & line.keys()
    token = logs.job.set(("01a2", 3, "acme"))
    try:
        inside = json.loads(logs.JsonLines().format(record))
    finally:
        logs.job.reset(token)
    assert (inside["job_id"], inside["attempt"], inside["tenant"]) == ("01a2", 3, "acme")
