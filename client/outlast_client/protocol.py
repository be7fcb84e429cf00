"""What Client and AsyncClient share, free of I/O: the requests of each method, when and how long to wait before
trying again, reading answers, resuming a stream, pacing a wait, and where a result is written.

The two clients only send: `Client` with httpx.Client, `AsyncClient` with httpx.AsyncClient, each with the same
loops over these pieces.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Final

import httpx
import msgspec
from httpx_sse import ServerSentEvent

from outlast_client.errors import not_done, retry_after
from outlast_client.models import (
    Event,
    Job,
    JobItems,
    JobPage,
    JobSpec,
    LogEvent,
    Progress,
    ProgressEvent,
    Retry,
    StatusEvent,
    StepEvent,
    StepSpec,
    Workflow,
    WorkflowEvent,
    WorkflowStreamEvent,
)

DEFAULT_URL: Final = "http://127.0.0.1:8000"
# Answers that say "not now": tried again after their Retry-After. Every call is safe to send twice: submits carry
# an Idempotency-Key, the rest read or move a job to where a repeat finds it.
RETRY_STATUSES: Final = frozenset({429, 503})
# Failures after which the server may or may not have the request: tried again, which the above makes safe.
TRANSIENT: Final = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)
BACKOFF_BASE_S: Final = 0.5
BACKOFF_CAP_S: Final = 30.0
STREAM_READ_S: Final = 60.0  # the server sends a keep-alive at least every 15 s: 60 s of silence is a dead connection
MAX_LONG_POLL_S: Final = 60  # the server's cap on Prefer: wait


@dataclass(frozen=True)
class Options:
    """A client's settings, with the environment's defaults applied."""

    url: str
    api_key: str | None
    token: str | None
    timeout_s: float
    retry_for_s: float
    long_poll_s: int

    @classmethod
    def of(
        cls,
        url: str | None,
        *,
        api_key: str | None,
        token: str | None,
        timeout: float,
        retry_for: float,
        long_poll: int,
        environ: Mapping[str, str] = os.environ,
    ) -> Options:
        if api_key is not None and token is not None:
            raise ValueError("give api_key or token, not both: a request with a key never reads the token")
        if token is None and api_key is None:
            api_key = environ.get("OUTLAST_API_KEY") or None
        if not 1 <= long_poll <= MAX_LONG_POLL_S:
            raise ValueError(f"long_poll must be 1..{MAX_LONG_POLL_S} seconds (the server's cap on Prefer: wait)")
        url = (url or environ.get("OUTLAST_URL") or DEFAULT_URL).rstrip("/")
        return cls(url, api_key, token, timeout, retry_for, long_poll)

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": "outlast-client/0.1", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def params(self) -> dict[str, str]:
        # A job read token goes in the query string: the server takes it only there, on that job's read routes.
        return {"token": self.token} if self.token else {}


@dataclass(frozen=True)
class Call:
    """One request a method makes; sent again, unchanged, after a transient failure."""

    method: str
    path: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    read_s: float | None = None  # how long the answer may take to come: a long poll's hold and more
    job_id: str | None = None  # the job the call names, for its errors

    def request(self, http: httpx.Client | httpx.AsyncClient, options: Options) -> httpx.Request:
        headers = {**self.headers, "Content-Type": "application/json"} if self.body is not None else self.headers
        if self.read_s is None:
            return http.build_request(self.method, self.path, content=self.body, headers=headers, params=self.params)
        timeout = httpx.Timeout(options.timeout_s, read=max(options.timeout_s, self.read_s))
        return http.build_request(
            self.method, self.path, content=self.body, headers=headers, params=self.params, timeout=timeout
        )


class Retrying:
    """When to try again after a transient failure: after the server's Retry-After when it gave one, else after a
    full-jitter exponential backoff; for up to `budget_s` from the first failure in a row (`progressed()` ends a
    row), so a stream that keeps delivering keeps reconnecting, and a server that is gone is given up on."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.failures = 0
        self.since: float | None = None  # the first failure of this row

    def progressed(self) -> None:
        self.failures, self.since = 0, None

    def delay(self, retry_after: float | None = None) -> float | None:
        """Seconds to wait before the next try; None: give up (the wait would end past the budget)."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        self.failures += 1
        if retry_after is None:
            envelope = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** min(self.failures - 1, 30))
            wait = random.uniform(0, envelope)
        else:
            wait = retry_after
        if now + wait - self.since > self.budget_s:
            return None
        return wait

    @property
    def tried_s(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since


_encode = msgspec.json.Encoder().encode
_job = msgspec.json.Decoder(Job).decode
_page = msgspec.json.Decoder(JobPage).decode
_items = msgspec.json.Decoder(JobItems).decode
_any = msgspec.json.Decoder().decode


def decode_job(response: httpx.Response) -> Job:
    return _job(response.content)


def decode_page(response: httpx.Response) -> JobPage:
    return _page(response.content)


def decode_items(response: httpx.Response) -> list[Job]:
    return _items(response.content).items


def decode_json(content: bytes) -> Any:
    return _any(content)


def new_key() -> str:
    return str(uuid.uuid4())


def _path(job_id: str | uuid.UUID, tail: str = "") -> str:
    return f"/v1/jobs/{job_id}{tail}"


def submit_call(spec: JobSpec, wait_s: int = 0) -> Call:
    """POST /v1/jobs. The Idempotency-Key is made here, once, so every try of this call carries the same one."""
    key = spec.idempotency_key or new_key()
    body = _encode(msgspec.structs.replace(spec, idempotency_key=None))
    headers = {"Idempotency-Key": key}
    if wait_s:
        headers["Prefer"] = f"wait={min(wait_s, MAX_LONG_POLL_S)}"
    return Call("POST", "/v1/jobs", body, headers, read_s=wait_s + 30.0 if wait_s else None)


def batch_call(specs: Iterable[JobSpec]) -> Call:
    """POST /v1/jobs/batch; each item without a key gets one, so a retried batch makes each job once."""
    jobs = [s if s.idempotency_key else msgspec.structs.replace(s, idempotency_key=new_key()) for s in specs]
    return Call("POST", "/v1/jobs/batch", _encode({"jobs": jobs}))


def get_call(job_id: str | uuid.UUID, wait_s: int = 0) -> Call:
    if not wait_s:
        return Call("GET", _path(job_id), job_id=str(job_id))
    headers = {"Prefer": f"wait={wait_s}"}
    return Call("GET", _path(job_id), headers=headers, read_s=wait_s + 30.0, job_id=str(job_id))


def cancel_call(job_id: str | uuid.UUID) -> Call:
    return Call("POST", _path(job_id, "/cancel"), job_id=str(job_id))


def retry_call(job_id: str | uuid.UUID) -> Call:
    # The server makes the retry's job once per Idempotency-Key, as for a submit.
    return Call("POST", _path(job_id, "/retry"), headers={"Idempotency-Key": new_key()}, job_id=str(job_id))


def list_call(*, status: str | None, type: str | None, page_size: int, cursor: str | None) -> Call:
    params = {"limit": str(page_size)}
    for name, value in (("status", status), ("type", type), ("cursor", cursor)):
        if value is not None:
            params[name] = value
    return Call("GET", "/v1/jobs", params=params)


def result_call(job_id: str | uuid.UUID) -> Call:
    return Call("GET", _path(job_id, "/result"), job_id=str(job_id))


def events_call(job_id: str | uuid.UUID, after: int | None) -> Call:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
    if after is not None:
        headers["Last-Event-ID"] = str(after)
    return Call("GET", _path(job_id, "/events"), headers=headers, read_s=STREAM_READ_S, job_id=str(job_id))


class _StatusData(msgspec.Struct, frozen=True):
    retry: Retry | None = None


class _LogData(msgspec.Struct, frozen=True):
    level: str
    message: str


class _ReconnectData(msgspec.Struct, frozen=True):
    reason: str = ""


_retry = msgspec.json.Decoder(_StatusData).decode
_progress = msgspec.json.Decoder(Progress).decode
_log = msgspec.json.Decoder(_LogData).decode
_reconnect = msgspec.json.Decoder(_ReconnectData).decode


@dataclass(frozen=True)
class Reconnect:
    """The server ended the stream before the job ended (its lifetime, a deploy, a token's end): come back after
    `after_s` with the same Last-Event-ID."""

    reason: str
    after_s: float


class Resume:
    """A job's stream (or with `workflow`, a workflow's) across connections: the Last-Event-ID to send, each event
    typed and delivered once, and whether the end (the terminal status event) has come."""

    def __init__(self, after: int | None, *, workflow: bool = False) -> None:
        self.last = after
        self.done = False
        self.workflow = workflow

    def call(self, key: str | uuid.UUID) -> Call:
        if self.workflow:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
            if self.last is not None:
                headers["Last-Event-ID"] = str(self.last)
            return Call("GET", f"/v1/workflows/{key}/events", headers=headers, read_s=STREAM_READ_S)
        return events_call(key, self.last)

    def take(self, sse: ServerSentEvent) -> Event | WorkflowStreamEvent | Reconnect | None:
        """The typed event; a Reconnect; None for what is not for the caller (an event seen already, a name this
        client does not know)."""
        if sse.event == "reconnect":
            retry_ms = sse.retry if sse.retry is not None else 1000
            return Reconnect(_reconnect(sse.data or "{}").reason, retry_ms / 1000)
        if not sse.id.isdigit():
            return None
        seq = int(sse.id)
        if self.last is not None and seq <= self.last:
            return None  # never twice, whatever a server or proxy replays
        event = _typed_workflow(sse, seq) if self.workflow else _typed(sse, seq)
        self.last = seq
        if (isinstance(event, StatusEvent) and event.job.done) or (isinstance(event, WorkflowEvent) and event.done):
            self.done = True
        return event


def _typed(sse: ServerSentEvent, seq: int) -> Event | None:
    data = sse.data.encode()
    if sse.event == "status":
        return StatusEvent(id=seq, job=_job(data), retry=_retry(data).retry)
    if sse.event == "progress":
        progress = _progress(data)
        return ProgressEvent(id=seq, fraction=progress.fraction, message=progress.message)
    if sse.event == "log":
        line = _log(data)
        return LogEvent(id=seq, level=line.level, message=line.message)
    return None


class _StepData(msgspec.Struct, frozen=True):
    step: str
    status: str


class _WorkflowData(msgspec.Struct, frozen=True):
    status: str
    error: dict[str, Any] | None = None
    finished_at: datetime | None = None


_step = msgspec.json.Decoder(_StepData).decode
_workflow_data = msgspec.json.Decoder(_WorkflowData).decode


def _typed_workflow(sse: ServerSentEvent, seq: int) -> WorkflowStreamEvent | None:
    data = sse.data.encode()
    if sse.event == "step":
        step = _step(data)
        return StepEvent(id=seq, step=step.step, status=step.status)
    if sse.event == "workflow":
        found = _workflow_data(data)
        return WorkflowEvent(id=seq, status=found.status, error=found.error, finished_at=found.finished_at)
    return None


class Waiting:
    """wait()'s pace: long polls of `long_poll_s` (or what is left of the timeout), back to back while the server
    holds them; when it does not (`Preference-Applied` missing, e.g. an old proxy in between), its Retry-After
    between polls. No count of polls: an hour-long job is waited for as long as it takes."""

    def __init__(self, long_poll_s: int, timeout_s: float | None) -> None:
        self.long_poll_s = long_poll_s
        self.timeout_s = timeout_s
        self.started = time.monotonic()

    def left(self) -> float | None:
        return None if self.timeout_s is None else self.timeout_s - (time.monotonic() - self.started)

    def hold_s(self) -> int:
        left = self.left()
        return self.long_poll_s if left is None else max(0, min(self.long_poll_s, int(left)))

    def pause(self, response: httpx.Response, job: Job) -> float:
        """Seconds before the next poll of a job that is not done; JobNotDone once the timeout has passed."""
        left = self.left()
        if left is not None and left <= 0:
            raise not_done(job, time.monotonic() - self.started)
        if "preference-applied" in response.headers:
            return 0.0
        hint = retry_after(response) or 1.0
        return hint if left is None else max(0.0, min(hint, left))


class Sink:
    """Where result(to=…) writes: a path (through `<name>.part`, renamed when complete, so a half-written result is
    never found under the name) or a binary file the caller opened. `restart()` before a try after a dropped
    download: the result is written again from its start."""

    def __init__(self, to: str | os.PathLike[str] | IO[bytes]) -> None:
        self.path: Path | None = None
        self.file: IO[bytes] | None = None
        self.start = 0
        self.written = 0
        if isinstance(to, str | os.PathLike):
            self.path = Path(to)
        else:
            self.file = to
            self.start = to.tell() if to.seekable() else 0

    def restart(self) -> None:
        if self.path is not None:
            if self.file is not None:
                self.file.close()
            self.file = self.path.with_name(self.path.name + ".part").open("wb")
        elif self.written:
            assert self.file is not None
            if not self.file.seekable():
                raise OSError("the download was cut and the file can't be rewound to write the result again")
            self.file.seek(self.start)
            self.file.truncate()
        self.written = 0

    def write(self, chunk: bytes) -> None:
        assert self.file is not None
        self.file.write(chunk)
        self.written += len(chunk)

    def close(self, *, complete: bool) -> None:
        if self.path is None or self.file is None:
            return
        self.file.close()
        part = self.path.with_name(self.path.name + ".part")
        if complete:
            part.replace(self.path)
        else:
            part.unlink(missing_ok=True)


# -- workflows ----------------------------------------------------------------------------------------------------

_workflow = msgspec.json.Decoder(Workflow).decode


def decode_workflow(response: httpx.Response) -> Workflow:
    return _workflow(response.content)


def submit_workflow_call(
    steps: Iterable[StepSpec], metadata: dict[str, Any] | None, key: str | None, callback_url: str | None = None
) -> Call:
    """POST /v1/workflows, with one Idempotency-Key for every try: a retried submit makes the workflow once."""
    body: dict[str, Any] = {"steps": list(steps)}
    if metadata is not None:
        body["metadata"] = metadata
    if callback_url is not None:
        body["callback_url"] = callback_url
    return Call("POST", "/v1/workflows", _encode(body), {"Idempotency-Key": key or new_key()})


def get_workflow_call(workflow_id: str | uuid.UUID) -> Call:
    return Call("GET", f"/v1/workflows/{workflow_id}")


def cancel_workflow_call(workflow_id: str | uuid.UUID) -> Call:
    return Call("POST", f"/v1/workflows/{workflow_id}/cancel")
