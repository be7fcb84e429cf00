"""The HTTP contract of API.md, through the app in-process: answers, headers and every bad input."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from uuid import UUID

import httpx
import pytest

from server.problems import ProblemError, slug
from tests import engine
from tests.conftest import bearer, eventually, job_row, notified
from worker import Deps

SQUARES = {"type": "square_sum", "input": {"data": [1, 2, 3]}}


async def test_submit_answers_202_with_location_retry_after_and_the_queued_job(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json=SQUARES)
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert int(response.headers["retry-after"]) >= 1
    assert job["status"] == "queued" and job["done"] is False and job["attempt"] == 0
    assert job["input"] == {"data": [1, 2, 3]}
    assert job["progress"] == {"fraction": 0.0, "message": None}
    assert job["links"]["result"] == f"/v1/jobs/{job['id']}/result"
    assert uuid.UUID(job["id"]).version == 7


async def test_concurrent_submits_each_get_their_own_job_and_first_event(client: httpx.AsyncClient, deps: Deps) -> None:
    """They share INSERT statements (worker/batch.py): each answer still names its own row."""
    responses = await asyncio.gather(
        *(client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [n]}}) for n in range(100))
    )
    assert all(r.status_code == 202 for r in responses)
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == 100
    for n, job_id in enumerate(ids):
        row = await job_row(deps, job_id)
        assert row["input"] == f'{{"data": [{n}]}}' and row["event_seq"] == 1


async def test_ids_sort_by_creation(client: httpx.AsyncClient) -> None:
    ids = [(await client.post("/v1/jobs", json=SQUARES)).json()["id"] for _ in range(5)]
    assert ids == sorted(ids)


async def test_submitted_job_runs_to_its_result(
    client: httpx.AsyncClient, drain: Callable[[], Awaitable[None]]
) -> None:
    job = (await client.post("/v1/jobs", json=SQUARES)).json()
    cube = (await client.post("/v1/jobs", json={"type": "cube_sum", "input": {"data": [1, 2, 3]}})).json()
    await drain()
    shown = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert shown["status"] == "succeeded" and shown["done"] and shown["result"] == 14
    assert shown["progress"]["fraction"] == 1.0 and shown["finished_at"] is not None
    result = await client.get(f"/v1/jobs/{job['id']}/result")
    assert result.status_code == 200 and result.json() == 14
    assert (await client.get(f"/v1/jobs/{cube['id']}/result")).json() == 36


async def test_job_and_result_json_are_never_sniffed_or_cached(
    client: httpx.AsyncClient, drain: Callable[[], Awaitable[None]]
) -> None:
    """A result is whatever a job's code returned: no browser may sniff it into HTML, and no cache keep it."""
    submitted = await client.post("/v1/jobs", json={"type": "sleep", "input": {"seconds": 0}})
    job_id = submitted.json()["id"]
    await drain()
    answers = [
        submitted,
        await client.get(f"/v1/jobs/{job_id}"),
        await client.get(f"/v1/jobs/{job_id}/result"),
        await client.get("/v1/jobs"),
        await client.get(f"/v1/jobs/{uuid.uuid4()}"),  # a problem too
    ]
    for response in answers:
        assert response.headers["x-content-type-options"] == "nosniff", response.request.url
        assert response.headers["cache-control"] == "no-store", response.request.url


async def test_result_of_an_unfinished_job_is_409_job_not_done(client: httpx.AsyncClient) -> None:
    job = (await client.post("/v1/jobs", json=SQUARES)).json()
    response = await client.get(f"/v1/jobs/{job['id']}/result")
    assert response.status_code == 409
    assert response.json()["type"] == "/problems/job-not-done"
    assert "retry-after" in response.headers


async def test_result_of_a_failed_job_carries_its_error(
    client: httpx.AsyncClient, drain: Callable[[], Awaitable[None]]
) -> None:
    body = {"type": "flaky", "input": {"failures": 5}, "max_attempts": 1}
    job = (await client.post("/v1/jobs", json=body)).json()
    await drain()
    response = await client.get(f"/v1/jobs/{job['id']}/result")
    assert response.status_code == 409
    problem = response.json()
    assert problem["type"] == "/problems/job-failed"
    assert problem["error"]["type"] == "retryable_error" and problem["error"]["retryable"] is True


