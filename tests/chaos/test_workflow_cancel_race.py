"""Cancelling a workflow while its steps are finishing: a 300-way map of short jobs on two workers, cancelled at a
random moment mid-way, three times over. What must hold: once the cancel has answered, no job of the workflow
starts and none is made (the step after the map never gets one); every job ends, none left running; the
workflow ends `cancelled` and stays so."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.chaos.conftest import Cluster, lifecycle_problems
from tests.conftest import eventually
from worker.job import TERMINAL

pytestmark = pytest.mark.slow

SEED = 16
ITEMS = 300
ROUNDS = 3


def steps() -> list[dict[str, Any]]:
    return [
        {"name": "items", "type": "chaos_items", "input": {"n": ITEMS}},
        {"name": "work", "type": "chaos_item", "map": "items", "input": {"of": "items", "seconds": 0.3}},
        {"name": "join", "type": "chaos_join", "after": ["work"], "input": {"of": "work"}},
    ]


@pytest.mark.timeout(180)
async def test_a_cancel_while_steps_finish_leaves_nothing_running_and_nothing_started_after_it(
    cluster: Cluster, figure: Callable[[str], None]
) -> None:
    rng = random.Random(SEED)
    await cluster.start_supervised("w0", "w1")
    seen = []
    for _ in range(ROUNDS):
        answer = await cluster.http.post("/v1/workflows", json={"steps": steps()})
        assert answer.status_code == 202, answer.text
        workflow_id = answer.json()["id"]
        target = rng.randint(ITEMS // 10, ITEMS // 2)  # some of the map's jobs have finished, many are running

        async def finished_enough(workflow_id: str = workflow_id, target: int = target) -> int | None:
            rows = await cluster.fetch(
                "SELECT count(*) AS n FROM jobs WHERE workflow_id = $1 AND step = 'work' AND status = 'succeeded'",
                workflow_id,
            )
            return rows[0]["n"] if rows[0]["n"] >= target else None

        done_before = await eventually(finished_enough, within=60)
        cancel = await cluster.http.post(f"/v1/workflows/{workflow_id}/cancel")
        answered = time.time()
        assert cancel.status_code == 202, cancel.text
        assert cancel.json()["status"] == "cancelled"

        async def all_ended(workflow_id: str = workflow_id) -> list[Any] | None:
            rows = await cluster.fetch("SELECT * FROM jobs WHERE workflow_id = $1", workflow_id)
            return rows if all(r["status"] in TERMINAL for r in rows) else None

        rows = await eventually(all_ended, within=30)
        late = [r["id"] for r in rows if r["started_at"] is not None and r["started_at"].timestamp() > answered]
        assert not late, f"{len(late)} jobs started after the cancel answered"
        made_after = [r["id"] for r in rows if r["created_at"].timestamp() > answered]
        assert not made_after and not [r for r in rows if r["step"] == "join"]
        final = (await cluster.http.get(f"/v1/workflows/{workflow_id}")).json()
        assert final["status"] == "cancelled" and final["steps"]["join"]["status"] == "cancelled", final
        events = await cluster.events()
        assert not {str(r["id"]): p for r in rows if (p := lifecycle_problems(events[str(r["id"])]))}
        statuses = [r["status"] for r in rows if r["step"] == "work"]
        seen.append((done_before, statuses.count("succeeded"), statuses.count("cancelled")))
        await asyncio.sleep(0)
    figure(
        "3 workflows of a 300-way map cancelled mid-way (succeeded at the cancel, succeeded in the end, cancelled): "
        + "; ".join(f"{a}, {b}, {c}" for a, b, c in seen)
        + "; no job started or made after a cancel answered, none left running, no fan-in made"
    )
