"""No key, token or secret reaches a log line: a whole flow through real web and worker processes, every line read.

uvicorn's access log wrote every read token in full (a Job's links carry one in the query string), so whoever
read the log could follow any job. Here every credential a flow handles is sought in everything both processes
wrote, from start to shutdown.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from tests.conftest import Processes, eventually, running
from tests.receivers import Receiver
from worker import Config, Deps
from worker.webhooks.deliver import secrets_in_force

pytestmark = pytest.mark.slow


@pytest.fixture
async def deployment(hooks_config: Config, deps: Deps, api_key: str, tmp_path: Path) -> AsyncIterator[Processes]:
    """Web and worker processes that may deliver webhooks to the test's receiver on 127.0.0.1."""
    async with running(hooks_config, api_key, tmp_path) as procs:
        yield procs


def delivered(receiver: Receiver, count: int) -> Callable[[], Awaitable[bool | None]]:
    async def check() -> bool | None:
        return len(receiver.requests) >= count or None

    return check


async def test_no_key_token_or_secret_reaches_any_log_line_in_a_full_flow(
    deployment: Processes, receiver: Receiver, deps: Deps, hooks_config: Config
) -> None:
    key = deployment.headers["Authorization"].removeprefix("Bearer ")
    receivers_own = secrets.token_urlsafe(16)  # a receiver that authenticates Outlast by a secret in its URL
    async with deployment.client() as client, httpx.AsyncClient(base_url=deployment.url) as browser:
        body = {
            "type": "sleep",
            "input": {"seconds": 0.4, "steps": 2},
            "callback_url": f"{receiver.url}?s={receivers_own}",
        }
        submitted = await client.post("/v1/jobs", json=body)
        assert submitted.status_code == 202, submitted.text
        job_id, links = submitted.json()["id"], submitted.json()["links"]
        token = links["self"].partition("?token=")[2]
        # What a browser does with the links alone: a long poll, the stream to its end, the result.
        assert (await browser.get(links["self"], headers={"Prefer": "wait=30"})).json()["done"]
        async with browser.stream("GET", links["events"]) as stream:
            assert stream.status_code == 200
            await stream.aread()
        assert (await browser.get(links["result"])).json() == {"slept_s": 0.4, "steps": 2}
        await eventually(delivered(receiver, 1))
        assert (await client.post(f"/v1/jobs/{job_id}/deliveries/redeliver")).status_code == 202
        await eventually(delivered(receiver, 2))
        # Credentials where they don't belong: refused, and logged all the same.
        refused = {**body, "callback_url": f"http://127.0.0.1:22/hooks?s={receivers_own}"}  # a port not allowed
        assert (await client.post("/v1/jobs", json=refused)).status_code == 422
        assert (await browser.get(f"/v1/jobs?api_key={key}")).status_code == 401
        assert (await browser.post(f"/v1/jobs/{job_id}/cancel?token={token}")).status_code == 401
        assert (await browser.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"})).status_code == 401
    signing = (await secrets_in_force(deps.db, "default"))[0][0]  # made by the worker for its first delivery
    for request in receiver.requests:
        Webhook(signing).verify(request.body, request.headers)  # this secret is the one in use
    deployment.stop()  # its shutdown's lines too
    lines = (deployment.log("web") + deployment.log("worker")).splitlines()
    assert any(f"/v1/jobs/{job_id}/result?token=[redacted]" in line for line in lines)  # the access log is there
    credentials = {
        "the API key": key,
        "the API key's secret part": key.rpartition("_")[2],
        "the job's read token": token,
        "the read token's signature": token.rpartition(".")[2],
        "the webhook signing secret": signing,
        "the webhook secret's key": signing.removeprefix("whsec_"),
        "the receiver's own secret": receivers_own,
        "the secret that signs read tokens": hooks_config.secret_key,
    }
    for name, value in credentials.items():
        leaks = [line for line in lines if value in line]
        assert not leaks, f"{name} is in the log: {leaks[:3]}"
