"""Batcher: writes that arrive while an earlier one is on its way go out together, one statement for many jobs.

A busy worker claims and finishes jobs a few hundred microseconds apart. Each as its own statement is a round trip
and a commit, and on a small machine the socket writes alone cost the worker more CPU than arq's own bookkeeping
(docs/performance.md). Here a write goes out at once, in its caller's task, when none is on its way, so an idle
worker waits for nothing. Writes that come while one is on its way wait for it to end, then `linger_s` more for
others to join, and go out as one statement. Each row keeps its own guard (the statement's WHERE applies per job),
so a batch changes exactly what its writes would one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """`await batcher(item)`: `many([..., item, ...])`'s answer for this item, in a batch when others are waiting.

    `many` answers each item in the order given. When it raises one of `shared` (the database is unreachable: the
    outcome is the same for all, and unknown), every item in the batch raises it; when it raises anything else (a
    value one job's row refused), each item is tried alone, so one bad write never fails the others.

    A cancelled caller raises CancelledError only once its write has ended, committed or not, so that it can then
    ask the database what the write did without racing a statement still on its way.
    """

    def __init__(
        self,
        many: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        shared: tuple[type[BaseException], ...],
        linger_s: float,
        limit: int = 100,
    ) -> None:
        self._many, self._shared, self._linger_s, self._limit = many, shared, linger_s, limit
        self._busy = False  # a write is on its way: the next ones wait and go together
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, item: T) -> R:
        if not self._busy:
            self._busy = True
            try:
                return (await self._many([item]))[0]  # in the caller's task: cancelling it cancels the statement
            finally:
                self._next()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():  # a second cancel (an abort, then the shutdown) waits all the same
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # taken, so asyncio doesn't log an answer nobody will read as lost
            raise

    def _next(self) -> None:
        if not self._waiting:
            self._busy = False
            return
        task = asyncio.create_task(self._send())
        self._tasks.add(task)
        task.add_done_callback(self._sender_done)

    def _sender_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() and self._busy and not self._tasks:
            # Cancelled before its first step (a loop closing cancels every task): it answered nobody and freed
            # nothing, so the writes still waiting would wait forever, and every later one behind them.
            for _, future in self._waiting:
                future.cancel()
            self._waiting = []
            self._busy = False

    async def _send(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            await asyncio.sleep(self._linger_s)
            batch, self._waiting = self._waiting[: self._limit], self._waiting[self._limit :]
            await self._answer(batch)
        except Exception as exc:  # what concerns the whole batch
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        except BaseException:  # cancelled: the loop is closing, and every write still here is dropped
            for _, future in batch + self._waiting:
                future.cancel()
            self._waiting = []
            raise
        finally:
            self._next()

    async def _answer(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """Settle each future of `batch` with its item's answer; raise what concerns them all."""
        try:
            answers = await self._many([item for item, _ in batch])
        except self._shared:
            raise
        except Exception:
            if len(batch) == 1:
                raise
            for one in batch:  # alone, so each gets its own answer
                try:
                    await self._answer([one])
                except Exception as exc:
                    if not one[1].done():
                        one[1].set_exception(exc)
            return
        for (_, future), answer in zip(batch, answers, strict=True):
            if not future.done():
                future.set_result(answer)

    async def aclose(self) -> None:
        """Wait for the batches on their way."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))