async def test_result_past_retention_is_410_gone(
    client: httpx.AsyncClient, deps: Deps, drain: Callable[[], Awaitable[None]]
) -> None:
    job = (await client.post("/v1/jobs", json=SQUARES)).json()
    await drain()
    await deps.db.execute(
        "UPDATE jobs SET result = NULL, result_purged_at = now() WHERE id = :id", {"id": uuid.UUID(job["id"])}
    )
    response = await client.get(f"/v1/jobs/{job['id']}/result")
    assert response.status_code == 410 and response.json()["type"] == "/problems/gone"


async def test_unfinished_job_carries_retry_after_and_a_finished_one_does_not(
    client: httpx.AsyncClient, drain: Callable[[], Awaitable[None]]
) -> None:
    job = (await client.post("/v1/jobs", json=SQUARES)).json()
    queued = await client.get(f"/v1/jobs/{job['id']}")
    assert 1 <= int(queued.headers["retry-after"]) <= 30
    await drain()
    assert "retry-after" not in (await client.get(f"/v1/jobs/{job['id']}")).headers


async def test_prefer_wait_holds_the_answer_until_the_job_is_done(
    client: httpx.AsyncClient, drain: Callable[[], Awaitable[None]]
) -> None:
    job = (await client.post("/v1/jobs", json=SQUARES)).json()
    waiting = asyncio.create_task(client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=30"}))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # held: the job is still queued
    await drain()
    response = await asyncio.wait_for(waiting, 10)
    assert response.json()["status"] == "succeeded"
    assert response.headers["preference-applied"] == "wait=30"


async def test_prefer_wait_returns_the_unfinished_job_after_n_seconds(client: httpx.AsyncClient) -> None:
    job = (await client.post("/v1/jobs", json=SQUARES)).json()
    response = await client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=1"})
    assert response.status_code == 200 and response.json()["status"] == "queued"
    assert "retry-after" in response.headers


async def test_list_is_newest_first_and_pages_with_a_cursor(client: httpx.AsyncClient) -> None:
    ids = [(await client.post("/v1/jobs", json=SQUARES)).json()["id"] for _ in range(5)]
    first = (await client.get("/v1/jobs", params={"limit": 2})).json()
    assert [j["id"] for j in first["items"]] == ids[::-1][:2]
    second = (await client.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]})).json()
    assert [j["id"] for j in second["items"]] == ids[::-1][2:4]
    third = (await client.get("/v1/jobs", params={"limit": 2, "cursor": second["next_cursor"]})).json()
    assert [j["id"] for j in third["items"]] == ids[:1] and third["next_cursor"] is None


async def test_list_filters_by_status_and_type(client: httpx.AsyncClient, drain: Callable[[], Awaitable[None]]) -> None:
    done = (await client.post("/v1/jobs", json=SQUARES)).json()
    await drain()
    queued = (await client.post("/v1/jobs", json={"type": "sleep", "input": {"seconds": 0}})).json()
    by_status = (await client.get("/v1/jobs", params={"status": "succeeded"})).json()
    assert [j["id"] for j in by_status["items"]] == [done["id"]]
    by_type = (await client.get("/v1/jobs", params={"type": "sleep"})).json()
    assert [j["id"] for j in by_type["items"]] == [queued["id"]]


async def test_job_types_lists_each_type_with_its_input_schema(client: httpx.AsyncClient) -> None:
    types = {t["name"]: t for t in (await client.get("/v1/job-types")).json()["items"]}
    assert {"square_sum", "cube_sum", "sleep", "flaky"} <= set(types)
    schema = types["square_sum"]["input_schema"]
    data = schema["$defs"]["Input"]["properties"]["data"]
    assert data["type"] == "array" and data["maxItems"] == 100_000


