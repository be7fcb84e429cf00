"""Webhook delivery (worker/webhooks/deliver.py): the outbox, signatures, the retry schedule, the delivery log,
redelivery, rebinding and redirects, a hostile receiver that never holds up a job, and what wakes the delivery loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import os
import random
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trustme
from standardwebhooks import Webhook, WebhookVerificationError

from tests.conftest import ROOT, Processes, bearer, eventually, free_port, process_env
from tests.engine import deliver_due
from tests.receivers import DribblingReceiver, Hooks, Received, Receiver, answer, fail_first
from worker import Config, notify
from worker.sweep import sweep_once
from worker.webhooks.deliver import Schedule, Sender, serving, tenant_secrets

Drain = Callable[[], Awaitable[None]]
HOUR = 3600.0


async def attempts_of(hooks: Hooks, job_id: str) -> list[dict[str, Any]]:
    [delivery] = await hooks.deliveries(job_id)
    attempts: list[dict[str, Any]] = delivery["attempts"]
    return attempts


def verify(secret: str, request: Received) -> dict[str, Any]:
    job: dict[str, Any] = Webhook(secret).verify(request.body, request.headers)
    return job


# -- the outbox -------------------------------------------------------------------------------------


async def test_every_terminal_transition_with_a_callback_writes_one_delivery_and_nothing_else_does(
    hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    url = receiver.url
    retried = await hooks.submit("flaky", {"failures": 1}, max_attempts=2, callback_url=url)  # a retry, then success
    failed = await hooks.submit("refuse", {}, callback_url=url)
    plain = await hooks.submit("square_sum", {"data": [1]})
    late = await hooks.submit("sleep", {"seconds": 0}, callback_url=url)
    await hooks.deps.db.execute(
        "UPDATE jobs SET expires_at = now() - interval '1 second' WHERE id = CAST(:id AS uuid)", {"id": late}
    )
    await sweep_once(hooks.deps)  # the sweep's expiry is another code path that ends a job
    cancelled = await hooks.submit("sleep", {"seconds": 0}, callback_url=url)
    assert (await hooks.client.post(f"/v1/jobs/{cancelled}/cancel")).status_code == 202  # and a cancel another
    await drain()
    rows = await hooks.deps.db.fetch_all("SELECT CAST(job_id AS text) AS job, reason, url FROM webhook_deliveries")
    assert sorted(r["job"] for r in rows) == sorted([retried, failed, late, cancelled])
    assert {(r["reason"], r["url"]) for r in rows} == {("finished", url)}
    assert await hooks.deliveries(plain) == []


async def test_the_outbox_row_commits_or_rolls_back_with_the_transition(hooks: Hooks, receiver: Receiver) -> None:
    job_id = await hooks.submit("square_sum", {"data": [1]}, callback_url=receiver.url)
    end = "UPDATE jobs SET status = 'cancelled', finished_at = now() WHERE id = CAST(:id AS uuid)"
    with pytest.raises(RuntimeError):
        async with hooks.deps.db.transaction():
            await hooks.deps.db.execute(end, {"id": job_id})
            raise RuntimeError("the transaction that ends the job fails")
    assert await hooks.deliveries(job_id) == []
    await hooks.deps.db.execute(end, {"id": job_id})
    assert len(await hooks.deliveries(job_id)) == 1


# -- signatures and retries -------------------------------------------------------------------------


async def test_a_receiver_down_for_k_attempts_gets_it_once_up_and_every_signature_verifies(
    hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    k = 3
    receiver.script = fail_first(k, 503)
    job_id = await hooks.submit("square_sum", {"data": [1, 2]}, callback_url=receiver.url)
    await drain()
    for _ in range(k + 1):
        assert await hooks.deliver() == 1
        await hooks.make_due()
    assert await hooks.deliver() == 0  # delivered: nothing left to do
    [delivery] = await hooks.deliveries(job_id)
    assert delivery["status"] == "delivered" and delivery["next_try_at"] is None
    assert [a["status_code"] for a in delivery["attempts"]] == [503] * k + [204]
    assert [a["n"] for a in delivery["attempts"]] == list(range(1, k + 2))
    assert all(a["finished_at"] and a["latency_ms"] is not None for a in delivery["attempts"])
    assert delivery["attempts"][0]["error"] == "answered 503" and delivery["attempts"][-1]["error"] is None

    assert len(receiver.requests) == k + 1
    secret = await hooks.secret()
    assert secret.startswith("whsec_")
    for request in receiver.requests:
        job = verify(secret, request)  # the Standard Webhooks library itself
        assert job["id"] == job_id and job["status"] == "succeeded" and job["result"] == 5
        assert request.headers["content-type"] == "application/json"
        assert request.headers["host"] == f"127.0.0.1:{receiver.port}"
    assert {r.headers["webhook-id"] for r in receiver.requests} == {delivery["webhook_id"]}  # constant

    last = receiver.requests[-1]
    tampered = [
        Received(last.method, last.path, last.headers, last.body.replace(b'"result":5', b'"result":6')),
        Received(last.method, last.path, last.headers | {"webhook-id": "msg_other"}, last.body),
        Received(
            last.method,
            last.path,
            last.headers | {"webhook-timestamp": str(int(last.headers["webhook-timestamp"]) - 1)},
            last.body,
        ),
    ]
    for request in tampered:
        with pytest.raises(WebhookVerificationError):
            verify(secret, request)
    with pytest.raises(WebhookVerificationError):
        verify("whsec_" + "A" * 43 + "=", last)  # another secret


async def test_rotation_signs_with_both_secrets_during_the_overlap(
    hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    old = await hooks.secret()
    [(new, current), (still, expires)] = await tenant_secrets(hooks.deps.config, "default", rotate=True, overlap_s=HOUR)
    assert still == old and new != old and current is None and expires is not None
    first = await hooks.submit("square_sum", {"data": [1]}, callback_url=receiver.url)
    await drain()
    await hooks.deliver()
    request = receiver.requests[-1]
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert verify(old, request)["id"] == verify(new, request)["id"] == first
    await hooks.deps.db.execute("UPDATE webhook_secrets SET expires_at = now() WHERE expires_at IS NOT NULL")
    await hooks.submit("square_sum", {"data": [2]}, callback_url=receiver.url)
    await drain()
    await hooks.deliver()
    request = receiver.requests[-1]
    assert len(request.headers["webhook-signature"].split(" ")) == 1 and verify(new, request)
    with pytest.raises(WebhookVerificationError):
        verify(old, request)


async def test_a_deployment_wide_secret_signs_for_tenants_without_their_own(
    hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    shared = "whsec_" + "c2hhcmVkIHNlY3JldCBvZiB0aGUgZGVwbG95bWVudCE="
    hooks.deps = dataclasses.replace(
        hooks.deps, config=msgspec.structs.replace(hooks.deps.config, webhook_secret=shared)
    )
    job_id = await hooks.submit("square_sum", {"data": [1]}, callback_url=receiver.url)
    await drain()
    await hooks.deliver()
    assert verify(shared, receiver.requests[-1])["id"] == job_id
    assert await hooks.deps.db.fetch_val("SELECT count(*) FROM webhook_secrets") == 0
    # Rotating gives the tenant its own secret; the shared one keeps signing for it during the overlap.
    [(own, _), (previous, _)] = await tenant_secrets(hooks.deps.config, "default", rotate=True, overlap_s=HOUR)
    assert previous == shared and own != shared


async def test_a_large_result_travels_as_a_link(hooks: Hooks, receiver: Receiver, drain: Drain) -> None:
    hooks.deps = dataclasses.replace(
        hooks.deps, config=msgspec.structs.replace(hooks.deps.config, webhook_max_result_bytes=1)
    )
    job_id = await hooks.submit("square_sum", {"data": [1, 2, 3]}, callback_url=receiver.url)
    await drain()
    await hooks.deliver()
    job = verify(await hooks.secret(), receiver.requests[-1])
    assert job["result"] is None and job["links"]["result"] == f"/v1/jobs/{job_id}/result"
    assert job["result_link"].startswith(f"/v1/jobs/{job_id}/result?token=olt_")  # a receiver needs no API key
    assert (await hooks.client.get(job["result_link"])).json() == 14


async def test_retry_after_is_honoured_and_410_gone_stops_the_retries(
    hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    async def script(request: Received, before: int) -> bytes:
        return [answer(429, {"retry-after": "3600"}), answer(503, {"retry-after": "99999999"}), answer(410)][before]

    receiver.script = script
    job_id = await hooks.submit("square_sum", {"data": [1]}, callback_url=receiver.url)
    await drain()
    waits = []
    for _ in range(3):
        await hooks.deliver()
        waits.append(await hooks.deps.db.fetch_val("SELECT next_try_at - now() FROM webhook_deliveries"))
        await hooks.make_due()
    assert waits[0] >= timedelta(seconds=3599)  # the schedule alone would wait 5 s at most
    assert timedelta(hours=3.9) <= waits[1] <= timedelta(hours=4)  # a hostile Retry-After is capped
    [delivery] = await hooks.deliveries(job_id)
    assert delivery["status"] == "failed" and [a["status_code"] for a in delivery["attempts"]] == [429, 503, 410]
    assert "410" in delivery["attempts"][-1]["error"]
    assert await hooks.deliver() == 0


def test_the_schedule_tries_past_24_hours_then_stops_after_its_last_attempt() -> None:
    for seed in range(200):
        schedule = Schedule(rng=random.Random(seed))
        times, elapsed, attempt = [0.0], 0.0, 1
        while (delay := schedule.next_delay(attempt, elapsed)) is not None:
            assert delay >= schedule.base_s / 2 and delay <= schedule.cap_s
            elapsed += delay
            times.append(elapsed)
            attempt += 1
        assert [t for t in times if t > 25 * HOUR], "attempts continue past 24 h"
        assert times[-1] < 70 * HOUR and schedule.next_delay(attempt, 70 * HOUR) is None
        assert 10 <= len(times) <= 40
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps[:8] == sorted(gaps[:8])  # exponential at first, jittered within each envelope


async def test_the_stored_schedule_run_past_25_and_70_hours(hooks: Hooks, drain: Drain) -> None:
    """Clock injection the database way: move the delivery's start back, keep the database clock."""
    closed = free_port()  # nobody listens there: every attempt is a refused connection
    job_id = await hooks.submit("square_sum", {"data": [1]}, callback_url=f"http://127.0.0.1:{closed}/hooks")
    await drain()

    async def attempt_at(hours: float) -> dict[str, Any]:
        await hooks.deps.db.execute(
            "UPDATE webhook_deliveries SET created_at = now() - make_interval(hours => :h), next_try_at = now()",
            {"h": hours},
        )
        assert await hooks.deliver() == 1
        [delivery] = await hooks.deliveries(job_id)
        return delivery

    first = await attempt_at(0)
    assert first["status"] == "pending" and "ConnectError" in first["attempts"][-1]["error"]
    at_25 = await attempt_at(25)
    assert at_25["status"] == "pending" and datetime.fromisoformat(at_25["next_try_at"]) > datetime.now(UTC)
    at_70 = await attempt_at(70)
    assert at_70["status"] == "failed" and "retry window is over" in at_70["attempts"][-1]["error"]
    assert len(at_70["attempts"]) == 3 and await hooks.deliver() == 0


