"""The dashboard in-process: sign-in and sessions, CSRF, read-only keys, tenants, not-found, the schema form, bulk
confirmation, open mode. Its live parts and the real browser: tests/test_ui_browser.py."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from uuid import UUID

import httpx
import msgspec
import pytest

from server.app import create_app
from server.ui import session
from tests.conftest import TEST_SECRET, bearer, eventually
from worker import Config, Deps, dashboard, keys, stats
from worker.sweep import fresh_s

Drain = Callable[[], Awaitable[None]]
SQUARES = {"type": "square_sum", "input": {"data": [1, 2, 3]}}
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
async def app_client(config: Config, deps: Deps) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def sign_in(client: httpx.AsyncClient, key: str, target: str = "/ui/") -> httpx.Response:
    return await client.post("/ui/login", data={"key": key, "next": target})


def csrf_of(page: httpx.Response) -> str:
    found = CSRF.search(page.text)
    assert found is not None, "the page has no CSRF token"
    return found[1]


async def signed_in(client: httpx.AsyncClient, deps: Deps, tenant: str = "default", **kwargs: Any) -> str:
    key = await keys.create(deps.db, tenant, "dashboard", **kwargs)
    response = await sign_in(client, key)
    assert response.status_code == 303, response.text
    return key


async def submit(client: httpx.AsyncClient, key: str, body: dict[str, Any] | None = None) -> str:
    response = await client.post("/v1/jobs", json=body or SQUARES, headers=bearer(key))
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


# -- sessions ---------------------------------------------------------------------------------------


async def test_a_page_without_a_session_sends_to_sign_in_with_the_page_it_came_from(
    app_client: httpx.AsyncClient, api_key: str
) -> None:
    response = await app_client.get("/ui/jobs?status=failed")
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?next=/ui/jobs%3Fstatus%3Dfailed"
    signed = await sign_in(app_client, api_key, "/ui/jobs?status=failed")
    assert signed.status_code == 303 and signed.headers["location"] == "/ui/jobs?status=failed"


async def test_sign_in_sets_an_httponly_samesite_strict_cookie_that_holds_no_key(
    app_client: httpx.AsyncClient, api_key: str
) -> None:
    response = await sign_in(app_client, api_key)
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{session.COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain http here; over https it is Secure
    assert api_key not in cookie and api_key.rpartition("_")[2] not in cookie
    assert (await app_client.get("/ui/")).status_code == 200


async def test_sign_in_over_https_sets_a_secure_cookie(config: Config, deps: Deps, api_key: str) -> None:
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://test") as client:
            response = await sign_in(client, api_key)
    assert "Secure" in response.headers["set-cookie"]


async def test_an_unknown_key_is_refused_and_no_cookie_is_set(app_client: httpx.AsyncClient) -> None:
    response = await sign_in(app_client, keys.new_key())
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert "unknown or revoked key" in response.text


async def test_sign_in_never_goes_on_to_another_site(app_client: httpx.AsyncClient, api_key: str) -> None:
    for target in ("https://evil.example/ui", "//evil.example/ui", "/\\evil.example", "/v1/jobs"):
        response = await sign_in(app_client, api_key, target)
        assert response.headers["location"] == "/ui/", target


async def test_an_expired_or_forged_session_is_no_session(
    app_client: httpx.AsyncClient, api_key: str, config: Config
) -> None:
    key_id = keys.key_id(api_key) or ""
    secret = TEST_SECRET.encode()
    expired = session.sign(secret, session.Session(key_id, int(time.time()) - 1, "n"))
    forged = session.sign(b"another secret of at least thirty-two bytes", session.Session(key_id, 2**40, "n"))
    for cookie in (expired, forged, "garbage", expired.replace(".", "x")):
        app_client.cookies.set(session.COOKIE, cookie)
        response = await app_client.get("/ui/jobs")
        assert response.status_code == 303 and response.headers["location"].startswith("/ui/login?next="), cookie
    _ = config


async def test_revoking_the_key_ends_its_session(app_client: httpx.AsyncClient, deps: Deps) -> None:
    key = await signed_in(app_client, deps)
    assert (await app_client.get("/ui/jobs")).status_code == 200
    assert await keys.revoke(deps.db, key)

    async def sent_to_sign_in() -> bool | None:  # within a round trip: the key cache hears the revocation
        return (await app_client.get("/ui/jobs")).status_code == 303 or None

    await eventually(sent_to_sign_in, within=5.0)


async def test_sign_out_ends_the_session(app_client: httpx.AsyncClient, deps: Deps) -> None:
    await signed_in(app_client, deps)
    page = await app_client.get("/ui/")
    response = await app_client.post("/ui/logout", data={"csrf": csrf_of(page)})
    assert response.status_code == 303 and response.headers["location"] == "/ui/login"
    assert 'outlast_session=""' in response.headers["set-cookie"] or "Max-Age=0" in response.headers["set-cookie"]
    assert (await app_client.get("/ui/")).status_code == 303


# -- CSRF, read-only, tenants ------------------------------------------------------------------------


async def test_a_post_without_the_csrf_token_changes_nothing(
    app_client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    key = await signed_in(app_client, deps)
    job_id = await submit(app_client, key, {"type": "sleep", "input": {"seconds": 30}})
    for form in ({}, {"csrf": "forged"}):
        response = await app_client.post(f"/ui/jobs/{job_id}/cancel", data=form)
        assert response.status_code == 403 and "CSRF" in response.text
    response = await app_client.post("/ui/types/sleep", data={"seconds": "1"})
    assert response.status_code == 403
    assert (await app_client.get(f"/v1/jobs/{job_id}", headers=bearer(key))).json()["status"] == "queued"
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 1


async def test_a_post_from_another_origin_is_refused_even_with_the_token(
    app_client: httpx.AsyncClient, deps: Deps
) -> None:
    key = await signed_in(app_client, deps)
    job_id = await submit(app_client, key, {"type": "sleep", "input": {"seconds": 30}})
    token = csrf_of(await app_client.get(f"/ui/jobs/{job_id}"))
    response = await app_client.post(
        f"/ui/jobs/{job_id}/cancel", data={"csrf": token}, headers={"Origin": "https://evil.example"}
    )
    assert response.status_code == 403
    ok = await app_client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": token}, headers={"Origin": "http://test"})
    assert ok.status_code == 303


async def test_a_read_only_key_sees_no_buttons_and_its_posts_get_403(app_client: httpx.AsyncClient, deps: Deps) -> None:
    writer = await keys.create(deps.db, "default")
    job_id = await submit(app_client, writer, {"type": "sleep", "input": {"seconds": 30}})
    await signed_in(app_client, deps, read_only=True)
    for path in (f"/ui/jobs/{job_id}", "/ui/jobs", "/ui/types", "/ui/types/sleep", "/ui/schedules"):
        page = await app_client.get(path)
        assert page.status_code == 200, path
        assert "data-action" not in page.text, path
        assert "read-only" in page.text
    token = csrf_of(await app_client.get("/ui/"))  # the sign-out form's
    for path, form in ((f"/ui/jobs/{job_id}/cancel", {}), ("/ui/types/sleep", {"seconds": "1"})):
        response = await app_client.post(path, data={"csrf": token, **form})
        assert response.status_code == 403 and "read-only" in response.text, path
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 1
    assert await deps.db.fetch_val("SELECT status FROM jobs") == "queued"


async def test_another_tenants_job_is_the_same_not_found_page_as_an_unknown_id(
    app_client: httpx.AsyncClient, deps: Deps
) -> None:
    theirs = await submit(app_client, await keys.create(deps.db, "other"))
    await signed_in(app_client, deps)
    pages = [await app_client.get(f"/ui/jobs/{job}") for job in (theirs, "0193b7c2-5f1e-7c3a-9d2e-8f0a1b2c3d4e")]
    assert [p.status_code for p in pages] == [404, 404]
    assert pages[0].text.replace(theirs, "") == pages[1].text.replace("0193b7c2-5f1e-7c3a-9d2e-8f0a1b2c3d4e", "")
    assert theirs not in (await app_client.get("/ui/jobs")).text
    assert (await app_client.get("/ui/jobs/not-an-id")).status_code == 404
    token = csrf_of(await app_client.get("/ui/"))
    assert (await app_client.post(f"/ui/jobs/{theirs}/cancel", data={"csrf": token})).status_code == 404
    assert await deps.db.fetch_val("SELECT status FROM jobs WHERE tenant_id = 'other'") == "queued"


# -- pages and forms --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ui/", "/ui/jobs", "/ui/types", "/ui/types/sleep", "/ui/schedules", "/ui/workflows"])
async def test_every_page_renders_with_a_content_security_policy(
    app_client: httpx.AsyncClient, deps: Deps, drain: Drain, path: str
) -> None:
    key = await signed_in(app_client, deps)
    await submit(app_client, key, {"type": "explode", "input": {}})
    await submit(app_client, key)
    await drain()
    response = await app_client.get(path)
    assert response.status_code == 200, response.text
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert "cdn" not in response.text.lower() and "https://" not in response.text


async def test_the_form_submits_a_job_of_that_type_and_shows_it(app_client: httpx.AsyncClient, deps: Deps) -> None:
    await signed_in(app_client, deps)
    token = csrf_of(await app_client.get("/ui/types/sleep"))
    response = await app_client.post("/ui/types/sleep", data={"csrf": token, "seconds": "0.5", "steps": "5"})
    assert response.status_code == 303
    job_id = response.headers["location"].removeprefix("/ui/jobs/").partition("?")[0]
    row = await deps.db.fetch_one("SELECT type, input FROM jobs WHERE id = :id", {"id": job_id})
    assert row is not None and row["type"] == "sleep"
    assert msgspec.json.decode(row["input"]) == {"seconds": 0.5, "steps": 5}
    page = await app_client.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200 and "sleep" in page.text and 'data-bar="' in page.text


@pytest.mark.parametrize(
    ("form", "field", "message"),
    [
        ({"seconds": "soon"}, "seconds", "not a number"),
        ({"seconds": "-1"}, "seconds", "&gt;= 0"),
        ({"steps": "1.5"}, "steps", "not an integer"),
    ],
)
async def test_a_form_input_that_fails_the_schema_shows_the_message_next_to_its_field(
    app_client: httpx.AsyncClient, deps: Deps, form: dict[str, str], field: str, message: str
) -> None:
    await signed_in(app_client, deps)
    token = csrf_of(await app_client.get("/ui/types/sleep"))
    response = await app_client.post("/ui/types/sleep", data={"csrf": token, **form})
    assert response.status_code == 422
    found = re.search(rf'data-error-for="{field}">([^<]+)<', response.text)
    assert found is not None and message in found[1], response.text
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 0


async def test_a_required_field_left_empty_is_named_next_to_it(app_client: httpx.AsyncClient, deps: Deps) -> None:
    await signed_in(app_client, deps)
    token = csrf_of(await app_client.get("/ui/types/square_sum"))
    response = await app_client.post("/ui/types/square_sum", data={"csrf": token, "data": ""})
    assert response.status_code == 422
    assert re.search(r'data-error-for="(data|input)">[^<]*data', response.text), response.text


async def test_bad_filters_are_a_422_naming_the_field(app_client: httpx.AsyncClient, deps: Deps) -> None:
    await signed_in(app_client, deps)
    response = await app_client.get("/ui/jobs?status=sleeping&meta=novalue&from=yesterday")
    assert response.status_code == 422
    assert response.text.count('class="field-error"') == 3


async def test_the_jobs_list_filters_by_metadata_and_created_range(app_client: httpx.AsyncClient, deps: Deps) -> None:
    key = await signed_in(app_client, deps)
    acme = await submit(app_client, key, {**SQUARES, "metadata": {"customer": "acme"}})
    other = await submit(app_client, key, {**SQUARES, "metadata": {"customer": "globex"}})
    page = (await app_client.get("/ui/jobs?meta=customer=acme")).text
    assert acme in page and other not in page
    assert acme not in (await app_client.get("/ui/jobs?to=2000-01-01T00:00")).text
    assert acme in (await app_client.get("/ui/jobs?from=2000-01-01T00:00")).text
    for edge in ("from=0001-01-01T00:00", "to=9999-12-31T23:59", "from=1969-12-31T23:59%2B05:00"):
        assert acme in (await app_client.get(f"/ui/jobs?{edge}")).text, edge
    assert (await app_client.get(f"/ui/jobs?q={acme}")).headers["location"] == f"/ui/jobs/{acme}"


async def test_bulk_cancel_confirms_the_count_and_the_cap_then_cancels_that_selection(
    app_client: httpx.AsyncClient, deps: Deps
) -> None:
    key = await signed_in(app_client, deps)
    batch = [await submit(app_client, key, {**SQUARES, "metadata": {"batch": "b1"}}) for _ in range(3)]
    kept = await submit(app_client, key, SQUARES)
    confirm = await app_client.get("/ui/jobs/bulk?action=cancel&meta=batch=b1")
    assert confirm.status_code == 200
    assert re.search(r"<strong data-count>3</strong>", confirm.text)
    assert "At most 10,000 jobs per action" in confirm.text
    response = await app_client.post(
        "/ui/jobs/bulk", data={"csrf": csrf_of(confirm), "action": "cancel", "meta": "batch=b1"}
    )
    assert response.status_code == 303 and "3+jobs+cancelled" in response.headers["location"]
    statuses = {str(r["id"]): r["status"] for r in await deps.db.fetch_all("SELECT id, status FROM jobs")}
    assert [statuses[j] for j in batch] == ["cancelled"] * 3 and statuses[kept] == "queued"


async def test_open_mode_opens_the_dashboard_without_sign_in_and_says_so_on_every_page(
    config: Config, deps: Deps
) -> None:
    app = create_app(msgspec.structs.replace(config, dev_open=True))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for path in ("/ui/", "/ui/jobs", "/ui/types"):
                page = await client.get(path)
                assert page.status_code == 200 and "Open mode" in page.text, path
            await keys.create(deps.db, "default")  # a key closes open mode
            assert (await client.get("/ui/")).status_code == 303


async def test_the_overview_shows_the_counts_and_the_last_hour_of_v1_stats(
    app_client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    key = await signed_in(app_client, deps)
    for body in (SQUARES, SQUARES, {"type": "explode", "input": {}}):
        await submit(app_client, key, body)
    await drain()
    await submit(app_client, key, {"type": "sleep", "input": {"seconds": 30}})  # stays queued
    stats = (await app_client.get("/v1/stats", headers=bearer(key))).json()
    page = (await app_client.get("/ui/")).text
    tiles = dict(
        (label, int(n)) for n, label in re.findall(r'<span class="n"[^>]*>(\d+)</span><span class="label">(\w+)', page)
    )
    assert tiles["queued"] == stats["queued"] == 1
    assert tiles["succeeded"] == stats["last_hour"]["succeeded"] == 2
    assert tiles["failed"] == stats["last_hour"]["failed"] == 1
    assert re.search(r"<strong>33\.3 %</strong> failed", page), "the failure rate is not the last hour's"
    assert page.count('class="fail"') == 1  # one minute had a failure: its red bar


async def test_the_overviews_one_statement_reads_what_v1_stats_reads_and_the_newest_failures(
    app_client: httpx.AsyncClient, deps: Deps, drain: Drain, config: Config
) -> None:
    key = await signed_in(app_client, deps)
    for body in (SQUARES, {"type": "explode", "input": {}}, {"type": "explode", "input": {}}):
        await submit(app_client, key, body)
    await drain()
    await submit(app_client, key, {"type": "sleep", "input": {"seconds": 30}})  # queued: no worker runs now
    await submit(app_client, key, {"type": "flaky", "input": {"failures": 0}, "delay_s": 3600})  # scheduled
    await deps.db.execute("INSERT INTO workers (name, host, pid, slots) VALUES ('w1', 'h', 1, 8)")
    api = msgspec.json.decode((await app_client.get("/v1/stats", headers=bearer(key))).content, type=stats.Stats)
    found = await dashboard.overview(deps.db, "default", fresh_s=fresh_s(config))
    assert found.stats.oldest_queued_age_s is not None and api.oldest_queued_age_s is not None
    assert abs(found.stats.oldest_queued_age_s - api.oldest_queued_age_s) < 60  # read a moment apart
    ages = {"oldest_queued_age_s": 0.0, "oldest_queued_age_s_by_type": {}}
    assert msgspec.structs.replace(found.stats, **ages) == msgspec.structs.replace(api, **ages)
    assert set(found.stats.oldest_queued_age_s_by_type) == {"sleep"}
    assert (api.queued, api.scheduled, api.last_hour["failed"], len(api.workers)) == (1, 1, 2, 1)
    failed = (await app_client.get("/v1/jobs?status=failed", headers=bearer(key))).json()["items"]
    assert [f.id for f in found.failures] == [UUID(job["id"]) for job in failed]  # newest first
    errors = [(f.error.type, f.error.message) if f.error else None for f in found.failures]
    assert errors == [(job["error"]["type"], job["error"]["message"]) for job in failed]
    assert sum(n for _, n, _ in found.minutes) == 3 and sum(f for _, _, f in found.minutes) == 2
