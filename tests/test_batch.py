"""worker/batch.py: writes that come while one is on its way go out together, and each still gets its own answer.

`many` here is a plain coroutine recording what it was given: these pin the batching itself. The statements it
batches in the worker (claim_many, finish_many) are tested against PostgreSQL in tests/test_store.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from worker.batch import Batcher

DEADLINE_S = 10.0


class Unreachable(Exception):
    pass


class Statements:
    """A `many` that answers each item with `item * 10` and refuses negative items. Its first `held` calls wait
    until the test opens them (`gates[i]`), so a test can hold a batch on its way."""

    def __init__(self, held: int = 0) -> None:
        self.calls: list[list[int]] = []
        self.gates = [asyncio.Event() for _ in range(held)]
        self.unreachable = False
        self.called = asyncio.Event()

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.calls.append(list(items))
        self.called.set()
        if len(self.calls) <= len(self.gates):
            await self.gates[len(self.calls) - 1].wait()
        if self.unreachable:
            raise Unreachable("the database is down")
        if any(item < 0 for item in items):
            raise ValueError("a row refused a negative value")
        return [item * 10 for item in items]

    async def on_its_way(self, n: int) -> None:
        """Until call `n` (0-based) has started."""

        async def started() -> None:
            while len(self.calls) <= n:
                self.called.clear()
                await self.called.wait()

        await asyncio.wait_for(started(), DEADLINE_S)


def batcher(statements: Statements, *, linger_s: float = 0.0, limit: int = 100) -> Batcher[int, int]:
    return Batcher(statements, shared=(Unreachable,), linger_s=linger_s, limit=limit)


async def queued_behind_the_first(
    statements: Statements, batch: Batcher[int, int], *items: int
) -> list[asyncio.Task[int]]:
    """Write 1 (held on its way by gate 0), then `items`, which wait behind it."""
    first = asyncio.create_task(batch(1))
    await statements.on_its_way(0)
    waiting = [asyncio.create_task(batch(n)) for n in items]
    for _ in range(3):
        await asyncio.sleep(0)  # each task runs up to its wait
    return [first, *waiting]


async def test_a_write_with_none_on_its_way_goes_at_once_alone() -> None:
    statements = Statements()
    batch = batcher(statements, linger_s=3600)  # a linger it waited for would never end within the deadline
    assert await asyncio.wait_for(batch(1), DEADLINE_S) == 10
    assert await asyncio.wait_for(batch(2), DEADLINE_S) == 20
    assert statements.calls == [[1], [2]]


async def test_writes_that_come_while_one_is_on_its_way_go_out_together_each_with_its_answer() -> None:
    statements = Statements(held=1)
    batch = batcher(statements)
    tasks = await queued_behind_the_first(statements, batch, 2, 3, 4)
    statements.gates[0].set()
    assert await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S) == [10, 20, 30, 40]
    assert statements.calls == [[1], [2, 3, 4]]
    await batch.aclose()


async def test_a_batch_goes_no_larger_than_its_limit() -> None:
    statements = Statements(held=1)
    batch = batcher(statements, limit=2)
    tasks = await queued_behind_the_first(statements, batch, 2, 3, 4)
    statements.gates[0].set()
    assert await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S) == [10, 20, 30, 40]
    assert statements.calls == [[1], [2, 3], [4]]


async def test_a_write_one_row_refuses_fails_alone_and_its_batch_mates_still_land() -> None:
    statements = Statements(held=1)
    batch = batcher(statements)
    first, two, minus_three, four = await queued_behind_the_first(statements, batch, 2, -3, 4)
    statements.gates[0].set()
    await asyncio.wait_for(asyncio.wait([first, two, minus_three, four]), DEADLINE_S)
    assert [first.result(), two.result(), four.result()] == [10, 20, 40]
    with pytest.raises(ValueError, match="negative"):
        minus_three.result()
    assert statements.calls == [[1], [2, -3, 4], [2], [-3], [4]]


async def test_an_unreachable_database_fails_the_whole_batch_without_retrying_each() -> None:
    statements = Statements(held=1)
    batch = batcher(statements)
    tasks = await queued_behind_the_first(statements, batch, 2, 3)
    statements.unreachable = True
    statements.gates[0].set()
    await asyncio.wait_for(asyncio.wait(tasks), DEADLINE_S)
    for task in tasks:
        with pytest.raises(Unreachable):
            task.result()
    assert statements.calls == [[1], [2, 3]]  # the outcome is unknown for all: nobody retries here


async def test_a_cancelled_waiting_write_ends_only_once_its_batch_has_ended() -> None:
    """So the caller can ask the database what the write did, without racing a statement still on its way."""
    statements = Statements(held=2)
    batch = batcher(statements)
    first, second = await queued_behind_the_first(statements, batch, 2)
    statements.gates[0].set()
    await statements.on_its_way(1)  # the batch holding 2 is on its way, and held
    second.cancel()
    for _ in range(10):
        await asyncio.sleep(0)
    assert not second.done()  # waiting for its statement, not abandoned while it may still commit
    statements.gates[1].set()
    await asyncio.wait_for(asyncio.wait([first, second]), DEADLINE_S)
    assert second.cancelled() and statements.calls == [[1], [2]]


async def test_writes_linger_behind_one_on_its_way_to_go_out_with_later_ones() -> None:
    statements = Statements(held=1)
    batch = batcher(statements, linger_s=1.0)
    first, early = await queued_behind_the_first(statements, batch, 2)
    statements.gates[0].set()
    await asyncio.wait_for(first, DEADLINE_S)
    late = asyncio.create_task(batch(3))  # the first has ended; 2 lingers, so 3 joins it
    assert await asyncio.wait_for(asyncio.gather(early, late), DEADLINE_S) == [20, 30]
    assert statements.calls == [[1], [2, 3]]


async def test_a_waiting_write_cancelled_twice_still_ends_only_once_its_batch_has_ended() -> None:
    """An arq abort, then the shutdown's cancel, while the claim waits in a batch."""
    statements = Statements(held=2)
    batch = batcher(statements)
    first, second = await queued_behind_the_first(statements, batch, 2)
    statements.gates[0].set()
    await statements.on_its_way(1)
    for _ in range(2):
        second.cancel()
        for _ in range(10):
            await asyncio.sleep(0)
        assert not second.done()
    statements.gates[1].set()
    await asyncio.wait_for(asyncio.wait([first, second]), DEADLINE_S)
    assert second.cancelled() and statements.calls == [[1], [2]]


async def test_writes_waiting_for_a_batch_that_is_cancelled_before_it_starts_are_cancelled_not_stranded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A closing loop cancels every task, the batch's sender among them, maybe before its first step."""
    statements = Statements(held=1)
    batch = batcher(statements)
    start_sender = batch._next

    def and_cancel_it_at_once() -> None:
        start_sender()
        for sender in batch._tasks:
            sender.cancel()

    monkeypatch.setattr(batch, "_next", and_cancel_it_at_once)
    first, second = await queued_behind_the_first(statements, batch, 2)
    statements.gates[0].set()
    await asyncio.wait_for(asyncio.wait([first, second]), DEADLINE_S)
    assert first.result() == 10 and second.cancelled()
    monkeypatch.undo()
    assert await asyncio.wait_for(batch(3), DEADLINE_S) == 30  # and the batcher still works
