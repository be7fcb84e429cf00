"""API keys, job read tokens and development's open mode: who may call which route (server/auth.py)."""

from __future__ import annotations

import base64
import string
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import msgspec
import pytest
from starlette.routing import Route

from server import keycache
from server.app import create_app
from server.auth import LINK_TOKEN_REUSE_S, TOKEN_ROUTES, AuthState, is_local, setup
from tests.conftest import bearer, eventually, open_app
from worker import Config, Deps, keys

SQUARES = {"type": "square_sum", "input": {"data": [1, 2, 3]}}


def v1_routes() -> list[tuple[str, str]]:
    """Every (method, path) the app serves under /v1, read from the app itself: a route added later is in the matrix
    without an edit here."""
    app = create_app(Config())
    found = []
    for route in app.routes:
        if isinstance(route, Route) and route.path.startswith("/v1"):
            found += [(method, route.path) for method in sorted(route.methods or ()) if method != "HEAD"]
    # Arriving with the events branch: listed so that the matrix covers it from the merge on.
    if ("GET", "/v1/jobs/{id}/events") not in found:
        found.append(("GET", "/v1/jobs/{id}/events"))
    return found


ROUTES = v1_routes()


@pytest.fixture
async def app_client(config: Config, deps: Deps) -> AsyncIterator[httpx.AsyncClient]:
    async with open_app(config) as client:
        yield client


@pytest.fixture
async def job_id(app_client: httpx.AsyncClient, api_key: str, drain: Callable[[], Awaitable[None]]) -> str:
    """A finished job: its event stream is a replay that ends, which an in-process client can read whole."""
    response = await app_client.post("/v1/jobs", json=SQUARES, headers=bearer(api_key))
    assert response.status_code == 202, response.text
    await drain()
    return str(response.json()["id"])


async def call(
    client: httpx.AsyncClient, method: str, path: str, job_id: str, *, headers: dict[str, str], query: str = ""
) -> httpx.Response:
    if path == "/v1/events":  # the tenant feed never ends by itself: a catch-up read does, for a buffering client
        query = "?follow=false" + query.replace("?", "&")
    url = path.replace("{id}", job_id) + query
    body = {"json": SQUARES} if method == "POST" and path == "/v1/jobs" else {}
    return await client.request(method, url, headers=headers, **body)


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "/problems/unauthorized"
    assert response.headers["www-authenticate"].startswith('Bearer realm="outlast"')


# (name, credentials): each is refused with 401 on every /v1 route.
REFUSED: list[tuple[str, Callable[[str, str], tuple[dict[str, str], str]]]] = [
    ("no credentials", lambda key, revoked: ({}, "")),
    ("empty bearer", lambda key, revoked: ({"Authorization": "Bearer "}, "")),
    ("basic scheme", lambda key, revoked: ({"Authorization": "Basic dXNlcjpwYXNz"}, "")),
    ("key under another scheme", lambda key, revoked: ({"Authorization": f"Token {key}"}, "")),
    ("malformed key", lambda key, revoked: (bearer("not-a-key"), "")),
    ("unknown key", lambda key, revoked: (bearer(keys.new_key()), "")),
    ("right id, wrong secret", lambda key, revoked: (bearer(key[:-1] + ("a" if key[-1] != "a" else "b")), "")),
    ("revoked key", lambda key, revoked: (bearer(revoked), "")),
    ("key in ?api_key= beside a valid header", lambda key, revoked: (bearer(key), f"?api_key={key}")),
    ("key in ?access_token=", lambda key, revoked: ({}, f"?access_token={key}")),
    ("key in ?token=", lambda key, revoked: ({}, f"?token={key}")),
    ("key under any query name", lambda key, revoked: ({}, f"?x={key}")),
]


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
async def test_every_v1_route_refuses_each_bad_credential_with_401(
    app_client: httpx.AsyncClient, deps: Deps, api_key: str, job_id: str, method: str, path: str
) -> None:
    revoked = await keys.create(deps.db, "default")
    assert await keys.revoke(deps.db, keys.key_id(revoked) or "")
    for name, credentials in REFUSED:
        headers, query = credentials(api_key, revoked)
        response = await call(app_client, method, path, job_id, headers=headers, query=query)
        assert response.status_code == 401, f"{name}: {response.status_code} {response.text}"
        assert_unauthorized(response)


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
async def test_every_v1_route_answers_a_valid_key(
    app_client: httpx.AsyncClient, api_key: str, job_id: str, method: str, path: str
) -> None:
    response = await call(app_client, method, path, job_id, headers=bearer(api_key))
    assert response.status_code not in (401, 403), response.text
    assert response.status_code < 500


