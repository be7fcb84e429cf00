"""A parent that SIGKILLs its worker right after spawning its children: rescued and run again, it spawns under the
same keys and gets the same children back, waits for them without holding a slot, and ends with every one."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.chaos.conftest import Cluster, lifecycle_problems
from tests.conftest import eventually

pytestmark = pytest.mark.slow

CHILDREN = 20


@pytest.mark.timeout(120)
async def test_a_parent_killed_after_spawning_is_retried_without_duplicating_its_children(
    cluster: Cluster, figure: Callable[[str], None]
) -> None:
    await cluster.start_supervised("w0", "w1")
    started = time.monotonic()
    parent = await cluster.submit("chaos_spawner", {"n": CHILDREN}, max_attempts=3)

    async def parent_done() -> dict[str, Any] | None:
        row = (await cluster.rows([parent]))[parent]
        return row if row["status"] in ("succeeded", "failed", "cancelled", "expired") else None

    row = await eventually(parent_done, within=90)
    elapsed = time.monotonic() - started
    assert row["status"] == "succeeded", await cluster.describe(row)
    assert row["result"] == {"n": CHILDREN, "statuses": ["succeeded"]}
    children = [r for r in (await cluster.rows()).values() if r["parent_id"] is not None]
    assert len(children) == CHILDREN  # the second attempt's spawns found the first one's children
    assert sorted(r["spawn_key"] for r in children) == sorted(f"child-{i}" for i in range(CHILDREN))
    assert {r["status"] for r in children} == {"succeeded"}
    assert [e.code for e in cluster.exits] == [-9], cluster.exits  # the parent's first attempt, and only it, killed
    # attempt 1 killed, attempt 2 spawned again and waited (not counted), attempt 3 ran with the children's outcomes
    assert row["attempt"] == 3 and row["waits"] == 1, row
    attempts = await cluster.attempts()
    assert [a["attempt"] for a in attempts[parent]] == [1, 2, 3]
    events = await cluster.events()
    assert not {i: p for i in [parent, *map(str, (r["id"] for r in children))] if (p := lifecycle_problems(events[i]))}
    figure(
        f"the parent spawned {CHILDREN} children and SIGKILLed its worker; rescued, its attempt 2 spawned the same "
        f"{CHILDREN} keys and got the same {CHILDREN} children (no duplicate), waited, and attempt 3 succeeded with "
        f"all {CHILDREN}; {elapsed:.1f}s"
    )
