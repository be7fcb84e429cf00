"""Client: the blocking client, on httpx.Client. AsyncClient (aio.py) is the same, line for line, with await."""

from __future__ import annotations

import builtins
import contextlib
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import IO, Any

import httpx
from httpx_sse import EventSource

from outlast_client.errors import error_of, retry_after, unreachable
from outlast_client.models import Event, Job, JobSpec, StepSpec, Workflow, WorkflowStreamEvent
from outlast_client.protocol import (
    RETRY_STATUSES,
    TRANSIENT,
    Call,
    Options,
    Reconnect,
    Resume,
    Retrying,
    Sink,
    Waiting,
    batch_call,
    cancel_call,
    cancel_workflow_call,
    decode_items,
    decode_job,
    decode_json,
    decode_page,
    decode_workflow,
    get_call,
    get_workflow_call,
    list_call,
    result_call,
    retry_call,
    submit_call,
    submit_workflow_call,
)

JobId = str | uuid.UUID


class Client:
    """A client of one Outlast server.

    `url` defaults to $OUTLAST_URL (else http://127.0.0.1:8000) and `api_key` to $OUTLAST_API_KEY; or pass
    `token`, a job read token from a Job's links, to read that one job (get, wait, stream, result). Network errors,
    429 and 503 are tried again, after the server's Retry-After or a growing random pause, for up to `retry_for`
    seconds since the last answer; a submit keeps its Idempotency-Key across tries, so it never makes two jobs.
    `timeout` bounds each request (a long poll's or a stream's reads wait longer, as they must); `long_poll` is
    how long each of wait()'s requests is held by the server (keep it under your proxies' idle timeout).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        retry_for: float = 60.0,
        long_poll: int = 25,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.options = Options.of(
            url, api_key=api_key, token=token, timeout=timeout, retry_for=retry_for, long_poll=long_poll
        )
        self._http = httpx.Client(
            base_url=self.options.url,
            headers=self.options.headers(),
            params=self.options.params(),
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- jobs ---------------------------------------------------------------------------------------------------

    def submit(
        self,
        type: str,
        input: Any = None,
        *,
        callback_url: str | None = None,
        metadata: dict[str, Any] | None = None,
        timeout_s: int | None = None,
        max_attempts: int | None = None,
        run_at: datetime | None = None,
        delay_s: float | None = None,
        priority: int | None = None,
        concurrency_key: str | None = None,
        idempotency_key: str | None = None,
        wait_s: int = 0,
    ) -> Job:
        """Submit a job: the Job, `queued`. `wait_s` (Prefer: wait, at most 60) holds the answer until the job is
        done or that many seconds pass, so a short job's final Job comes in one round trip. Without
        `idempotency_key` the client makes one, kept across its own tries."""
        spec = JobSpec(
            type=type,
            input=input,
            callback_url=callback_url,
            metadata=metadata,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            run_at=run_at,
            delay_s=delay_s,
            priority=priority,
            concurrency_key=concurrency_key,
            idempotency_key=idempotency_key,
        )
        return decode_job(self._send(submit_call(spec, wait_s)))

    def submit_many(self, jobs: Iterable[JobSpec]) -> builtins.list[Job]:
        """Submit a batch in one request and one transaction: all are made, or none (InvalidInput naming the item,
        as `$.jobs[17].input`). The Jobs, in order."""
        return decode_items(self._send(batch_call(jobs)))

    def get(self, job_id: JobId) -> Job:
        return decode_job(self._send(get_call(job_id)))

    def wait(self, job_id: JobId, timeout: float | None = None) -> Job:
        """The job once it is done (succeeded, failed, cancelled or expired: look at `status`), by long polls. With
        no `timeout`, as long as it takes; else JobNotDone (a TimeoutError) once `timeout` seconds have passed."""
        waiting = Waiting(self.options.long_poll_s, timeout)
        while True:
            response = self._send(get_call(job_id, waiting.hold_s()))
            job = decode_job(response)
            if job.done:
                return job
            time.sleep(waiting.pause(response, job))

    def stream(self, job_id: JobId, *, after: int | None = None) -> Iterator[Event]:
        """The job's events, typed, from the first (or after event id `after`) until the terminal StatusEvent.
        A dropped connection or a stream the server ends early is resumed with Last-Event-ID: no event is missed,
        none comes twice."""
        yield from self._follow(Resume(after), job_id, f"the events of job {job_id}")

    def stream_workflow(self, workflow_id: JobId, *, after: int | None = None) -> Iterator[WorkflowStreamEvent]:
        """A workflow's events (StepEvent, WorkflowEvent), resumed as a job's are, until the one that ends it."""
        yield from self._follow(Resume(after, workflow=True), workflow_id, f"the events of workflow {workflow_id}")

    def _follow(self, resume: Resume, key: JobId, what: str) -> Iterator[Any]:
        retrying = Retrying(self.options.retry_for_s)
        while True:
            response = self._send(resume.call(key), stream=True)
            pause: float | None = 0.0
            try:
                if response.status_code == 204:  # it had ended: nothing after `after`
                    return
                for sse in EventSource(response).iter_sse():
                    item = resume.take(sse)
                    if isinstance(item, Reconnect):
                        retrying.progressed()
                        pause = item.after_s
                        break
                    if item is not None:
                        retrying.progressed()
                        yield item
                        if resume.done:
                            return
                else:  # the connection ended cleanly, but before the job (or workflow) did
                    pause = retrying.delay()
            except TRANSIENT as exc:
                pause = retrying.delay()
                if pause is None:
                    raise unreachable(exc, retrying.tried_s, what) from exc
            finally:
                response.close()
            if pause is None:
                raise unreachable(EOFError("the stream kept ending"), retrying.tried_s, what)
            time.sleep(pause)

    def result(self, job_id: JobId, *, to: str | os.PathLike[str] | IO[bytes] | None = None) -> Any:
        """The job's result: decoded JSON; or, with `to` (a path, or a binary file), written there as it arrives,
        for large results, and the number of bytes written. JobFailed when the job ended without one (its `error`
        says why), JobNotDone while it runs."""
        if to is None:
            return decode_json(self._send(result_call(job_id)).content)
        sink = Sink(to)
        retrying = Retrying(self.options.retry_for_s)
        complete = False
        try:
            while True:
                response = self._send(result_call(job_id), stream=True)
                try:
                    sink.restart()
                    for chunk in response.iter_bytes():
                        sink.write(chunk)
                    complete = True
                    return sink.written
                except TRANSIENT as exc:
                    pause = retrying.delay()
                    if pause is None:
                        raise unreachable(exc, retrying.tried_s, f"the result of job {job_id}") from exc
                finally:
                    response.close()
                time.sleep(pause)
        finally:
            sink.close(complete=complete)

    def cancel(self, job_id: JobId) -> Job:
        """Cancel: a queued job at once, a running one is interrupted (it ends `cancelled`). Conflict when done."""
        return decode_job(self._send(cancel_call(job_id)))

    def retry(self, job_id: JobId) -> Job:
        """A new job with the failed, cancelled or expired job's type, input, limits, metadata and callback; its
        `retry_of` names the old one. Conflict for a job in any other state."""
        return decode_job(self._send(retry_call(job_id)))

    def list(self, *, status: str | None = None, type: str | None = None, page_size: int = 100) -> Iterator[Job]:
        """The tenant's jobs, newest first, optionally of one status and type: every page, fetched as iterated."""
        cursor = None
        while True:
            page = decode_page(self._send(list_call(status=status, type=type, page_size=page_size, cursor=cursor)))
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # -- workflows ------------------------------------------------------------------------------------------------

    def submit_workflow(
        self,
        steps: Iterable[StepSpec],
        *,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
    ) -> Workflow:
        """A workflow (docs/workflows.md): its steps, checked whole before anything is made (InvalidInput naming the
        field, as `$.steps[2].after[0]`), and a `callback_url` for one webhook when it ends. Sent again after a
        dropped connection, it makes the workflow once."""
        return decode_workflow(self._send(submit_workflow_call(steps, metadata, idempotency_key, callback_url)))

    def workflow(self, workflow_id: JobId) -> Workflow:
        return decode_workflow(self._send(get_workflow_call(workflow_id)))

    def wait_workflow(self, workflow_id: JobId, *, timeout: float | None = None, poll_s: float = 1.0) -> Workflow:
        """The workflow once it is done (succeeded, failed or cancelled: look at `status`), polled every `poll_s`;
        with a `timeout`, TimeoutError once that many seconds have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (found := self.workflow(workflow_id)).done:
            if deadline is not None and time.monotonic() + poll_s > deadline:
                raise TimeoutError(f"workflow {workflow_id} is still {found.status}")
            time.sleep(poll_s)
        return found

    def cancel_workflow(self, workflow_id: JobId) -> Workflow:
        """End it `cancelled`: nothing of it starts any more, its queued jobs are cancelled and its running ones
        asked to stop. Conflict once it has ended."""
        return decode_workflow(self._send(cancel_workflow_call(workflow_id)))

    # -- sending --------------------------------------------------------------------------------------------------

    def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        """The call's answer once it is not a transient failure; its typed error if it is an error. A streamed
        answer is open: the caller closes it."""
        retrying = Retrying(self.options.retry_for_s)
        while True:
            try:
                response = self._http.send(call.request(self._http, self.options), stream=stream)
                if not response.is_success:
                    with contextlib.closing(response):
                        response.read()
            except TRANSIENT as exc:
                pause = retrying.delay()
                if pause is None:
                    raise unreachable(exc, retrying.tried_s, f"{call.method} {call.path}") from exc
            else:
                if response.is_success:
                    return response
                pause = retrying.delay(retry_after(response)) if response.status_code in RETRY_STATUSES else None
                if pause is None:
                    raise error_of(response, call.job_id)
            time.sleep(pause)
