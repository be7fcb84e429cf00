"""The blob store (worker/blobs.py, server/blobs.py, server/uploads.py): a large result kept out of the row and
streamed back with Range, files from ctx.output, uploads for ctx.open, webhooks' result_link, and retention. Every
test runs on both backends: PostgreSQL chunks, and S3 as moto's server (`moto[server]` from PyPI, started here)
serves it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import msgspec
import obstore
import pytest
from obstore.store import S3Store

from tests.blob_jobs import pattern
from tests.conftest import bearer, free_port, job_row, open_app
from worker import Config, Deps, keys, store
from worker.blobs import CHUNK_BYTES
from worker.retention import retain
from worker.webhooks.deliver import payload

Drain = Callable[[], Awaitable[None]]
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "outlast-test",
    "AWS_SECRET_ACCESS_KEY": "outlast-test",
    "AWS_REGION": "us-east-1",
    "AWS_ALLOW_HTTP": "true",
}
BUCKET = "outlast-test"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3-compatible server on a free loopback port, with the bucket made, and the AWS_* variables that send
    obstore to it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    try:
        with httpx.Client() as client:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if client.put(f"{url}/{BUCKET}").status_code == 200:
                        break
                assert server.poll() is None, "moto's server exited"
                time.sleep(0.05)
            else:
                raise AssertionError("moto's server did not answer within 15 s")
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=url)
        yield url
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.terminate()
        server.wait(10)


@pytest.fixture(params=["postgres", "s3"])
def config(request: pytest.FixtureRequest, config: Config) -> Config:
    """The session's Config with this module's job types, on the backend the parameter names (a prefix of its own
    per test in the bucket)."""
    blob_url = ""
    if request.param == "s3":
        request.getfixturevalue("s3_server")
        blob_url = f"s3://{BUCKET}/{uuid.uuid4()}"
    return msgspec.structs.replace(config, job_modules="tests.jobs,tests.blob_jobs", blob_url=blob_url)


async def _done(client: httpx.AsyncClient, drain: Drain, type: str, input: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/jobs", json={"type": type, "input": input})
    assert response.status_code == 202, response.text
    await drain()
    job: dict[str, Any] = (await client.get(f"/v1/jobs/{response.json()['id']}")).json()
    return job


async def test_a_result_past_the_inline_limit_goes_to_the_store_and_streams_back_byte_exact(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job = await _done(client, drain, "big_result", {"bytes": 300 * 1024})
    expected = msgspec.json.encode(pattern(300 * 1024))
    assert job["status"] == "succeeded", job
    assert job["result"] is None
    assert job["result_size"] == len(expected)
    assert (await job_row(deps, job["id"]))["result"] is None  # not in the row
    response = await client.get(f"/v1/jobs/{job['id']}/result")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(expected))
    assert response.headers["accept-ranges"] == "bytes"
    assert response.content == expected


async def test_only_the_succeeded_status_event_shows_the_stored_results_size(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    job = await _done(client, drain, "big_result", {"bytes": 300 * 1024})
    stream = (await client.get(f"/v1/jobs/{job['id']}/events")).text  # a finished job's replay ends
    shown = [
        msgspec.json.decode(line.removeprefix("data: "))
        for block in stream.split("\n\n")
        if "event: status" in block
        for line in block.splitlines()
        if line.startswith("data: ")
    ]
    assert [(e["status"], e["result"], e["result_size"]) for e in shown] == [
        ("queued", None, None),
        ("running", None, None),
        ("succeeded", None, job["result_size"]),
    ]


async def test_a_stored_result_past_result_retention_answers_410_and_shows_no_size(
    config: Config, client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job = await _done(client, drain, "big_result", {"bytes": 300 * 1024})
    await deps.db.execute(
        "UPDATE jobs SET finished_at = now() - interval '8 days' WHERE id = CAST(:id AS uuid)", {"id": job["id"]}
    )
    assert (await retain(deps.db, config)).purged == 1
    assert (await client.get(f"/v1/jobs/{job['id']}")).json()["result_size"] is None
    gone = await client.get(f"/v1/jobs/{job['id']}/result")
    assert gone.status_code == 410 and gone.json()["type"] == "/problems/gone"


async def test_a_small_result_stays_in_the_row_with_no_size(client: httpx.AsyncClient, drain: Drain) -> None:
    job = await _done(client, drain, "big_result", {"bytes": 1000})
    assert job["result"] == pattern(1000)
    assert job["result_size"] is None
    assert (await client.get(f"/v1/jobs/{job['id']}/result")).json() == pattern(1000)


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-99", 0, 100),
        (f"bytes={CHUNK_BYTES - 10}-{CHUNK_BYTES + 9}", CHUNK_BYTES - 10, CHUNK_BYTES + 10),  # across two chunks
        ("bytes=-10", None, None),  # the last 10
        (f"bytes={2 * CHUNK_BYTES}-", 2 * CHUNK_BYTES, None),  # from there to the end, a third chunk on
        ("bytes=5-99999999999", 5, None),  # an end past the size: to the end
    ],
)
async def test_a_range_of_a_stored_result_answers_206_with_exactly_those_bytes(
    client: httpx.AsyncClient, drain: Drain, header: str, start: int | None, end: int | None
) -> None:
    job = await _done(client, drain, "big_result", {"bytes": 2 * CHUNK_BYTES + 300_000})
    whole = msgspec.json.encode(pattern(2 * CHUNK_BYTES + 300_000))
    start = len(whole) - 10 if start is None else start
    end = len(whole) if end is None else end
    response = await client.get(f"/v1/jobs/{job['id']}/result", headers={"Range": header})
    assert response.status_code == 206, response.text
    assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{len(whole)}"
    assert response.headers["content-length"] == str(end - start)
    assert response.content == whole[start:end]


@pytest.mark.parametrize("header", ["bytes=999999999-", "bytes=-0"])
async def test_a_range_past_the_end_is_a_416_problem_naming_the_size(
    client: httpx.AsyncClient, drain: Drain, header: str
) -> None:
    job = await _done(client, drain, "big_result", {"bytes": 300 * 1024})
    response = await client.get(f"/v1/jobs/{job['id']}/result", headers={"Range": header})
    assert response.status_code == 416
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "/problems/range-not-satisfiable"
    assert response.headers["content-range"] == f"bytes */{job['result_size']}"


@pytest.mark.parametrize("header", ["bytes=0-1,5-9", "items=0-5", "bytes=9-3", "nonsense"])
async def test_a_range_this_server_does_not_take_is_ignored_and_the_whole_result_sent(
    client: httpx.AsyncClient, drain: Drain, header: str
) -> None:
    job = await _done(client, drain, "big_result", {"bytes": 300 * 1024})
    response = await client.get(f"/v1/jobs/{job['id']}/result", headers={"Range": header})
    assert response.status_code == 200
    assert len(response.content) == job["result_size"]


async def test_the_read_token_of_the_jobs_links_opens_its_stored_result_and_no_other_jobs(
    config: Config, client: httpx.AsyncClient, drain: Drain
) -> None:
    job = await _done(client, drain, "big_result", {"bytes": 300 * 1024})
    other = await _done(client, drain, "big_result", {"bytes": 300 * 1024})
    async with open_app(config) as anonymous:  # no API key: the token alone
        response = await anonymous.get(job["links"]["result"], headers={"Range": "bytes=0-9"})
        assert response.status_code == 206, response.text
        assert response.content == msgspec.json.encode(pattern(300 * 1024))[:10]
        token = job["links"]["result"].partition("?")[2]
        assert (await anonymous.get(f"/v1/jobs/{other['id']}/result?{token}")).status_code == 401


async def test_a_webhook_carries_a_result_link_whose_token_opens_the_stored_result(
    config: Config, client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job = await _done(client, drain, "big_result", {"bytes": 300 * 1024})
    row = await store.get_job(deps.db, "default", uuid.UUID(job["id"]))
    assert row is not None
    body = msgspec.json.decode(payload(row, config.webhook_max_result_bytes, secret=config.secret_key))
    assert body["result"] is None and body["result_size"] == job["result_size"]
    assert body["result_link"].startswith(f"/v1/jobs/{job['id']}/result?token=olt_")
    async with open_app(config) as receiver:  # the receiver holds no API key
        response = await receiver.get(body["result_link"])
    assert response.status_code == 200, response.text
    assert response.content == msgspec.json.encode(pattern(300 * 1024))


async def test_files_a_job_writes_are_listed_in_its_result_and_served_by_their_links(
    config: Config, client: httpx.AsyncClient, drain: Drain
) -> None:
    job = await _done(client, drain, "write_files", {"bytes": CHUNK_BYTES + 5})
    notes, data = job["result"]
    assert notes == {
        "name": "notes.txt",
        "size": 11,
        "content_type": "text/plain",
        "link": f"/v1/jobs/{job['id']}/result?file=notes.txt",
    }
    assert data["size"] == CHUNK_BYTES + 5 and data["content_type"] == "application/octet-stream"
    got = await client.get(data["link"])
    assert got.status_code == 200
    assert got.content == pattern(CHUNK_BYTES + 5).encode()
    assert got.headers["content-disposition"] == "attachment; filename*=UTF-8''data.bin"
    part = await client.get(data["link"], headers={"Range": f"bytes={CHUNK_BYTES}-"})
    assert part.status_code == 206 and part.content == pattern(CHUNK_BYTES + 5).encode()[CHUNK_BYTES:]
    token = job["links"]["result"].partition("?")[2]
    async with open_app(config) as anonymous:
        shown = await anonymous.get(f"{notes['link']}&{token}")
        assert shown.status_code == 200 and shown.text == "hello, file"
    missing = await client.get(f"/v1/jobs/{job['id']}/result?file=nope.txt")
    assert missing.status_code == 404 and missing.json()["type"] == "/problems/not-found"


async def test_a_plain_function_in_a_thread_writes_a_file_with_ctx_output(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    job = await _done(client, drain, "plain_output", {"bytes": 1000})
    assert job["status"] == "succeeded", job
    assert job["result"]["size"] == 1000
    assert (await client.get(job["result"]["link"])).text == pattern(1000)


async def _streamed(data: bytes, piece: int = 65_536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]


async def test_an_upload_streams_into_the_store_and_its_job_reads_it_with_ctx_open(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    data = pattern(3 * CHUNK_BYTES + 17).encode()
    response = await client.post(
        "/v1/uploads?name=in.csv", content=_streamed(data), headers={"Content-Type": "text/csv"}
    )  # chunked: no Content-Length
    assert response.status_code == 201, response.text
    upload = response.json()
    assert upload["size"] == len(data) and upload["name"] == "in.csv" and upload["content_type"] == "text/csv"
    job = await _done(client, drain, "read_upload", {"upload": upload["id"]})
    assert job["status"] == "succeeded", job
    assert job["result"] == {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "head": data[:5].decode(),
        "type": "text/csv",
    }


async def test_an_unknown_upload_or_another_tenants_fails_the_job_with_unknown_upload(
    config: Config, client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    theirs = bearer(await keys.create(deps.db, "acme"))
    other = (await client.post("/v1/uploads", content=b"secret", headers=theirs)).json()["id"]
    for upload in (str(uuid.uuid4()), other, "not-an-id"):
        job = await _done(client, drain, "read_upload", {"upload": upload})
        assert job["status"] == "failed"
        assert job["error"]["type"] == "unknown_upload", job["error"]


@pytest.mark.parametrize("declared", [True, False])
async def test_an_upload_past_the_cap_is_a_413_and_leaves_nothing_behind(
    config: Config, deps: Deps, api_key: str, declared: bool
) -> None:
    capped = msgspec.structs.replace(config, max_upload_bytes=CHUNK_BYTES + 1)
    data = b"x" * (2 * CHUNK_BYTES)
    async with open_app(capped, api_key) as client:
        response = await client.post("/v1/uploads", content=data if declared else _streamed(data))
        assert response.status_code == 413
        assert response.json()["type"] == "/problems/payload-too-large"
        assert str(CHUNK_BYTES + 1) in response.json()["detail"]
        at_cap = await client.post("/v1/uploads", content=_streamed(data[: CHUNK_BYTES + 1]))
        assert at_cap.status_code == 201, at_cap.text
    assert await deps.db.fetch_val("SELECT count(*) FROM blobs") == 1
    assert await deps.db.fetch_val("SELECT count(*) FROM blob_chunks") == (0 if capped.blob_url else 2)


async def test_an_upload_name_too_long_is_a_422_naming_the_parameter(client: httpx.AsyncClient) -> None:
    response = await client.post(f"/v1/uploads?name={'n' * 256}", content=b"x")
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == "name"


async def test_an_empty_upload_is_a_422_and_stores_nothing(client: httpx.AsyncClient, deps: Deps) -> None:
    for body in (b"", _streamed(b"")):
        response = await client.post("/v1/uploads?name=empty.csv", content=body)
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["loc"] == "body"
    assert await deps.db.fetch_val("SELECT count(*) FROM blobs") == 0


def _objects(config: Config) -> int:
    """How many objects the test's prefix of the bucket holds."""
    return len(obstore.list(S3Store.from_url(config.blob_url)).collect())