async def test_public_routes_need_no_key(app_client: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert (await app_client.get(path)).status_code == 200, path


async def test_a_key_without_a_bearer_is_told_how_to_send_one(app_client: httpx.AsyncClient) -> None:
    response = await app_client.get("/v1/jobs")
    assert_unauthorized(response)
    assert response.headers["www-authenticate"] == 'Bearer realm="outlast"'  # no error: nothing was presented
    assert "Authorization: Bearer" in response.json()["detail"]
    bad = await app_client.get("/v1/jobs", headers=bearer(keys.new_key()))
    assert 'error="invalid_token"' in bad.headers["www-authenticate"]


async def test_a_keys_last_use_is_recorded(app_client: httpx.AsyncClient, deps: Deps, api_key: str) -> None:
    assert (await app_client.get("/v1/jobs", headers=bearer(api_key))).status_code == 200
    (info,) = [k for k in await keys.list_keys(deps.db, "default") if k.id == keys.key_id(api_key)]
    assert info.last_used_at is not None and info.revoked_at is None


async def test_unknown_and_revoked_keys_get_the_same_answer(app_client: httpx.AsyncClient, deps: Deps) -> None:
    revoked = await keys.create(deps.db, "default")
    await keys.revoke(deps.db, revoked)
    answers = [await app_client.get("/v1/jobs", headers=bearer(k)) for k in (revoked, keys.new_key())]
    assert answers[0].json() == answers[1].json()


async def unauthorized_now(client: httpx.AsyncClient, key: str) -> httpx.Response | None:
    response = await client.get("/v1/jobs", headers=bearer(key))
    return response if response.status_code == 401 else None


async def test_revoking_a_key_it_just_used_shuts_it_out_within_the_notification(
    app_client: httpx.AsyncClient, deps: Deps
) -> None:
    key = await keys.create(deps.db, "default")
    assert (await app_client.get("/v1/jobs", headers=bearer(key))).status_code == 200
    assert await keys.revoke(deps.db, keys.key_id(key) or "")
    assert_unauthorized(await eventually(lambda: unauthorized_now(app_client, key), within=2))
    assert not await keys.revoke(deps.db, keys.key_id(key) or "")  # already revoked


async def test_a_key_revoked_or_deleted_by_plain_sql_is_shut_out_too(app_client: httpx.AsyncClient, deps: Deps) -> None:
    revoked, deleted = await keys.create(deps.db, "default"), await keys.create(deps.db, "default")
    for key in (revoked, deleted):
        assert (await app_client.get("/v1/jobs", headers=bearer(key))).status_code == 200
    await deps.db.execute("UPDATE api_keys SET revoked_at = now() WHERE id = :id", {"id": keys.key_id(revoked)})
    await deps.db.execute("DELETE FROM api_keys WHERE id = :id", {"id": keys.key_id(deleted)})
    for key in (revoked, deleted):
        assert_unauthorized(await eventually(lambda key=key: unauthorized_now(app_client, key), within=2))


async def revoke_unheard(deps: Deps, key: str) -> None:
    """Revoke with triggers off for this transaction (a replica's role): no notification goes out."""
    async with deps.db.transaction():
        await deps.db.execute("SET LOCAL session_replication_role = replica")
        await deps.db.execute("UPDATE api_keys SET revoked_at = now() WHERE id = :id", {"id": keys.key_id(key)})


async def test_a_verified_key_is_answered_from_memory_not_looked_up_again(
    app_client: httpx.AsyncClient, deps: Deps
) -> None:
    key = await keys.create(deps.db, "default")
    assert (await app_client.get("/v1/jobs", headers=bearer(key))).status_code == 200
    await revoke_unheard(deps, key)  # the row says revoked; only a lookup would see it
    assert (await app_client.get("/v1/jobs", headers=bearer(key))).status_code == 200


async def test_losing_the_listening_connection_forgets_every_key(app_client: httpx.AsyncClient, deps: Deps) -> None:
    key = await keys.create(deps.db, "default")
    assert (await app_client.get("/v1/jobs", headers=bearer(key))).status_code == 200
    await revoke_unheard(deps, key)
    terminated = await deps.db.fetch_val(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :name",
        {"name": keycache.LISTENER},
    )
    assert terminated == 1
    # A change made while nobody listened can't be heard later: the cache must not outlive the connection.
    assert_unauthorized(await eventually(lambda: unauthorized_now(app_client, key), within=2))


# -- job read tokens ---------------------------------------------------------------------------------


def token_of(job: dict[str, Any]) -> str:
    return str(job["links"]["events"]).partition("?token=")[2]


async def test_links_carry_a_read_token_for_that_job_only(app_client: httpx.AsyncClient, api_key: str) -> None:
    job = (await app_client.post("/v1/jobs", json=SQUARES, headers=bearer(api_key))).json()
    token = token_of(job)
    assert token.startswith("olt_")
    assert job["links"]["self"] == f"/v1/jobs/{job['id']}?token={token}"
    assert job["links"]["events"] == f"/v1/jobs/{job['id']}/events?token={token}"
    assert job["links"]["result"] == f"/v1/jobs/{job['id']}/result?token={token}"  # what it made, too
    followed = await app_client.get(job["links"]["self"])  # no API key: the token alone
    assert followed.status_code == 200 and followed.json()["id"] == job["id"]
    # A token holder gets no fresh token: reading the job does not stretch its 15 minutes.
    assert followed.json()["links"]["self"] == f"/v1/jobs/{job['id']}"


def test_a_jobs_link_token_is_minted_again_at_most_once_a_minute(config: Config) -> None:
    guard = AuthState(config, config.secret_key.encode(), may_run_open=False)
    job, other = uuid.uuid4(), uuid.uuid4()
    first = guard.link_token("default", job)
    assert guard.link_token("default", job) == first  # a poller's next read: no new signature
    assert guard.read_token(first)[:2] == ("default", job)  # type: ignore[index]
    assert guard.link_token("default", other) != first and guard.link_token("acme", job) != first
    guard._link_tokens[("default", job)] = ("minted a minute ago", time.monotonic() - LINK_TOKEN_REUSE_S)
    assert guard.read_token(guard.link_token("default", job))[:2] == ("default", job)  # type: ignore[index]
    guard.LINK_TOKENS = 50
    for _ in range(500):  # a burst of submits: each new job gets a token, and the memory stays bounded
        guard.link_token("default", uuid.uuid4())
        assert len(guard._link_tokens) <= 50


async def test_a_read_token_opens_nothing_but_reading_its_job(
    app_client: httpx.AsyncClient, api_key: str, job_id: str
) -> None:
    other = (await app_client.post("/v1/jobs", json=SQUARES, headers=bearer(api_key))).json()["id"]
    shown = (await app_client.get(f"/v1/jobs/{job_id}", headers=bearer(api_key))).json()
    token = token_of(shown)
    refused = [
        ("GET", f"/v1/jobs/{other}"),  # another job
        ("GET", f"/v1/jobs/{job_id}/deliveries"),  # not a token route
        ("POST", f"/v1/jobs/{job_id}/cancel"),  # writes
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/job-types"),
    ]
    for method, path in refused:
        assert_unauthorized(await app_client.request(method, f"{path}?token={token}"))


async def test_an_expired_or_tampered_token_is_401(
    app_client: httpx.AsyncClient, config: Config, api_key: str, job_id: str
) -> None:
    guard = AuthState(config, config.secret_key.encode(), may_run_open=False)
    good = guard.token("default", uuid.UUID(job_id))
    assert (await app_client.get(f"/v1/jobs/{job_id}?token={good}")).status_code == 200
    expired = guard.token("default", uuid.UUID(job_id), ttl_s=-1)
    foreign = AuthState(config, b"another-deployment-secret-0123456789", may_run_open=False).token(
        "default", uuid.UUID(job_id)
    )
    body, _, mac = good.partition(".")
    tampered = [
        body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + mac,  # another payload, the old signature
        body + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"),
        good + "x",
        "olt_",
        "olt_.",
        "olt_%%%.@@@",
    ]
    for token in [expired, foreign, *tampered]:
        assert_unauthorized(await app_client.get(f"/v1/jobs/{job_id}", params={"token": token}))
    # Another tenant's name in a valid signature would be a forgery; a token for a tenant only reads that tenant.
    other_tenant = guard.token("acme", uuid.UUID(job_id))
    response = await app_client.get(f"/v1/jobs/{job_id}?token={other_tenant}")
    assert response.status_code == 404


async def test_a_token_spelled_any_other_way_than_it_was_minted_is_401(
    app_client: httpx.AsyncClient, config: Config, api_key: str, job_id: str
) -> None:
    """base64 that decodes to the same bytes (padding, unused low bits, characters the decoder skips) made one token
    into many strings that were all as good: not forgeable, but malleable."""
    good = AuthState(config, config.secret_key.encode(), may_run_open=False).token("default", uuid.UUID(job_id))
    assert (await app_client.get(f"/v1/jobs/{job_id}", params={"token": good})).status_code == 200
    body, _, mac = good.partition(".")
    alphabet = string.ascii_letters + string.digits + "-_"

    def decoded(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    same_bytes = next(c for c in alphabet if c != mac[-1] and decoded(mac[:-1] + c) == decoded(mac))
    variants = [
        f"{body}==.{mac}",  # padded
        f"{body}.{mac[:-1]}{same_bytes}",  # the last character's unused bits set
        f"{body}.{mac[:10]}!{mac[10:]}",  # a character the lenient decoder drops
        f"{body}.{mac.replace('-', '+').replace('_', '/')}",  # the standard alphabet
    ]
    for token in {v for v in variants if v != good}:
        assert_unauthorized(await app_client.get(f"/v1/jobs/{job_id}", params={"token": token}))


def test_a_link_token_is_never_reused_past_a_quarter_of_its_life(config: Config) -> None:
    """Reused for a minute whatever OUTLAST_TOKEN_TTL_S said, a fresh Job could carry a token that had expired."""
    guard = AuthState(msgspec.structs.replace(config, token_ttl_s=8), config.secret_key.encode(), may_run_open=False)
    job = uuid.uuid4()
    first = guard.link_token("default", job)
    assert guard.link_token("default", job) == first
    minted_before = guard.token("default", job, ttl_s=6)  # as minted a quarter of 8 s ago
    guard._link_tokens[("default", job)] = (minted_before, time.monotonic() - 2.0)
    renewed = guard.read_token(guard.link_token("default", job))
    assert renewed is not None and renewed.expires_at >= time.time() + 7


def test_token_routes_are_the_jobs_read_routes_only() -> None:
    job = str(uuid.uuid4())
    assert [bool(r.fullmatch(f"/v1/jobs/{job}")) for r in TOKEN_ROUTES] == [True, False, False]
    assert [bool(r.fullmatch(f"/v1/jobs/{job}/events")) for r in TOKEN_ROUTES] == [False, True, False]
    assert [bool(r.fullmatch(f"/v1/jobs/{job}/result")) for r in TOKEN_ROUTES] == [False, False, True]
    for path in (f"/v1/jobs/{job}/cancel", "/v1/jobs", f"/v1/jobs/{job}/deliveries", f"/v1/jobs/{job}/retry"):
        assert not any(r.fullmatch(path) for r in TOKEN_ROUTES), path


async def test_a_read_token_fetches_the_result_its_job_made(
    app_client: httpx.AsyncClient, api_key: str, deps: Deps, drain: Callable[[], Awaitable[None]]
) -> None:
    """A browser that followed a job with its links could not fetch what the job made: /result refused the token."""
    job = (await app_client.post("/v1/jobs", json=SQUARES, headers=bearer(api_key))).json()
    await drain()
    answer = await app_client.get(job["links"]["result"])  # no API key: the link alone
    assert answer.status_code == 200 and answer.json() == 14


# -- development's open mode --------------------------------------------------------------------------


def test_only_a_database_on_this_machine_may_run_open() -> None:
    for url in ("postgresql://postgres@127.0.0.1:54329/outlast", "postgresql://localhost/x", "postgresql:///x"):
        assert is_local(url), url
    for url in ("postgres://u:p@db.example.com:5432/d", "postgresql://10.0.0.5/x", "postgresql://[2001:db8::1]/x"):
        assert not is_local(url), url


async def test_dev_mode_runs_open_until_a_key_exists_and_says_so(
    config: Config, deps: Deps, caplog: pytest.LogCaptureFixture
) -> None:
    dev = msgspec.structs.replace(config, dev_open=True, secret_key="")
    async with open_app(dev) as client:
        assert "OUTLAST IS RUNNING OPEN" in caplog.text
        assert (await client.post("/v1/jobs", json=SQUARES)).status_code == 202
        assert (await client.get("/v1/jobs")).status_code == 200
        key = await keys.create(deps.db, "default")  # the first key closes it, without a restart
        assert_unauthorized(await client.get("/v1/jobs"))
        assert (await client.get("/v1/jobs", headers=bearer(key))).status_code == 200


async def test_production_never_runs_open(config: Config, deps: Deps) -> None:
    # The flag with a database that is not on this machine is ignored (and logged).
    remote = msgspec.structs.replace(config, dev_open=True, database_url="postgresql://db.example.com/outlast")
    assert not (await setup(remote, deps.db)).may_run_open
    # Without the flag, no key means no access at all.
    async with open_app(config) as client:
        assert_unauthorized(await client.get("/v1/jobs"))


async def test_without_a_secret_key_the_web_refuses_to_start_unless_open(config: Config, deps: Deps) -> None:
    with pytest.raises(RuntimeError, match="OUTLAST_SECRET_KEY"):
        await setup(msgspec.structs.replace(config, secret_key=""), deps.db)
    with pytest.raises(RuntimeError, match="too short"):
        await setup(msgspec.structs.replace(config, secret_key="short"), deps.db)
