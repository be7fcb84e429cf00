"""Bad input gets a clear answer: every malformed, oversized or hostile request a 4xx problem+json that names the
problem, never a 5xx, and nothing written; and the problem slugs a client may rely on."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from server.problems import ProblemError, slug
from worker import Deps

SQUARES = {"type": "square_sum", "input": {"data": [1, 2, 3]}}


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
    # json.loads would take the leading NULs for UTF-32 and fail in its codec: still a 400, never a 500
    ("NULs first", "POST", "/v1/jobs", {"content": b'\x00\x00\x00{"type": 1}'}, 400, "invalid-body", None),
    ("not utf-8", "POST", "/v1/jobs", {"content": b"\x80{}"}, 400, "invalid-body", None),
    ("a batch not utf-8", "POST", "/v1/jobs/batch", {"content": b'{"jobs": [\xff]}'}, 400, "invalid-body", None),
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
        "run_at and delay_s both",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "run_at": "2030-01-01T00:00:00Z", "delay_s": 5}},
        422,
        "validation-error",
        "$.run_at",
    ),
    (
        "a run_at that is not RFC 3339",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "run_at": "next tuesday"}},
        422,
        "validation-error",
        "$.run_at",
    ),
    (
        "a run_at without an offset",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "run_at": "2030-01-01T00:00:00"}},
        422,
        "validation-error",
        "$.run_at",
    ),
    (
        "a run_at beyond a year",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "run_at": "2999-01-01T00:00:00Z"}},
        422,
        "validation-error",
        "$.run_at",
    ),
    (
        "a delay_s beyond a year",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "delay_s": 31_536_001}},
        422,
        "validation-error",
        "$.delay_s",
    ),
    (
        "a negative delay_s",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "delay_s": -1}},
        422,
        "validation-error",
        "$.delay_s",
    ),
    (
        "a priority out of range",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "priority": 11}},
        422,
        "validation-error",
        "$.priority",
    ),
    (
        "a concurrency_key on a type without a limit",
        "POST",
        "/v1/jobs",
        {"json": {**SQUARES, "concurrency_key": "acme"}},
        422,
        "validation-error",
        "$.concurrency_key",
    ),
    (
        "a batch item's run_at",
        "POST",
        "/v1/jobs/batch",
        {"json": {"jobs": [SQUARES, {**SQUARES, "run_at": "soon"}]}},
        422,
        "validation-error",
        "$.jobs[1].run_at",
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
    (
        "a scrape URL that is not http(s)",
        "POST",
        "/v1/jobs",
        {"json": {"type": "scrape", "input": {"urls": ["https://example.com/", "file:///etc/passwd"]}}},
        422,
        "validation-error",
        "$.input.urls[1]",
    ),
    (
        "a scrape of the cloud metadata address",
        "POST",
        "/v1/jobs",
        {"json": {"type": "scrape", "input": {"urls": ["http://169.254.169.254/latest/meta-data/"]}}},
        422,
        "validation-error",
        "$.input",
    ),
    (
        "a vector collection name with odd characters",
        "POST",
        "/v1/jobs",
        {"json": {"type": "vector_index", "input": {"collection": "docs; drop", "vector_data": [0.1, 0.2]}}},
        422,
        "validation-error",
        "$.input.collection",
    ),
    (
        "vectors of two sizes in one vector_index",
        "POST",
        "/v1/jobs",
        {"json": {"type": "vector_index", "input": {"vector_data": [[0.1, 0.2], [0.3]]}}},
        422,
        "validation-error",
        "$.input",
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
        "forbidden",
        "idempotency-key-reused",
        "request-timeout",
        "header-too-large",
        "rate-limited",
        "unsupported-media-type",
        "range-not-satisfiable",
    }