# -- the HTTP face ----------------------------------------------------------------------------------


async def test_deliveries_list_and_redeliver(hooks: Hooks, receiver: Receiver, drain: Drain) -> None:
    assert (await hooks.client.get(f"/v1/jobs/{'0' * 8}-0000-7000-8000-{'0' * 12}/deliveries")).status_code == 404
    assert (await hooks.client.get("/v1/jobs/nope/deliveries")).status_code == 404
    job_id = await hooks.submit("square_sum", {"data": [3]}, callback_url=receiver.url)
    early = await hooks.client.post(f"/v1/jobs/{job_id}/deliveries/redeliver")
    assert early.status_code == 409 and early.json()["type"] == "/problems/job-not-done"
    plain = await hooks.submit("square_sum", {"data": [3]})
    await drain()
    no_url = await hooks.client.post(f"/v1/jobs/{plain}/deliveries/redeliver")
    assert no_url.status_code == 409 and no_url.json()["type"] == "/problems/conflict"
    await hooks.deliver()

    response = await hooks.client.post(f"/v1/jobs/{job_id}/deliveries/redeliver")
    assert response.status_code == 202 and response.headers["location"] == f"/v1/jobs/{job_id}/deliveries"
    fresh = response.json()
    assert fresh["reason"] == "redeliver" and fresh["status"] == "pending" and fresh["attempts"] == []
    await hooks.deliver()
    first, again = await hooks.deliveries(job_id)
    assert (first["reason"], again["reason"]) == ("finished", "redeliver")
    assert first["status"] == again["status"] == "delivered" and again["id"] == fresh["id"]
    assert len(receiver.requests) == 2
    assert receiver.requests[0].headers["webhook-id"] == receiver.requests[1].headers["webhook-id"]  # the same event
    doc = (await hooks.client.get("/openapi.json")).json()
    assert {"/v1/jobs/{id}/deliveries", "/v1/jobs/{id}/deliveries/redeliver"} <= set(doc["paths"])


