"""worker/tracing.py and server/tracing.py: one trace from the submit through each attempt to the webhook delivery,
the caller's traceparent continued, a malformed one ignored, and nothing traced, stored or sent with tracing off or
OpenTelemetry not installed. Spans go to the SDK's in-memory exporter; the web app and the worker run in-process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from asyncio.subprocess import PIPE
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tests.conftest import ROOT, Processes, eventually, job_row, process_env, wait_done
from tests.receivers import Hooks, Received, Receiver
from worker import Deps, tracing
from worker.claim import Claimed
from worker.config import Config

Drain = Callable[[], Awaitable[None]]
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name == name]


def one(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    [span] = named(spans, name)
    return span


def children(spans: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [
        s for s in spans.get_finished_spans() if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def traceparent_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-{span.context.trace_flags:02x}"


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_ids(spans: Sequence[ReadableSpan]) -> set[int]:
    return {s.context.trace_id for s in spans if s.context is not None}


async def test_one_trace_runs_from_submit_through_the_attempt_to_the_webhook_delivery(
    spans: InMemorySpanExporter, hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    job_id = await hooks.submit("square_sum", {"data": [1, 2]}, callback_url=f"{receiver.url}?token=s3cret")
    await drain()
    assert await hooks.deliver() == 1
    submit, attempt, webhook = one(spans, "POST /v1/jobs"), one(spans, "run square_sum"), one(spans, "webhook POST")
    assert len(trace_ids([submit, attempt, webhook])) == 1
    assert submit.parent is None  # no traceparent came: the submit began the trace
    assert parent_id(attempt) == span_id(submit) and parent_id(webhook) == span_id(submit)
    assert (await job_row(hooks.deps, job_id))["traceparent"] == traceparent_of(submit)
    assert submit.attributes is not None and submit.attributes["outlast.job.id"] == job_id
    assert submit.attributes["http.response.status_code"] == 202
    assert attempt.attributes is not None
    assert {k: v for k, v in attempt.attributes.items() if k.startswith("outlast.")} == {
        "outlast.span": "attempt",
        "outlast.job.id": job_id,
        "outlast.job.type": "square_sum",
        "outlast.job.attempt": 1,
        "outlast.tenant": "default",
        "outlast.outcome": "succeeded",
    }
    assert attempt.status.status_code is not StatusCode.ERROR
    # the receiver got the delivery span's own context, and the span shows no callback token
    [request] = receiver.requests
    assert request.headers["traceparent"] == traceparent_of(webhook)
    assert webhook.attributes is not None and webhook.attributes["url.full"] == receiver.url
    assert webhook.attributes["http.response.status_code"] == 204
    # PostgreSQL inside the attempt (its finish), Redis inside the submit (its doorbell)
    assert any(s.instrumentation_scope.name.endswith("asyncpg") for s in children(spans, attempt))  # type: ignore[union-attr]
    assert any(s.instrumentation_scope.name.endswith("redis") for s in children(spans, submit))  # type: ignore[union-attr]


async def test_only_outlasts_own_spans_start_a_trace(
    spans: InMemorySpanExporter, hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    """arq's polling, the fixtures' statements and every other call outside a job's life are dropped, not exported
    as one-span traces."""
    await hooks.submit("square_sum", {"data": [1]}, callback_url=receiver.url)
    await hooks.deps.db.execute("SELECT 1")  # outside any span
    await drain()
    await hooks.deliver()
    finished = spans.get_finished_spans()
    assert len(finished) > 3
    by_id = {span_id(s): s for s in finished}
    for span in finished:
        root = span
        while root.parent is not None and root.parent.span_id in by_id:
            root = by_id[root.parent.span_id]
        assert root.parent is None and root.attributes is not None and tracing.OWN in root.attributes, span.name


async def test_a_traceparent_sent_on_submit_is_continued_by_the_submit_and_its_attempts(
    spans: InMemorySpanExporter, hooks: Hooks, drain: Drain
) -> None:
    caller = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    response = await hooks.client.post(
        "/v1/jobs", json={"type": "square_sum", "input": {"data": [3]}}, headers={"traceparent": caller}
    )
    assert response.status_code == 202
    await drain()
    submit, attempt = one(spans, "POST /v1/jobs"), one(spans, "run square_sum")
    assert trace_ids([submit, attempt]) == {int(CALLER_TRACE, 16)}
    assert submit.parent is not None and submit.parent.is_remote and submit.parent.span_id == int(CALLER_SPAN, 16)
    assert parent_id(attempt) == span_id(submit)


@pytest.mark.parametrize(
    "malformed",
    [
        "garbage",
        f"00-{'0' * 32}-{CALLER_SPAN}-01",  # an all-zero trace id
        f"00-{CALLER_TRACE}-{'0' * 16}-01",  # an all-zero parent id
        f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01",  # the version W3C forbids
        f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01",  # hex is lowercase
        f"00-{CALLER_TRACE}-{CALLER_SPAN}-01-extra",  # version 00 has exactly four fields
    ],
)
async def test_a_malformed_traceparent_is_ignored_and_the_submit_begins_its_own_trace(
    spans: InMemorySpanExporter, hooks: Hooks, malformed: str
) -> None:
    response = await hooks.client.post(
        "/v1/jobs", json={"type": "square_sum", "input": {"data": [3]}}, headers={"traceparent": malformed}
    )
    assert response.status_code == 202, response.text
    submit = one(spans, "POST /v1/jobs")
    assert submit.parent is None and trace_ids([submit]) != {int(CALLER_TRACE, 16)}
    assert (await job_row(hooks.deps, response.json()["id"]))["traceparent"] == traceparent_of(submit)


async def test_each_attempt_is_a_child_of_the_submit_and_a_failed_one_is_an_error(
    spans: InMemorySpanExporter, hooks: Hooks, drain: Drain
) -> None:
    await hooks.submit("flaky", {"failures": 1}, max_attempts=2)  # fails once, then succeeds
    await hooks.submit("refuse", {})  # fails for good
    await drain()
    flaky = sorted(named(spans, "run flaky"), key=lambda s: s.attributes["outlast.job.attempt"])  # type: ignore[index]
    [first, second] = flaky
    [refused] = named(spans, "run refuse")
    submits = {trace_ids([s]).pop(): s for s in named(spans, "POST /v1/jobs")}
    for attempt in (first, second, refused):
        assert parent_id(attempt) == span_id(submits[trace_ids([attempt]).pop()])
    assert trace_ids([first]) == trace_ids([second]) != trace_ids([refused])
    assert first.status.status_code is StatusCode.ERROR and first.attributes is not None
    assert first.attributes["outlast.outcome"] == "queued"  # to be retried
    assert second.status.status_code is not StatusCode.ERROR and second.attributes is not None
    assert second.attributes["outlast.outcome"] == "succeeded"
    assert refused.status.status_code is StatusCode.ERROR
    assert refused.status.description == "bad_input: the input can never work"


async def test_a_spawned_childs_attempts_join_the_trace_of_the_attempt_that_spawned_it(
    spans: InMemorySpanExporter, hooks: Hooks, drain: Drain
) -> None:
    parent = await hooks.submit("fan_out", {"n": 2})
    await drain()
    runs = sorted(named(spans, "run fan_out"), key=lambda s: s.start_time or 0)
    assert len(runs) == 2  # it spawned and waited, then ran again once they ended
    kids = named(spans, "run square_sum")
    assert len(kids) == 2 and {parent_id(k) for k in kids} == {span_id(runs[0])}
    assert len(trace_ids([*runs, *kids, one(spans, "POST /v1/jobs")])) == 1
    assert (await job_row(hooks.deps, parent))["traceparent"] == traceparent_of(one(spans, "POST /v1/jobs"))


async def test_a_retry_begins_the_new_jobs_trace_from_the_retry_request(
    spans: InMemorySpanExporter, hooks: Hooks, drain: Drain
) -> None:
    failed = await hooks.submit("refuse", {})
    await drain()
    caller = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    response = await hooks.client.post(f"/v1/jobs/{failed}/retry", headers={"traceparent": caller})
    assert response.status_code == 202, response.text
    await drain()
    retry = one(spans, "POST /v1/jobs/{id}/retry")
    assert trace_ids([retry]) == {int(CALLER_TRACE, 16)} and retry.attributes is not None
    assert retry.attributes["outlast.job.id"] == response.json()["id"]
    second = max(named(spans, "run refuse"), key=lambda s: s.start_time or 0)
    assert parent_id(second) == span_id(retry)


def test_an_outbound_request_is_a_child_of_the_current_span_and_carries_its_own_context(
    spans: InMemorySpanExporter,
) -> None:
    """What a job's ctx.http is to use: inside an attempt, its requests are the attempt's children."""
    with tracing.incoming("POST", "/v1/jobs", {}), tracing.outgoing("GET", "https://api.example.com/x?key=k") as sent:
        tracing.answered(503)
    outbound, inbound = one(spans, "GET"), one(spans, "POST /v1/jobs")
    assert parent_id(outbound) == span_id(inbound) and sent == {"traceparent": traceparent_of(outbound)}
    assert outbound.status.status_code is StatusCode.ERROR and outbound.attributes is not None
    assert outbound.attributes["url.full"] == "https://api.example.com/x"


async def test_an_attempt_stopped_from_outside_ends_its_span_marked_stopped_and_leaves_no_context_behind(
    spans: InMemorySpanExporter,
) -> None:
    """An abort or the shutdown cancels run_job: its span still ends, and the next run on this task starts clean."""
    claimed = Claimed(
        id=uuid.uuid4(), tenant_id="t", type="sleep", input="{}", attempt=1, max_attempts=1, timeout_s=9,
        retry_safe=True, interrupted=0,
    )  # fmt: skip

    @tracing.attempts
    async def run_job(ctx: dict[str, Any], text: str) -> None:
        tracing.attempt_started(claimed)
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await run_job({}, "message")
    stopped = one(spans, "run sleep")
    assert stopped.attributes is not None and stopped.attributes["outlast.outcome"] == "stopped"
    assert stopped.status.status_code is not StatusCode.ERROR  # a shutdown is not the job's failure
    assert not trace.get_current_span().get_span_context().is_valid and tracing.traceparent() is None


async def test_a_workflows_steps_join_the_trace_its_submit_began(
    spans: InMemorySpanExporter, hooks: Hooks, drain: Drain
) -> None:
    steps = [
        {"name": "numbers", "type": "count_up", "input": {"n": 2}},
        {"name": "squares", "type": "square_item", "map": "numbers", "input": {"of": "numbers"}},
        {"name": "both", "type": "upstream", "after": ["squares"]},
    ]
    caller = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    response = await hooks.client.post("/v1/workflows", json={"steps": steps}, headers={"traceparent": caller})
    assert response.status_code == 202, response.text
    await drain()
    submit = one(spans, "POST /v1/workflows")
    runs = [*named(spans, "run count_up"), *named(spans, "run square_item"), *named(spans, "run upstream")]
    assert len(runs) == 4  # one, a map over its two items, one
    assert trace_ids([submit, *runs]) == {int(CALLER_TRACE, 16)}
    assert {parent_id(run) for run in runs} == {span_id(submit)}


async def test_a_batch_is_one_span_and_each_of_its_jobs_stores_it(spans: InMemorySpanExporter, hooks: Hooks) -> None:
    jobs = [{"type": "square_sum", "input": {"data": [n]}} for n in range(3)]
    response = await hooks.client.post("/v1/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 202, response.text
    batch = one(spans, "POST /v1/jobs/batch")
    for job in response.json()["items"]:
        assert (await job_row(hooks.deps, job["id"]))["traceparent"] == traceparent_of(batch)


async def test_with_tracing_off_nothing_is_traced_stored_or_sent(
    hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    assert not tracing.on()
    caller = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    body = {"type": "square_sum", "input": {"data": [2]}, "callback_url": receiver.url}
    response = await hooks.client.post("/v1/jobs", json=body, headers={"traceparent": caller})
    assert response.status_code == 202
    await drain()
    assert await hooks.deliver() == 1
    row = await job_row(hooks.deps, response.json()["id"])
    assert row["status"] == "succeeded" and row["traceparent"] is None
    [request] = receiver.requests
    assert "traceparent" not in request.headers


@pytest.mark.parametrize(
    ("setting", "environ", "wanted"),
    [
        ("auto", {}, False),
        ("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ("auto", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
        ("on", {}, True),
        ("off", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ("on", {"OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_tracing_is_wanted_when_an_otlp_endpoint_is_set_or_outlast_tracing_says_so(
    setting: str, environ: dict[str, str], wanted: bool
) -> None:
    assert tracing.wanted(Config(tracing=setting), environ) is wanted  # type: ignore[arg-type]


def test_without_opentelemetry_installed_everything_imports_and_nothing_traces() -> None:
    """As a deployment without the `otel` extra runs: an import of OpenTelemetry fails there."""
    script = """
