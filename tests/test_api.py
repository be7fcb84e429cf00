"""The HTTP contract of API.md, through the app in-process: answers, headers and every bad input."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import httpx
import pytest

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
    assert job["links"]["result"].startswith(f"/v1/jobs/{job['id']}/result?token=olt_")
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

    async def held() -> bool | None:  # the long poll follows the job (the web's own gauge says so)
        return "outlast_followed_jobs 1.0" in (await client.get("/metrics")).text or None

    await eventually(held)
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
    # The submit body, one variant per job type: tests/test_openapi.py


async def test_healthz_and_readyz_answer_200_when_both_stores_are_up(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ok", "database": "ok", "redis": "ok"}


# -- every bad input gets the right 4xx problem+json -------------------------------------------------


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
            assert await engine.claim_one(deps.jobs, job_id, 0, owner="test", lease_s=60) is not None
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


@pytest.mark.slow
async def test_prefer_wait_on_submit_answers_200_with_the_finished_job_or_202_as_usual(processes: Any) -> None:
    """Short jobs then need one round trip (RFC 7240): the answer is held until the job is done or N seconds pass."""
    async with processes.client() as client:
        quick = await client.post("/v1/jobs", json=SQUARES, headers={"Prefer": "wait=30"})
        assert quick.status_code == 200, quick.text
        assert quick.json()["status"] == "succeeded" and quick.json()["result"] == 14
        assert quick.headers["preference-applied"] == "wait=30" and "location" in quick.headers
        slow = await client.post(
            "/v1/jobs", json={"type": "sleep", "input": {"seconds": 30}}, headers={"Prefer": "wait=1"}
        )
        assert slow.status_code == 202 and not slow.json()["done"] and "preference-applied" not in slow.headers


async def test_cors_answers_a_listed_origins_preflight_and_exposes_the_headers_a_client_reads(
    config: Any, deps: Deps, api_key: str
) -> None:
    """A page on another origin could not follow a job: no route sent CORS headers."""
    import msgspec

    from server.app import create_app

    app = create_app(msgspec.structs.replace(config, cors_origins="https://app.example.com, http://localhost:5173"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            preflight = await client.options(
                "/v1/jobs",
                headers={
                    "Origin": "https://app.example.com",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
                },
            )
            assert preflight.status_code == 200  # answered before authentication: it carries no key
            assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
            allowed = preflight.headers["access-control-allow-headers"].lower()
            assert {"authorization", "content-type", "idempotency-key"} <= set(allowed.replace(" ", "").split(","))
            submitted = await client.post(
                "/v1/jobs", json=SQUARES, headers={"Origin": "https://app.example.com", **bearer(api_key)}
            )
            assert submitted.headers["access-control-allow-origin"] == "https://app.example.com"
            exposed = submitted.headers["access-control-expose-headers"].lower()
            assert {"location", "retry-after", "idempotent-replayed"} <= set(exposed.replace(" ", "").split(","))
            # An origin not listed gets nothing a browser would accept.
            other = await client.options(
                "/v1/jobs", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
            )
            assert "access-control-allow-origin" not in other.headers
            plain = await client.get("/v1/jobs", headers={"Origin": "https://evil.example", **bearer(api_key)})
            assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


async def test_without_cors_origins_no_origin_gets_cors_headers(client: httpx.AsyncClient) -> None:
    answer = await client.get("/v1/jobs", headers={"Origin": "https://app.example.com"})
    assert "access-control-allow-origin" not in answer.headers
