"""OpenTelemetry traces: the one module that imports OpenTelemetry, and a no-op wherever it is absent or tracing off.

    POST /v1/jobs ─ the submit span (server/tracing.py) ─ its traceparent stored with the job (jobs.traceparent)
      ├─ run <type>            each attempt (run.py), a child of the stored context: PostgreSQL and Redis inside
      │    └─ ctx.spawn        a child job stores the attempt's context: its attempts join the same trace
      └─ webhook POST          each delivery attempt of the job's end (webhooks/deliver.py), `traceparent` sent along

The `otel` extra brings the API, the SDK, the OTLP/HTTP exporter and the asyncpg and Redis instrumentations. Without
it this module still imports and every function does nothing, so Outlast runs as it does untraced. `setup` decides,
once per process, from OUTLAST_TRACING and the standard OTEL_* variables (docs/operations.md "Tracing"); a tracer
provider already installed (`opentelemetry-instrument`) is used as it is.

Only Outlast's own spans start a trace: a PostgreSQL or Redis call outside of them (arq's polling, the sweep, the
heartbeats) is dropped, or the one-span traces of a worker's polling would drown the jobs'.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit

from worker.config import Config

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    from worker.claim import Claimed
    from worker.job import Error

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the `otel` extra is not installed: nothing here traces
    AVAILABLE = False
else:
    AVAILABLE = True
    _propagator = TraceContextTextMapPropagator()  # W3C: a malformed traceparent is ignored, never an error

log = logging.getLogger("outlast.tracing")
SCOPE = "outlast"
OWN = "outlast.span"  # on every span Outlast starts itself: only these may start a trace
ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_tracer: Any = None  # trace.Tracer once tracing is on in this process


def on() -> bool:
    return _tracer is not None


def wanted(config: Config, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process should trace: OUTLAST_TRACING=on|off says so; `auto` traces when an OTLP endpoint is
    configured. OTEL_SDK_DISABLED=true, the SDK's own switch, wins over both."""
    if config.tracing == "off" or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return config.tracing == "on" or any(environ.get(name) for name in ENDPOINTS)