import json, sys
sys.modules["opentelemetry"] = None  # what `import opentelemetry` finds where it is not installed
from worker import tracing
from worker.config import Config
import server.app, worker.options, worker.run  # the web, the worker and an attempt import without it
told = {"available": tracing.AVAILABLE}
told["auto"] = tracing.setup(Config(), service="t", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
try:
    tracing.setup(Config(tracing="on"), service="t", environ={})
except SystemExit as exc:
    told["on"] = str(exc)
with tracing.outgoing("POST", "http://example.com/hooks") as headers:
    told["headers"] = headers
told["traceparent"] = tracing.traceparent()
print(json.dumps(told))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    told: dict[str, Any] = json.loads(done.stdout)
    assert told["available"] is False and told["auto"] is False
    assert "pip install 'outlast[otel]'" in told["on"]
    assert told["headers"] == {} and told["traceparent"] is None
    assert "OpenTelemetry is not installed" in done.stderr  # `auto` with an endpoint says why there are no traces


async def test_with_an_otlp_endpoint_set_spans_are_exported_there_over_otlp_http(receiver: Receiver) -> None:
    """`auto`, as a deployment runs: OTEL_EXPORTER_OTLP_ENDPOINT is all it takes; the process's exit flushes."""
    script = """
import json
from worker import tracing
from worker.config import Config
told = {"off": tracing.setup(Config(), service="outlast-test", environ={})}
told["on"] = tracing.setup(Config(), service="outlast-test")
told["again"] = tracing.setup(Config(tracing="on"), service="another")
with tracing.outgoing("POST", "http://example.com/hooks", name="exported POST") as headers:
    told["headers"] = sorted(headers)
print(json.dumps(told))
"""
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}"}
    env.pop("OTEL_SERVICE_NAME", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cwd=ROOT, env=env, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    assert json.loads(out) == {"off": False, "on": True, "again": True, "headers": ["traceparent"]}
    [export] = receiver.requests
    assert export.method == "POST" and export.path == "/v1/traces"
    assert export.headers["content-type"] == "application/x-protobuf"
    assert b"exported POST" in export.body and b"outlast-test" in export.body


def exported(requests: Sequence[Received]) -> list[tuple[str, Any]]:
    """(service.name, span) for every span in the OTLP/HTTP export requests a collector received."""
    found = []
    for request in requests:
        for resource_spans in ExportTraceServiceRequest.FromString(request.body).resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                found += [(attributes["service.name"], span) for span in scope_spans.spans]
    return found


@pytest.mark.slow
async def test_real_web_and_worker_processes_export_one_trace_over_otlp_from_submit_to_webhook(
    hooks_config: Config, deps: Deps, api_key: str, receiver: Receiver, tmp_path: Path
) -> None:
    """As deployed: OTEL_EXPORTER_OTLP_ENDPOINT set on both processes, the trace context crossing from the web to the
    worker through the job's row, each process exporting its own spans to the collector."""
    collector = await Receiver().start()
    try:
        traced = msgspec.structs.replace(hooks_config, tracing="auto")  # the tests' own config says `off`
        env = process_env(traced, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url.removesuffix("/hooks"))
        procs = Processes({**env, "OTEL_BSP_SCHEDULE_DELAY": "100"}, tmp_path, api_key)
        procs.start_web()
        procs.start_worker()
        try:
            await procs.ready()
            async with procs.client() as client:
                body = {"type": "square_sum", "input": {"data": [4]}, "callback_url": receiver.url}
                caller = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
                response = await client.post("/v1/jobs", json=body, headers={"traceparent": caller})
                assert response.status_code == 202, response.text
                await wait_done(client, response.json()["id"])

            async def all_three() -> list[tuple[str, Any]] | None:
                spans = exported(collector.requests)
                names = {span.name for _, span in spans}
                return spans if {"POST /v1/jobs", "run square_sum", "webhook POST"} <= names else None

            spans = await eventually(all_three, within=30)
        finally:
            procs.stop()
    finally:
        await collector.stop()
    ours = {span.name: (service, span) for service, span in spans if span.trace_id == bytes.fromhex(CALLER_TRACE)}
    assert ours["POST /v1/jobs"][0] == "outlast-web"
    assert ours["run square_sum"][0] == ours["webhook POST"][0] == "outlast-worker"
    submit = ours["POST /v1/jobs"][1]
    assert submit.parent_span_id == bytes.fromhex(CALLER_SPAN)
    assert ours["run square_sum"][1].parent_span_id == ours["webhook POST"][1].parent_span_id == submit.span_id
    [request] = receiver.requests
    assert request.headers["traceparent"].split("-")[1:3] == [CALLER_TRACE, ours["webhook POST"][1].span_id.hex()]
    assert {export.path for export in collector.requests} == {"/v1/traces"}


def test_a_span_shows_no_user_password_or_query_of_a_url() -> None:
    assert (
        tracing.shown_url("https://u:p@hooks.example.com:8443/in?token=s3cret#x") == "https://hooks.example.com:8443/in"
    )
    assert tracing.shown_url("http://[::1]:9000/a") == "http://[::1]:9000/a"
