"""docs/from-celery.md's ported seed task (docs/examples/vectors.py) runs as the page says: the seed's own body in,
the seed's answer out, through the API and a worker; a body its schema refuses is a 422 naming the field."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from arq.worker import Worker

from tests.conftest import open_app, run_burst
from worker import Config, Deps, load_job_types
from worker.options import worker_options
from worker.run import Runtime

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


@pytest.fixture
def ported(config: Config) -> Iterator[Config]:
    sys.path.insert(0, str(EXAMPLES))  # as PYTHONPATH=docs/examples does
    try:
        yield msgspec.structs.replace(config, job_modules=f"{config.job_modules},vectors")
    finally:
        sys.path.remove(str(EXAMPLES))


async def test_the_seeds_vector_task_answers_as_it_did_under_celery(ported: Config, deps: Deps, api_key: str) -> None:
    seed_body = {"vector_data": [0.1, 0.2, 0.3], "metadata": {"source": "user"}}
    async with open_app(ported, api_key) as client:
        answer = await client.post("/v1/jobs", json={"type": "index_vectors", "input": seed_body})
        assert answer.status_code == 202, answer.text
        many = await client.post("/v1/jobs", json={"type": "index_vectors", "input": {"vector_data": [[3, 4], [1, 0]]}})
        assert many.status_code == 202, many.text
        refused = await client.post("/v1/jobs", json={"type": "index_vectors", "input": {"vector_data": "oops"}})
        assert refused.status_code == 422 and refused.json()["errors"][0]["loc"].startswith("$.input.vector_data")
        options = worker_options(ported)
        options.update(
            burst=True, handle_signals=False, poll_delay=0.01, on_startup=None, on_shutdown=None,
            ctx={"deps": deps, "runtime": Runtime.of(deps, load_job_types(ported.job_modules))},
        )  # fmt: skip
        await run_burst(Worker(**options))
        done = (await client.get(f"/v1/jobs/{answer.json()['id']}")).json()
        assert done["status"] == "succeeded", done
        assert done["result"] == {
            "processed_vectors": 3,
            "dimensions": 3,
            "status": "indexed",
            "norms": [0.374166],
            "metadata": {"source": "user"},
        }
        assert done["progress"]["message"] == "1 of 1 vectors"
        two = (await client.get(f"/v1/jobs/{many.json()['id']}")).json()
        assert two["result"]["processed_vectors"] == 2 and two["result"]["norms"] == [5.0, 1.0]