def setup(config: Config, *, service: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Trace this process if `wanted`, exporting over OTLP/HTTP (the SDK reads OTEL_EXPORTER_OTLP_* itself). True
    when on. Once per process: a second call (web and worker in one process, a test's `install`) changes nothing."""
    if on() or not wanted(config, environ):
        return on()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        hint = "install the otel extra (pip install 'outlast[otel]')"
        if config.tracing == "on":
            raise SystemExit(f"OUTLAST_TRACING=on, but OpenTelemetry is not installed: {hint}") from None
        log.warning("an OTLP endpoint is set but OpenTelemetry is not installed: no traces; %s", hint)
        return False
    current = trace.get_tracer_provider()
    if isinstance(current, trace.ProxyTracerProvider):  # nobody installed one: ours
        install(provider(BatchSpanProcessor(OTLPSpanExporter()), service=service, environ=environ))
    else:
        install(current)
    log.info("tracing on: %s", service)
    return True


def provider(processor: SpanProcessor, *, service: str, environ: Mapping[str, str] = os.environ) -> TracerProvider:
    """The tracer provider `setup` makes: `service` unless OTEL_SERVICE_NAME names it, spans to `processor`, and
    only Outlast's own spans starting traces unless OTEL_TRACES_SAMPLER picks a sampler."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased

    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    sampler = None if environ.get("OTEL_TRACES_SAMPLER") else ParentBased(_own_roots())
    made = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    made.add_span_processor(processor)
    return made


def _own_roots() -> Any:
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class OwnRoots(Sampler):
        """A trace starts at a span of Outlast's own (marked OWN); any other span without a parent is dropped."""

        def should_sample(
            self,
            parent_context: Any,
            trace_id: int,
            name: str,
            kind: Any = None,
            attributes: Any = None,
            links: Any = None,
            trace_state: Any = None,
        ) -> Any:
            own = attributes is not None and OWN in attributes
            return SamplingResult(Decision.RECORD_AND_SAMPLE if own else Decision.DROP, attributes if own else None)

        def get_description(self) -> str:
            return "OutlastOwnRoots"

    return OwnRoots()


def install(tracer_provider: Any) -> None:
    """Trace with `tracer_provider` (a TracerProvider): Outlast's spans, and PostgreSQL's and Redis's through their
    instrumentations where those are installed. Tests install one with an in-memory exporter."""
    global _tracer
    _tracer = tracer_provider.get_tracer(SCOPE)
    for instrumentor in _instrumentors():
        instrumentor.instrument(tracer_provider=tracer_provider)


def uninstall() -> None:
    """Tracing off again in this process (tests)."""
    global _tracer
    _tracer = None
    for instrumentor in _instrumentors():
        instrumentor.uninstrument()


def _instrumentors() -> list[Any]:
    found: list[Any] = []
    with contextlib.suppress(ImportError):
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        found.append(AsyncPGInstrumentor())  # type: ignore[no-untyped-call]  # statements only, never parameters
    with contextlib.suppress(ImportError):
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        found.append(RedisInstrumentor())  # commands with their arguments as `?`
    return found


def _parent(traceparent: str | None) -> Any:
    """The context a stored traceparent names: empty (a new trace) when there is none or it is malformed."""
    return _propagator.extract({"traceparent": traceparent} if traceparent else {}, context=otel_context.Context())


def traceparent() -> str | None:
    """The current span's context as a W3C traceparent, to store with a job made now; None when not tracing."""
    return headers().get("traceparent")


def headers() -> dict[str, str]:
    """The headers that carry the current span's context to another service (traceparent, tracestate)."""
    carrier: dict[str, str] = {}
    if on() and trace.get_current_span().get_span_context().is_valid:
        _propagator.inject(carrier)
    return carrier


def shown_url(url: str) -> str:
    """A URL as a span may show it: no user, password or query, where callback URLs carry their tokens."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    with contextlib.suppress(ValueError):
        if parts.port is not None:
            netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


# -- the web: a request that makes jobs --------------------------------------------------------------------------


@contextlib.contextmanager
def incoming(method: str, route: str, carrier: Mapping[str, str]) -> Iterator[None]:
    """A SERVER span around one request, a child of the caller's `traceparent` if it sent a valid one."""
    if _tracer is None:
        yield
        return
    parent = _propagator.extract(carrier, context=otel_context.Context())
    attributes = {OWN: "submit", "http.request.method": method, "http.route": route}
    with _tracer.start_as_current_span(
        f"{method} {route}", context=parent, kind=SpanKind.SERVER, attributes=attributes
    ):
        yield


def answered(status_code: int | None, *, error: str | None = None, server: bool = False, job_id: str = "") -> None:
    """The current span's answer: its status code, an error when it failed (a server's only on a 5xx), its job."""
    if _tracer is None:
        return
    span = trace.get_current_span()
    if status_code is not None:
        span.set_attribute("http.response.status_code", status_code)
    if job_id:
        span.set_attribute("outlast.job.id", job_id)
    failed = status_code is not None and status_code >= (500 if server else 400)
    if error is not None or failed:
        span.set_status(StatusCode.ERROR, error or f"answered {status_code}")


# -- the worker: an attempt, and what it calls -------------------------------------------------------------------


class _Attempt:
    __slots__ = ("span", "token")

    def __init__(self) -> None:
        self.span: Any = None
        self.token: Any = None


_attempt: ContextVar[_Attempt | None] = ContextVar("outlast_attempt", default=None)
Run = TypeVar("Run", bound=Callable[[dict[str, Any], str], Awaitable[None]])


def attempts(run: Run) -> Run:
    """Around arq's run_job: the attempt span that `attempt_started` opens once the claim has won ends when run_job
    returns. One that ends by raising (an abort, the shutdown, a finish the database never took) is marked `stopped`:
    what the row became then is the job's status, not this span's to guess."""

    @functools.wraps(run)
    async def traced(ctx: dict[str, Any], text: str) -> None:
        if _tracer is None:
            return await run(ctx, text)
        held = _Attempt()
        reset = _attempt.set(held)
        try:
            return await run(ctx, text)
        except BaseException as exc:
            if held.span is not None:
                held.span.set_attribute("outlast.outcome", "stopped")
                if isinstance(exc, Exception):
                    held.span.record_exception(exc)
                    held.span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if held.token is not None:
                otel_context.detach(held.token)
            if held.span is not None:
                held.span.end()
            _attempt.reset(reset)

    return cast("Run", traced)


def attempt_started(claimed: Claimed) -> None:
    """The attempt's span, a child of the trace context stored with its job, current from here to run_job's end: the
    job's task and every statement and command it makes are inside it."""
    held = _attempt.get()
    if _tracer is None or held is None:
        return
    attributes = {
        OWN: "attempt",
        "outlast.job.id": str(claimed.id),
        "outlast.job.type": claimed.type,
        "outlast.job.attempt": claimed.attempt,
        "outlast.tenant": claimed.tenant_id,
    }
    held.span = _tracer.start_span(
        f"run {claimed.type}", context=_parent(claimed.traceparent), kind=SpanKind.CONSUMER, attributes=attributes
    )
    held.token = otel_context.attach(trace.set_span_in_context(held.span))


def attempt_ended(to: str, error: Error | None) -> None:
    """How the attempt ended (`to`: the job's status after it); a failed attempt, retried or not, is an error."""
    held = _attempt.get()
    if held is None or held.span is None:
        return
    held.span.set_attribute("outlast.outcome", to)
    if error is not None and to in ("failed", "queued"):
        held.span.set_status(StatusCode.ERROR, f"{error.type}: {error.message}")


@contextlib.contextmanager
def outgoing(
    method: str,
    url: str,
    *,
    name: str = "",
    parent: str | None = None,
    attributes: Mapping[str, str | int] | None = None,
) -> Iterator[dict[str, str]]:
    """A CLIENT span around one outbound HTTP request, yielding the headers that carry it (`traceparent`): what a
    webhook delivery uses, and what a job's `ctx.http` is to use. A child of the current span, or of `parent` (a
    stored traceparent) when given. Report the answer with `answered`."""
    if _tracer is None:
        yield {}
        return
    noted = {OWN: "http", "http.request.method": method, "url.full": shown_url(url), **(attributes or {})}
    context = None if parent is None else _parent(parent)
    with _tracer.start_as_current_span(name or method, context=context, kind=SpanKind.CLIENT, attributes=noted):
        yield headers()