async def test_openapi_is_3_1_and_describes_the_routes_from_the_types(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/result", "/v1/job-types"} <= set(doc["paths"])
    submit = doc["components"]["schemas"]["SubmitJob"]
    assert submit["properties"]["max_attempts"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 20}
    assert "status" in doc["components"]["schemas"]["Job"]["properties"]
    assert (await client.get("/docs")).headers["content-type"].startswith("text/html")
    bearer_scheme = doc["components"]["securitySchemes"]["apiKey"]
    assert (bearer_scheme["type"], bearer_scheme["scheme"]) == ("http", "bearer")
    assert doc["security"] == [{"apiKey": []}]
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            if path.startswith("/v1/"):
                assert {"401", "429"} <= set(operation["responses"]), (path, operation["operationId"])
            else:
                assert operation["security"] == [], path
    submit = doc["paths"]["/v1/jobs"]["post"]
    assert set(submit["responses"]["202"]["links"]) == {"GetJob", "GetJobResult", "CancelJob"}
    variants = submit["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert {v["properties"]["type"]["const"] for v in variants} >= {"square_sum", "cube_sum", "sleep", "flaky"}


async def test_healthz_and_readyz_answer_200_when_both_stores_are_up(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ok", "database": "ok", "redis": "ok"}


# -- every bad input gets the right 4xx problem+json -------------------------------------------------

BIG = 1_048_576 + 1


class Chunked:
    """A body sent without Content-Length, in parts; re-iterable so a case can be sent twice."""

    def __init__(self, *parts: bytes) -> None:
        self.parts = parts

    async def _parts(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._parts()


BAD_REQUESTS: list[tuple[str, str, str, dict[str, Any], int, str, str | None]] = [
    # (name, method, path, request kwargs, status, slug, loc named in errors)
    ("empty body", "POST", "/v1/jobs", {"content": b""}, 400, "invalid-body", None),
    ("not json", "POST", "/v1/jobs", {"content": b"{type: square"}, 400, "invalid-body", None),
    ("json but not an object", "POST", "/v1/jobs", {"json": [1, 2]}, 422, "validation-error", "$"),
    ("missing type", "POST", "/v1/jobs", {"json": {"input": {}}}, 422, "validation-error", "$"),
    ("unknown type", "POST", "/v1/jobs", {"json": {"type": "nope", "input": {}}}, 422, "unknown-job-type", "$.type"),
    (
        "wrong field type in input",
        "POST",
        "/v1/jobs",
        {"json": {"type": "square_sum", "input": {"data": [1, "x"]}}},
        422,
        "validation-error",
        "$.input.data[1]",
    ),
    (
        "unknown input field",
        "POST",
        "/v1/jobs",
        {"json": {"type": "square_sum", "input": {"data": [1], "extra": 1}}},
        422,
        "validation-error",
        "$.input",
    ),
    (
        "empty data",
        "POST",
        "/v1/jobs",
        {"json": {"type": "square_sum", "input": {"data": []}}},
        422,
        "validation-error",
        "$.input.data",
    ),
    (
        "status is not settable",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "status": "succeeded"}},
        422,
        "validation-error",
        "$",
    ),
    (
        "id is not settable",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "id": str(uuid.uuid4())}},
        422,
        "validation-error",
        "$",
    ),
    ("result is not settable", "POST", "/v1/jobs", {"json": {**SQUARES, "result": 1}}, 422, "validation-error", "$"),
    *[
        (
            f"{field} is not settable",
            "POST",
            "/v1/jobs",
            {"json": {**SQUARES, field: value}},
            422,
            "validation-error",
            "$",
        )
        for field, value in [
            ("tenant_id", "someone-else"),
            ("attempt", 5),
            ("done", True),
            ("error", None),
            ("created_at", "2020-01-01T00:00:00Z"),
            ("expires_at", "2099-01-01T00:00:00Z"),
            ("idempotency_key", "k"),
            ("links", {}),
        ]
    ],
    (
        "input array longer than the type allows",
        "POST",
        "/v1/jobs",
        {"json": {"type": "square_sum", "input": {"data": [1] * 100_001}}},
        422,
        "validation-error",
        "$.input.data",
    ),
    (
        "max_attempts too high",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "max_attempts": 21}},
        422,
        "validation-error",
        "$.max_attempts",
    ),
    (
        "max_attempts zero",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "max_attempts": 0}},
        422,
        "validation-error",
        "$.max_attempts",
    ),
    (
        "timeout_s over the cap",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "timeout_s": 86_401}},
        422,
        "validation-error",
        "$.timeout_s",
    ),
    (
        "timeout_s zero",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "timeout_s": 0}},
        422,
        "validation-error",
        "$.timeout_s",
    ),
    (
        "metadata not an object",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "metadata": [1]}},
        422,
        "validation-error",
        "$.metadata",
    ),
    (
        "metadata too large",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "metadata": {"k": "x" * 20_000}}},
        422,
        "validation-error",
        "$.metadata",
    ),
    ("huge body", "POST", "/v1/jobs", {"content": b"x" * BIG}, 413, "payload-too-large", None),
    (
        "huge body without content-length",
        "POST",
        "/v1/jobs",
        {"content": Chunked(b"[" * 600_000, b"[" * 600_000)},
        413,
        "payload-too-large",
        None,
    ),
    (
        "json nested past the parser's depth",
        "POST",
        "/v1/jobs",
        {"content": b'{"type": "sleep", "metadata": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"},
        400,
        "invalid-body",
        None,
    ),
    (
        "deeply nested input",
        "POST",
        "/v1/jobs",
        {"content": b'{"type": "square_sum", "input": {"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"},
        400,
        "invalid-body",
        None,
    ),
    (
        "deeply nested metadata",
        "POST",
        "/v1/jobs",
        {
            "content": b'{"type": "square_sum", "input": {"data": [1]}, "metadata": {"a": '
            + b"[" * 40
            + b"]" * 40
            + b"}}"
        },
        422,
        "validation-error",
        "$.metadata",
    ),
    (
        # ~490 deep was a 500 (a recursive depth check ran out of stack), ~500 a reset connection
        "metadata nested 490 lists deep, 1 KB",
        "POST",
        "/v1/jobs",
        {
            "content": b'{"type": "square_sum", "input": {"data": [1]}, "metadata": {"a": '
            + b"[" * 490
            + b"]" * 490
            + b"}}"
        },
        400,
        "invalid-body",
        None,
    ),
    (
        "input nested 500 objects deep",
        "POST",
        "/v1/jobs",
        {"content": b'{"type": "sleep", "input": ' + b'{"a": ' * 500 + b"1" + b"}" * 500 + b"}"},
        400,
        "invalid-body",
        None,
    ),
    (
        "a body declared text/plain",
        "POST",
        "/v1/jobs",
        {"content": b'{"type": "square_sum", "input": {"data": [1]}}', "headers": {"content-type": "text/plain"}},
        415,
        "unsupported-media-type",
        "Content-Type",
    ),
    (
        "a form post",
        "POST",
        "/v1/jobs",
        {"data": {"type": "square_sum"}},
        415,
        "unsupported-media-type",
        "Content-Type",
    ),
    (
        "a top-level key given twice (was last-wins)",
        "POST",
        "/v1/jobs",
        {"content": b'{"type": "square_sum", "input": {"data": [1]}, "type": "sleep"}'},
        400,
        "invalid-body",
        None,
    ),
    (
        "a key given twice inside the input",
        "POST",
        "/v1/jobs",
        {"content": b'{"type": "square_sum", "input": {"data": [1], "data": [2]}}'},
        400,
        "invalid-body",
        None,
    ),
    (
        "NUL in metadata (PostgreSQL can't store it)",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "metadata": {"k": "a\u0000b"}}},
        422,
        "validation-error",
        "$.metadata",
    ),
    ("NUL in a list filter", "GET", "/v1/jobs?type=%00", {}, 422, "validation-error", "type"),
    ("null is no status", "GET", "/v1/jobs?status=null", {}, 422, "validation-error", "status"),
    ("a filter given twice", "GET", "/v1/jobs?status=queued&status=running", {}, 422, "validation-error", "status"),
    ("malformed job id", "GET", "/v1/jobs/not-a-uuid", {}, 404, "not-found", None),
    ("unknown job id", "GET", f"/v1/jobs/{uuid.uuid4()}", {}, 404, "not-found", None),
    ("malformed id on result", "GET", "/v1/jobs/123/result", {}, 404, "not-found", None),
    ("unknown id on result", "GET", f"/v1/jobs/{uuid.uuid4()}/result", {}, 404, "not-found", None),
    ("bad cursor", "GET", "/v1/jobs?cursor=%%%", {}, 422, "validation-error", "cursor"),
    ("limit over 100", "GET", "/v1/jobs?limit=101", {}, 422, "validation-error", "limit"),
    ("limit zero", "GET", "/v1/jobs?limit=0", {}, 422, "validation-error", "limit"),
    ("limit not a number", "GET", "/v1/jobs?limit=ten", {}, 422, "validation-error", "limit"),
    ("unknown status filter", "GET", "/v1/jobs?status=complete", {}, 422, "validation-error", "status"),
    ("unknown route", "GET", "/v2/jobs", {}, 404, "not-found", None),
    ("wrong method", "DELETE", "/v1/jobs", {}, 405, "method-not-allowed", None),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "slug_", "loc"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