async def test_retention_deletes_a_deleted_jobs_blobs_and_old_uploads_bytes_and_rows(
    config: Config, client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    kept = await _done(client, drain, "big_result", {"bytes": 300 * 1024})
    old = await _done(client, drain, "write_files", {"bytes": 10})
    upload = (await client.post("/v1/uploads", content=b"old input")).json()["id"]
    assert await deps.db.fetch_val("SELECT count(*) FROM blobs") == 4
    await deps.db.execute(
        "UPDATE jobs SET finished_at = now() - interval '31 days' WHERE id = CAST(:id AS uuid)", {"id": old["id"]}
    )
    await deps.db.execute(
        "UPDATE blobs SET created_at = now() - interval '31 days' WHERE id = CAST(:id AS uuid)", {"id": upload}
    )
    done = await retain(deps.db, config)
    assert done.deleted == 1 and done.blobs == 3  # two files of the deleted job, and the upload
    rows = await deps.db.fetch_all("SELECT job_id, kind FROM blobs")
    assert [(str(r["job_id"]), r["kind"]) for r in rows] == [(kept["id"], "result")]
    if config.blob_url:
        assert _objects(config) == 1
    else:
        assert await deps.db.fetch_val("SELECT count(*) FROM blob_chunks") == 1
    assert (await client.get(f"/v1/jobs/{kept['id']}/result")).status_code == 200
