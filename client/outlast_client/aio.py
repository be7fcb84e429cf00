"""AsyncClient: the asyncio client, on httpx.AsyncClient. Client (sync.py) is the same, line for line, without await;
what they share is in protocol.py."""

from __future__ import annotations

import asyncio
import builtins
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable
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


class AsyncClient:
    """A client of one Outlast server, for asyncio: the methods of Client, awaited (stream() and list() are async
    iterators). The same settings, defaults and retries: see Client."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        retry_for: float = 60.0,
        long_poll: int = 25,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.options = Options.of(
            url, api_key=api_key, token=token, timeout=timeout, retry_for=retry_for, long_poll=long_poll
        )
        self._http = httpx.AsyncClient(
            base_url=self.options.url,
            headers=self.options.headers(),
            params=self.options.params(),
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- jobs ---------------------------------------------------------------------------------------------------

    async def submit(
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
        """Client.submit."""
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
        return decode_job(await self._send(submit_call(spec, wait_s)))

    async def submit_many(self, jobs: Iterable[JobSpec]) -> builtins.list[Job]:
        """Client.submit_many."""
        return decode_items(await self._send(batch_call(jobs)))

    async def get(self, job_id: JobId) -> Job:
        return decode_job(await self._send(get_call(job_id)))

    # JobNotDone carries the job as last seen, which asyncio.timeout around the call could not.
    async def wait(self, job_id: JobId, timeout: float | None = None) -> Job:  # noqa: ASYNC109
        """Client.wait."""
        waiting = Waiting(self.options.long_poll_s, timeout)
        while True:
            response = await self._send(get_call(job_id, waiting.hold_s()))
            job = decode_job(response)
            if job.done:
                return job
            await asyncio.sleep(waiting.pause(response, job))

    async def stream(self, job_id: JobId, *, after: int | None = None) -> AsyncIterator[Event]:
        """Client.stream."""
        async for item in self._follow(Resume(after), job_id, f"the events of job {job_id}"):
            yield item

    async def stream_workflow(
        self, workflow_id: JobId, *, after: int | None = None
    ) -> AsyncIterator[WorkflowStreamEvent]:
        """Client.stream_workflow."""
        async for item in self._follow(
            Resume(after, workflow=True), workflow_id, f"the events of workflow {workflow_id}"
        ):
            yield item

    async def _follow(self, resume: Resume, key: JobId, what: str) -> AsyncIterator[Any]:
        retrying = Retrying(self.options.retry_for_s)
        while True:
            response = await self._send(resume.call(key), stream=True)
            pause: float | None = 0.0
            try:
                if response.status_code == 204:  # it had ended: nothing after `after`
                    return
                async for sse in EventSource(response).aiter_sse():
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
                await response.aclose()
            if pause is None:
                raise unreachable(EOFError("the stream kept ending"), retrying.tried_s, what)
            await asyncio.sleep(pause)

    async def result(self, job_id: JobId, *, to: str | os.PathLike[str] | IO[bytes] | None = None) -> Any:
        """Client.result. The file is written in a thread, so the event loop never waits on the disk."""
        if to is None:
            return decode_json((await self._send(result_call(job_id))).content)
        sink = Sink(to)
        retrying = Retrying(self.options.retry_for_s)
        complete = False
        try:
            while True:
                response = await self._send(result_call(job_id), stream=True)
                try:
                    await asyncio.to_thread(sink.restart)
                    async for chunk in response.aiter_bytes():
                        await asyncio.to_thread(sink.write, chunk)
                    complete = True
                    return sink.written
                except TRANSIENT as exc:
                    pause = retrying.delay()
                    if pause is None:
                        raise unreachable(exc, retrying.tried_s, f"the result of job {job_id}") from exc
                finally:
                    await response.aclose()
                await asyncio.sleep(pause)
        finally:
            await asyncio.to_thread(sink.close, complete=complete)

    async def cancel(self, job_id: JobId) -> Job:
        """Client.cancel."""
        return decode_job(await self._send(cancel_call(job_id)))

    async def retry(self, job_id: JobId) -> Job:
        """Client.retry."""
        return decode_job(await self._send(retry_call(job_id)))

    async def list(
        self, *, status: str | None = None, type: str | None = None, page_size: int = 100
    ) -> AsyncIterator[Job]:
        """Client.list."""
        cursor = None
        while True:
            call = list_call(status=status, type=type, page_size=page_size, cursor=cursor)
            page = decode_page(await self._send(call))
            for job in page.items:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # -- workflows ------------------------------------------------------------------------------------------------

    async def submit_workflow(
        self,
        steps: Iterable[StepSpec],
        *,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
    ) -> Workflow:
        """Client.submit_workflow."""
        return decode_workflow(await self._send(submit_workflow_call(steps, metadata, idempotency_key, callback_url)))

    async def workflow(self, workflow_id: JobId) -> Workflow:
        return decode_workflow(await self._send(get_workflow_call(workflow_id)))

    async def wait_workflow(self, workflow_id: JobId, *, timeout: float | None = None, poll_s: float = 1.0) -> Workflow:  # noqa: ASYNC109
        """Client.wait_workflow."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (found := await self.workflow(workflow_id)).done:
            if deadline is not None and time.monotonic() + poll_s > deadline:
                raise TimeoutError(f"workflow {workflow_id} is still {found.status}")
            await asyncio.sleep(poll_s)
        return found

    async def cancel_workflow(self, workflow_id: JobId) -> Workflow:
        """Client.cancel_workflow."""
        return decode_workflow(await self._send(cancel_workflow_call(workflow_id)))

    # -- sending --------------------------------------------------------------------------------------------------

    async def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        """Client._send."""
        retrying = Retrying(self.options.retry_for_s)
        while True:
            try:
                response = await self._http.send(call.request(self._http, self.options), stream=stream)
                if not response.is_success:
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
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
            await asyncio.sleep(pause)