async def test_bad_input_gets_a_problem_naming_it(
    client: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, Any], status: int, slug_: str, loc: str | None
) -> None:
    response = await client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == f"/problems/{slug_}" and problem["status"] == status and problem["title"]
    if loc is not None:
        assert problem["errors"][0]["loc"] == loc, problem


async def test_a_refused_submit_leaves_no_row(client: httpx.AsyncClient, deps: Deps) -> None:
    for case in BAD_REQUESTS:
        if case[1] == "POST":
            await client.request("POST", case[2], **case[3])
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 0


def test_problem_slugs_are_stable() -> None:
    def walk(cls: type) -> list[type]:
        return [cls, *(c for sub in cls.__subclasses__() for c in walk(sub))]

    slugs = {slug(cls) for cls in walk(ProblemError)}
    assert slugs == {
        "problem-error",
        "invalid-body",
        "validation-error",
        "unknown-job-type",
        "not-found",
        "conflict",
        "job-not-done",
        "job-failed",
        "gone",
        "payload-too-large",
        "unavailable",
        "unauthorized",
        "idempotency-key-reused",
        "request-timeout",
        "header-too-large",
        "rate-limited",
        "unsupported-media-type",
    }


async def test_redis_down_still_accepts_the_job_and_readyz_names_redis(config: Any, deps: Deps, api_key: str) -> None:
    import msgspec

    from server.app import create_app

    broken = msgspec.structs.replace(config, redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.5)
    app = create_app(broken)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=bearer(api_key)) as client:
            response = await client.post("/v1/jobs", json=SQUARES)
            assert response.status_code == 202
            row = await job_row(deps, response.json()["id"])
            assert row["status"] == "queued" and row["dispatched_at"] is None  # the sweep's to dispatch
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and "retry-after" in ready.headers
            assert ready.json()["redis"] == "down" and ready.json()["database"] == "ok"