async def test_redeliver_coalesces_while_one_is_pending_and_is_rate_limited_per_key(
    hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    """40 calls in a row made 41 deliveries, each retried for 36 h."""
    job_id = await hooks.submit("square_sum", {"data": [3]}, callback_url=receiver.url)
    await drain()
    await hooks.deliver()
    answers = [await hooks.client.post(f"/v1/jobs/{job_id}/deliveries/redeliver") for _ in range(40)]
    statuses = [a.status_code for a in answers]
    assert statuses[:10] == [202] * 10 and set(statuses[10:]) == {429}, statuses
    assert int(answers[-1].headers["retry-after"]) >= 1
    assert len({a.json()["id"] for a in answers[:10]}) == 1  # one redelivery, however often it was asked for
    assert [d["reason"] for d in await hooks.deliveries(job_id)] == ["finished", "redeliver"]
    await hooks.deliver()
    assert len(receiver.requests) == 2


# -- SSRF at delivery: rebinding, redirects, the pinned address -------------------------------------


async def test_a_name_rebound_to_a_forbidden_address_after_submit_is_refused_at_delivery(
    hooks: Hooks, receiver: Receiver, canaries: list[Receiver], drain: Drain, caplog: pytest.LogCaptureFixture
) -> None:
    port = canaries[0].port
    hooks.dns.table["rebind.example.com"] = ["127.0.0.1"]  # allowed at submit
    job_id = await hooks.submit("square_sum", {"data": [1]}, callback_url=f"http://rebind.example.com:{port}/")
    hooks.dns.table["rebind.example.com"] = ["127.0.0.5"]  # forbidden by the time the job ends
    await drain()
    await hooks.deliver()
    [attempt] = await attempts_of(hooks, job_id)
    # The caller is told it is not allowed; how this host resolves the name (its private network) goes to the log.
    assert attempt["error"] == "refused: rebind.example.com resolves to an address that is not allowed", attempt
    assert "rebind.example.com resolves to 127.0.0.5, which is loopback" in caplog.text
    assert attempt["status_code"] is None
    assert [c.connections for c in canaries] == [0, 0, 0, 0] and receiver.connections == 0


async def test_the_checked_address_is_the_one_connected_to_with_the_original_host(
    hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    """No second DNS lookup between the check and the connection: the name exists only in the fake DNS."""
    hooks.dns.table["receiver.example.com"] = ["127.0.0.1"]
    job_id = await hooks.submit(
        "square_sum", {"data": [1]}, callback_url=f"http://receiver.example.com:{receiver.port}/in"
    )
    await drain()
    hooks.dns.lookups.clear()
    await hooks.deliver()
    assert hooks.dns.lookups == ["receiver.example.com"]  # once, by the guard
    [request] = receiver.requests
    assert request.headers["host"] == f"receiver.example.com:{receiver.port}" and request.path == "/in"
    assert (await attempts_of(hooks, job_id))[0]["status_code"] == 204


async def test_a_redirect_to_a_forbidden_address_is_not_followed(
    hooks: Hooks, receiver: Receiver, canaries: list[Receiver], drain: Drain
) -> None:
    async def script(request: Received, before: int) -> bytes:
        return answer(302, {"location": f"http://127.0.0.2:{canaries[0].port}/"})

    receiver.script = script
    job_id = await hooks.submit("square_sum", {"data": [1]}, callback_url=receiver.url)
    await drain()
    await hooks.deliver()
    [delivery] = await hooks.deliveries(job_id)
    assert delivery["status"] == "pending" and delivery["attempts"][0]["status_code"] == 302
    assert "redirects are not followed" in delivery["attempts"][0]["error"]
    assert [c.connections for c in canaries] == [0, 0, 0, 0] and len(receiver.requests) == 1


async def test_https_to_a_pinned_address_keeps_sni_and_certificate_checks_on_the_name(
    hooks: Hooks, drain: Drain
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("hooks.example.com").configure_cert(server_context)
    names: list[str | None] = []
    server_context.sni_callback = lambda sock, name, ctx: names.append(name)
    secure = await Receiver(ssl=server_context).start()
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    sender = Sender(hooks.sender.guard, timeout_s=2.0, verify=client_context)
    try:
        hooks.dns.table["hooks.example.com"] = ["127.0.0.1"]
        hooks.dns.table["other.example.com"] = ["127.0.0.1"]  # same server, but its certificate is not for this name
        good = await hooks.submit("square_sum", {"data": [1]}, callback_url=f"https://hooks.example.com:{secure.port}/")
        bad = await hooks.submit("square_sum", {"data": [1]}, callback_url=f"https://other.example.com:{secure.port}/")
        await drain()
        await deliver_due(hooks.deps, sender)
        assert (await attempts_of(hooks, good))[0]["status_code"] == 204
        [refused] = await attempts_of(hooks, bad)
        assert refused["status_code"] is None and "certificate" in refused["error"].lower()
        assert sorted(n or "" for n in names) == ["hooks.example.com", "other.example.com"]
        assert [r.headers["host"] for r in secure.requests] == [f"hooks.example.com:{secure.port}"]
    finally:
        await sender.aclose()
        await secure.stop()


# -- a hostile receiver never holds up jobs ---------------------------------------------------------


async def test_a_receiver_that_dribbles_forever_is_cut_off_and_never_delays_a_job(hooks: Hooks, drain: Drain) -> None:
    slow = await DribblingReceiver().start()
    try:
        async with notify.hearing(hooks.deps) as ear, serving(hooks.deps, ear, resolver=hooks.dns):  # the worker's loop
            job_id = await hooks.submit("square_sum", {"data": [1]}, callback_url=slow.url)
            await drain()

            async def stuck() -> bool | None:
                return bool(slow.requests) or None

            await eventually(stuck)  # the delivery is in flight, and will not finish on its own
            other = await hooks.submit("square_sum", {"data": [2]})
            await drain()
            assert (await hooks.client.get(f"/v1/jobs/{other}")).json()["status"] == "succeeded"

            async def cut_off() -> dict[str, Any] | None:
                attempts = await attempts_of(hooks, job_id)
                return attempts[0] if attempts and attempts[0]["finished_at"] else None

            attempt = await eventually(cut_off)
        assert attempt["error"] == "no answer within 2 s" and attempt["status_code"] is None
    finally:
        await slow.stop()


# -- what wakes the delivery loop --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def asleep(hooks: Hooks) -> AsyncIterator[None]:
    """The worker's delivery loop, listening, once it sleeps with nothing it knows to be due: unwoken, it would look
    again in notify.IDLE_S."""
    async with notify.hearing(hooks.deps) as ear, serving(hooks.deps, ear, resolver=hooks.dns):

        async def idle() -> bool | None:
            alarms = ear.alarms.get(notify.WEBHOOKS, [])
            return (ear.listening and [a.at for a in alarms] == [math.inf]) or None

        await eventually(idle)
        yield


async def delivered_after(hooks: Hooks, job_id: str, attempts: int) -> None:
    async def done() -> bool | None:
        [delivery] = await hooks.deliveries(job_id) or [{}]
        return (delivery.get("status") == "delivered" and len(delivery["attempts"]) == attempts) or None

    await eventually(done)


async def test_a_job_that_ends_with_a_callback_wakes_the_sleeping_delivery_loop(
    hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    async with asleep(hooks):
        job_id = await hooks.submit("square_sum", {"data": [1]}, callback_url=receiver.url)
        await drain()  # the finish inserts the delivery, and its commit notifies every worker
        await delivered_after(hooks, job_id, attempts=1)


async def test_a_retry_wakes_the_loop_that_booked_it_when_it_is_due(
    hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    receiver.script = fail_first(1, 503)  # the retry is due 2.5 to 5 s later
    async with asleep(hooks):
        job_id = await hooks.submit("square_sum", {"data": [1]}, callback_url=receiver.url)
        await drain()
        await delivered_after(hooks, job_id, attempts=2)


async def test_a_dead_workers_attempt_is_taken_again_when_its_lease_ends(
    hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    job_id = await hooks.submit("square_sum", {"data": [1]})
    await drain()
    # attempt 1 in flight on a worker that died: due again once its lease ends, 3 s from now; no one will say so
    delivery = await hooks.deps.db.fetch_val(
        "INSERT INTO webhook_deliveries (job_id, url, reason, attempts, next_try_at)"
        " VALUES (CAST(:id AS uuid), :url, 'finished', 1, now() + interval '3 seconds') RETURNING id",
        {"id": job_id, "url": receiver.url},
    )
    await hooks.deps.db.execute("INSERT INTO webhook_attempts (delivery_id, n) VALUES (:d, 1)", {"d": delivery})
    # its first claim sees when the lease ends
    async with notify.hearing(hooks.deps) as ear, serving(hooks.deps, ear, resolver=hooks.dns):
        await delivered_after(hooks, job_id, attempts=2)


# -- `outlast webhooks secret` ----------------------------------------------------------------------


async def test_the_cli_shows_and_rotates_a_tenant_secret(hooks: Hooks, config: Config) -> None:
    env = process_env(config)

    async def outlast(*args: str) -> tuple[int, str, str]:
        command = Path(sys.executable).parent / "outlast"
        proc = await asyncio.create_subprocess_exec(
            command, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    code, shown, _ = await outlast("webhooks", "secret", "default")
    assert code == 0 and shown.strip() == await hooks.secret()
    assert (await outlast("webhooks", "secret", "default"))[1] == shown  # shown again, not replaced
    code, rotated, err = await outlast("webhooks", "secret", "default", "--rotate", "--overlap", "60")
    assert code == 0 and rotated.strip() == await hooks.secret() != shown.strip()
    assert shown.strip() in err and "also signing until" in err
    code, _, err = await outlast("webhooks", "secret", "nobody")
    assert code != 0 and "no tenant 'nobody'" in err


@pytest.mark.slow
async def test_real_web_and_worker_processes_deliver_a_signed_webhook(
    hooks: Hooks, receiver: Receiver, config: Config, tmp_path: Path, api_key: str
) -> None:
    env = process_env(
        config,
        OUTLAST_ALLOWED_CALLBACK_NETWORKS="127.0.0.1/32",
        OUTLAST_ALLOW_HTTP_CALLBACKS="true",
        OUTLAST_CALLBACK_PORTS="1024-65535",
        OUTLAST_WEBHOOK_POLL_S="0.1",
    )
    procs = Processes(env, tmp_path)
    procs.start_web()
    procs.start_worker()
    try:
        await procs.ready()
        async with httpx.AsyncClient(base_url=procs.url, headers=bearer(api_key)) as client:
            body = {"type": "square_sum", "input": {"data": [2, 3]}, "callback_url": receiver.url}
            job_id = (await client.post("/v1/jobs", json=body)).json()["id"]

            async def delivered() -> list[dict[str, Any]] | None:
                items: list[dict[str, Any]] = (await client.get(f"/v1/jobs/{job_id}/deliveries")).json()["items"]
                return items if items and items[0]["status"] == "delivered" else None

            [delivery] = await eventually(delivered, within=30)
        job = verify(await hooks.secret(), receiver.requests[0])
        assert job["id"] == job_id and job["result"] == 13 and len(delivery["attempts"]) == 1
    finally:
        procs.stop()


async def test_the_receiver_in_the_docs_verifies_signatures(hooks: Hooks, drain: Drain, tmp_path: Path) -> None:
    text = (ROOT / "docs" / "webhooks.md").read_text()
    code = text.split("## A receiver that verifies signatures", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "receiver.py").write_text(code)
    port = free_port()
    env = {**os.environ, "WEBHOOK_SECRET": await hooks.secret(), "PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "receiver.py", cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        url = f"http://127.0.0.1:{port}/"

        async def listening() -> bool | None:
            try:
                async with httpx.AsyncClient() as client:
                    unsigned = await client.post(url, content=b"{}", headers={"webhook-id": "x"})
            except httpx.TransportError:
                return None
            return unsigned.status_code == 400 or None

        await eventually(listening)  # and an unsigned request is turned away
        job_id = await hooks.submit("square_sum", {"data": [4]}, callback_url=url)
        await drain()
        await hooks.deliver()
        assert [a["status_code"] for a in await attempts_of(hooks, job_id)] == [204]
        assert proc.stdout is not None
        line = (await proc.stdout.readline()).decode().split()
        assert line[1:] == [job_id, "succeeded"] and line[0].startswith("msg_")
    finally:
        proc.terminate()
        await proc.wait()


# -- a workflow's webhook -------------------------------------------------------------------------------


async def test_a_workflow_with_a_callback_url_gets_one_signed_webhook_with_the_final_workflow_when_it_ends(
    hooks: Hooks, receiver: Receiver, drain: Drain
) -> None:
    numbers = {"name": "numbers", "type": "count_up", "input": {"n": 3}}

    async def workflow(*steps: dict[str, Any]) -> dict[str, Any]:
        answer = await hooks.client.post("/v1/workflows", json={"steps": list(steps), "callback_url": receiver.url})
        assert answer.status_code == 202, answer.text
        found: dict[str, Any] = answer.json()
        return found

    good = await workflow(
        numbers, {"name": "squares", "type": "square_item", "map": "numbers", "input": {"of": "numbers"}}
    )
    bad = await workflow(
        numbers, {"name": "squares", "type": "square_item", "map": "numbers", "input": {"of": "numbers", "bad": 1}}
    )
    assert good["callback_url"] == receiver.url
    await drain()
    assert await hooks.deliver() == 2  # one for each workflow's end, none for their steps' jobs
    assert await hooks.deliver() == 0
    secret = await hooks.secret()
    sent = {body["id"]: (body, r) for r in receiver.requests if (body := verify(secret, r))}
    assert set(sent) == {good["id"], bad["id"]}
    body, request = sent[good["id"]]
    assert body["status"] == "succeeded" and body["done"] and body["finished_at"] is not None
    assert {name: step["status"] for name, step in body["steps"].items()} == {
        "numbers": "succeeded",
        "squares": "succeeded",
    }
    assert request.headers["webhook-id"].startswith("msg_")
    failed, _ = sent[bad["id"]]
    assert failed["status"] == "failed" and failed["error"]["step"] == "squares"
    refused = await hooks.client.post(
        "/v1/workflows", json={"steps": [numbers], "callback_url": "http://10.1.2.3:8080/hook"}
    )
    assert refused.status_code == 422 and refused.json()["errors"][0]["loc"] == "$.callback_url", refused.text
