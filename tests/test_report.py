"""The `report` job type (worker/job_types/report.py): the tenant's jobs per type and day, or an uploaded CSV's
summary, as a CSV and a Parquet file in the blob store, listed in the result with their links."""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import polars as pl
import pytest

from tests.conftest import bearer
from worker import Deps, keys

Drain = Callable[[], Awaitable[None]]


async def _run(client: httpx.AsyncClient, drain: Drain, input: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/jobs", json={"type": "report", "input": input})
    assert response.status_code == 202, response.text
    await drain()
    job: dict[str, Any] = (await client.get(f"/v1/jobs/{response.json()['id']}")).json()
    return job


async def _file(client: httpx.AsyncClient, files: list[dict[str, Any]], name: str) -> bytes:
    [found] = [f for f in files if f["name"] == name]
    response = await client.get(found["link"])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(found["content_type"])
    assert len(response.content) == found["size"]
    return response.content


async def test_a_report_counts_the_tenants_jobs_per_type_and_day_in_a_csv_and_a_parquet_file(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    for data in ([1], [2], [3]):
        assert (await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": data}})).status_code == 202
    assert (await client.post("/v1/jobs", json={"type": "refuse", "input": {}})).status_code == 202
    theirs = bearer(await keys.create(deps.db, "acme"))
    assert (await client.post("/v1/jobs", json={"type": "cube_sum", "input": {"data": [1]}}, headers=theirs)).is_success
    await drain()
    today = datetime.now(UTC).date()
    job = await _run(client, drain, {"since": str(today - timedelta(days=2)), "until": str(today)})
    assert job["status"] == "succeeded", job
    report = job["result"]
    assert report["source"] == "jobs" and report["since"] == str(today - timedelta(days=2))
    assert [f["name"] for f in report["files"]] == ["jobs-per-day.csv", "jobs-per-day.parquet"]
    csv = pl.read_csv(io.BytesIO(await _file(client, report["files"], "jobs-per-day.csv")), try_parse_dates=True)
    parquet = pl.read_parquet(io.BytesIO(await _file(client, report["files"], "jobs-per-day.parquet")))
    rows = {r["type"]: r for r in parquet.to_dicts()}
    assert set(rows) == {"square_sum", "refuse", "report"}  # acme's cube_sum is not this tenant's
    assert rows["square_sum"] | {"mean_run_s": None} == {
        "day": today,
        "type": "square_sum",
        "jobs": 3,
        "succeeded": 3,
        "failed": 0,
        "cancelled": 0,
        "expired": 0,
        "live": 0,
        "mean_run_s": None,
    }
    assert rows["square_sum"]["mean_run_s"] >= 0
    assert rows["refuse"]["failed"] == 1 and rows["report"]["live"] == 1  # the report itself, still running
    assert report["rows"] == 3 == csv.height
    assert csv.sort("type").to_dicts() == parquet.sort("type").to_dicts()


async def test_a_report_of_days_without_jobs_is_two_empty_tables_with_their_columns(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    job = await _run(client, drain, {"since": "2020-01-01", "until": "2020-12-31"})
    assert job["status"] == "succeeded", job
    assert job["result"]["rows"] == 0
    parquet = pl.read_parquet(io.BytesIO(await _file(client, job["result"]["files"], "jobs-per-day.parquet")))
    assert parquet.height == 0 and parquet.columns[:3] == ["day", "type", "jobs"]


async def test_a_report_of_an_uploaded_csv_summarises_each_column(client: httpx.AsyncClient, drain: Drain) -> None:
    upload = await client.post("/v1/uploads", content=b"n,word\n1,a\n2,b\n6,c\n", headers={"Content-Type": "text/csv"})
    assert upload.status_code == 201, upload.text
    job = await _run(client, drain, {"upload": upload.json()["id"]})
    assert job["status"] == "succeeded", job
    report = job["result"]
    assert report["source"] == "upload" and report["rows"] == 3 and report["columns"] == ["n", "word"]
    summary = pl.read_csv(io.BytesIO(await _file(client, report["files"], "summary.csv")))
    stats = {r["statistic"]: r for r in summary.to_dicts()}
    assert float(stats["count"]["n"]) == 3 and float(stats["mean"]["n"]) == 3.0 and float(stats["max"]["n"]) == 6
    parquet = pl.read_parquet(io.BytesIO(await _file(client, report["files"], "summary.parquet")))
    assert parquet.columns == ["statistic", "n", "word"]


@pytest.mark.parametrize(
    "body",
    [b"a,b\n1,2\n3,4,5\n", b'a,b\n1,"never closed\n', b"a,b\n1,\x002\n", b"a,b\n1,\xff\xfe\n"],
    ids=["ragged", "unterminated quote", "NUL", "not UTF-8"],  # empty: a 422 at the upload (test_blobs)
)
async def test_an_upload_that_is_no_csv_fails_the_report_with_invalid_csv(
    client: httpx.AsyncClient, drain: Drain, body: bytes
) -> None:
    upload = (await client.post("/v1/uploads", content=body)).json()["id"]
    job = await _run(client, drain, {"upload": upload})
    assert job["status"] == "failed"
    assert job["error"]["type"] == "invalid_csv", job["error"]
    assert job["error"]["retryable"] is False


async def test_a_report_of_an_unknown_upload_fails_with_unknown_upload(client: httpx.AsyncClient, drain: Drain) -> None:
    job = await _run(client, drain, {"upload": "0190a0a0-0000-7000-8000-000000000000"})
    assert job["status"] == "failed" and job["error"]["type"] == "unknown_upload"


@pytest.mark.parametrize(
    ("input", "says"),
    [
        ({"since": "2024-02-01", "until": "2024-01-01"}, "`since` is after `until`"),
        ({"since": "2020-01-01", "until": "2024-01-01"}, "at most 366 days"),
        ({"since": "2024-01-01", "upload": "x"}, "either `upload` or a date range"),
        ({"since": "yesterday"}, "Invalid RFC3339 encoded date at $.input.since"),
        ({"upload": ""}, "length >= 1"),
    ],
)
async def test_a_report_input_that_can_never_work_is_a_422_at_submit(
    client: httpx.AsyncClient, deps: Deps, input: dict[str, Any], says: str
) -> None:
    response = await client.post("/v1/jobs", json={"type": "report", "input": input})
    assert response.status_code == 422, response.text
    assert says in response.text
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 0


async def test_a_report_without_a_range_covers_the_last_thirty_days_up_to_today(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    job = await _run(client, drain, {})
    today = datetime.now(UTC).date()
    assert job["status"] == "succeeded", job
    assert (job["result"]["since"], job["result"]["until"]) == (str(today - timedelta(days=29)), str(today))