async def test_prefer_wait_wakes_on_the_jobs_notification_not_on_a_timer(config: Any, deps: Deps, api_key: str) -> None:
    import msgspec

    from server.app import create_app
    from worker import store

    # With the fallback poll an hour away, only the notification can end the wait before it times out.
    app = create_app(msgspec.structs.replace(config, events_poll_s=3600))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=bearer(api_key)) as client:
            job_id = UUID((await client.post("/v1/jobs", json=SQUARES)).json()["id"])
            waiting = asyncio.create_task(client.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=60"}))

            async def held() -> bool | None:
                return app.state.web.hub.following(job_id) == 1 or None

            await eventually(held)
            assert await engine.claim(deps.jobs, job_id, 0, owner="test", lease_s=60) is not None
            assert await store.finish(deps.jobs, job_id, 1, "succeeded", result=b"14")
            await notified(deps, job_id)
            answer = await asyncio.wait_for(waiting, 15)
            assert answer.json()["status"] == "succeeded" and answer.json()["result"] == 14
            assert app.state.web.hub.followed == 0  # the long poll let go of the job


async def test_metrics_count_requests_by_route_and_submits_by_type(client: httpx.AsyncClient) -> None:
    job_id = (await client.post("/v1/jobs", json=SQUARES)).json()["id"]
    await client.get(f"/v1/jobs/{job_id}")
    await client.get("/v1/jobs/not-a-uuid")
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'outlast_jobs_submitted_total{type="square_sum"} 1.0' in text
    assert 'outlast_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    assert 'outlast_http_requests_total{method="GET",route="/v1/jobs/{id}",status="200"} 1.0' in text
    assert 'outlast_http_requests_total{method="GET",route="/v1/jobs/{id}",status="404"} 1.0' in text
    assert "outlast_open_streams 0.0" in text and "outlast_events_subscribed 1.0" in text
