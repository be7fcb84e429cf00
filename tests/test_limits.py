"""Rate limits and request limits (server/limits.py, server/body.py): 429 with Retry-After, 408 for a slow body,
and a table of hostile requests against a real web process, whose memory must stay bounded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from server.app import create_app
from server.limits import Budget, StreamSlot
from server.problems import RateLimited
from tests.conftest import Processes, bearer, eventually, process_env, rss_kib
from tests.engine import stream_slot
from worker import Config, Deps, keys

SQUARES = {"type": "square_sum", "input": {"data": [1]}}


@contextlib.asynccontextmanager
async def app_with(config: Config, **changes: object) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(msgspec.structs.replace(config, **changes))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def assert_rate_limited(response: httpx.Response) -> int:
    assert response.status_code == 429, response.text
    assert response.json()["type"] == "/problems/rate-limited"
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


async def test_submits_past_a_keys_burst_get_429_with_retry_after_and_other_keys_are_unaffected(
    config: Config, deps: Deps, api_key: str
) -> None:
    other = await keys.create(deps.db, "default")
    async with app_with(config, submit_rate_per_s=0.5, submit_burst=3) as client:
        for _ in range(3):
            assert (await client.post("/v1/jobs", json=SQUARES, headers=bearer(api_key))).status_code == 202
        refused = await client.post("/v1/jobs", json=SQUARES, headers=bearer(api_key))
        assert assert_rate_limited(refused) == 2  # one token at 0.5/s
        assert (await client.post("/v1/jobs", json=SQUARES, headers=bearer(other))).status_code == 202
        assert (await client.get("/v1/jobs", headers=bearer(api_key))).status_code == 200  # reads are not submits
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 4


async def test_concurrent_submits_of_a_fresh_key_get_its_whole_burst_and_not_one_more(
    config: Config, deps: Deps, api_key: str
) -> None:
    """Concurrent submits that found no held token each drew from Redis, and each answer overwrote the last: 50
    at once got 429 from about the tenth on."""
    async with app_with(config, submit_rate_per_s=0.001, submit_burst=100) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/jobs", json=SQUARES, headers=bearer(api_key)) for _ in range(100))
        )
        assert [r.status_code for r in answers] == [202] * 100
        assert_rate_limited(await client.post("/v1/jobs", json=SQUARES, headers=bearer(api_key)))
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 100


async def test_concurrent_takes_share_one_draw_and_are_refused_together_once_the_bucket_is_empty(
    redis: Redis, deps: Deps
) -> None:
    budget = Budget()
    outcomes = await asyncio.gather(
        *(budget.take(redis, "k", rate=0.001, burst=30) for _ in range(50)), return_exceptions=True
    )
    assert outcomes.count(None) == 30
    assert all(isinstance(o, RateLimited) for o in outcomes if o is not None)


async def test_the_bucket_refills_at_the_rate(redis: Redis, deps: Deps) -> None:
    budget = Budget()
    for _ in range(2):
        await budget.take(redis, "k", rate=20.0, burst=2)
    with pytest.raises(RateLimited):
        await budget.take(redis, "k", rate=20.0, burst=2)
    await asyncio.sleep(0.06)  # one token at 20/s is 50 ms
    await budget.take(redis, "k", rate=20.0, burst=2)


async def test_repeated_auth_failures_from_one_address_get_429_but_a_valid_key_from_it_is_served(
    config: Config, deps: Deps, api_key: str
) -> None:
    async with app_with(config, auth_failures_per_min=3) as client:
        for _ in range(3):
            assert (await client.get("/v1/jobs", headers=bearer(keys.new_key()))).status_code == 401
        assert assert_rate_limited(await client.get("/v1/jobs", headers=bearer(keys.new_key()))) <= 60
        assert_rate_limited(await client.get("/v1/jobs?token=olt_forged.forged"))  # bad read tokens count too
        # What others sent from this address (everyone behind one NAT) never locks a valid key out.
        assert (await client.get("/v1/jobs", headers=bearer(api_key))).status_code == 200
        assert (await client.get("/healthz")).status_code == 200  # only /v1 is guarded
    # Another address is not affected: the count is per client.
    app = create_app(msgspec.structs.replace(config, auth_failures_per_min=3))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as elsewhere:
            assert (await elsewhere.get("/v1/jobs", headers=bearer(keys.new_key()))).status_code == 401


async def test_requests_without_credentials_never_count_as_failures(config: Config, deps: Deps) -> None:
    """31 requests without any credentials used to lock the address out, and every valid key holder behind it."""
    async with app_with(config, auth_failures_per_min=3) as client:
        for _ in range(10):
            assert (await client.get("/v1/jobs")).status_code == 401
        assert (await client.get("/v1/jobs", headers=bearer(keys.new_key()))).status_code == 401  # 1 of 3


async def test_x_forwarded_for_is_ignored_unless_proxies_are_trusted(config: Config, deps: Deps) -> None:
    """A client rotating X-Forwarded-For sent 600 bad keys without a 429 (and spoofing another's address could lock
    that one out)."""
    async with app_with(config, auth_failures_per_min=3) as client:
        for n in range(3):
            spoofed = {"x-forwarded-for": f"198.51.100.{n}", **bearer(keys.new_key())}
            assert (await client.get("/v1/jobs", headers=spoofed)).status_code == 401
        spoofed = {"x-forwarded-for": "198.51.100.99", **bearer(keys.new_key())}
        assert_rate_limited(await client.get("/v1/jobs", headers=spoofed))


async def test_behind_one_trusted_proxy_the_address_it_appended_is_the_one_counted(config: Config, deps: Deps) -> None:
    async with app_with(config, auth_failures_per_min=3, trusted_proxy_hops=1) as client:
        for n in range(3):  # what the client wrote itself (left of the proxy's entry) changes nothing
            forwarded = {"x-forwarded-for": f"10.9.9.{n}, 203.0.113.5", **bearer(keys.new_key())}
            assert (await client.get("/v1/jobs", headers=forwarded)).status_code == 401
        forwarded = {"x-forwarded-for": "203.0.113.5", **bearer(keys.new_key())}
        assert_rate_limited(await client.get("/v1/jobs", headers=forwarded))
        other = {"x-forwarded-for": "203.0.113.5, 203.0.113.6", **bearer(keys.new_key())}  # another real client
        assert (await client.get("/v1/jobs", headers=other)).status_code == 401


async def test_the_failure_count_is_shared_by_web_processes(config: Config, deps: Deps) -> None:
    async with app_with(config, auth_failures_per_min=4) as one, app_with(config, auth_failures_per_min=4) as two:
        for client in (one, two, one, two):
            assert (await client.get("/v1/jobs", headers=bearer(keys.new_key()))).status_code == 401
        assert_rate_limited(await two.get("/v1/jobs", headers=bearer(keys.new_key())))


async def test_stream_slots_cap_open_streams_per_key_and_come_back_on_exit(redis: Redis, deps: Deps) -> None:
    async with stream_slot(redis, "k", limit=2, retry_after=5), stream_slot(redis, "k", limit=2, retry_after=5):
        with pytest.raises(RateLimited) as refused:
            async with stream_slot(redis, "k", limit=2, retry_after=5):
                pass
        assert refused.value.headers["Retry-After"] == "5" and refused.value.status == 429
        async with stream_slot(redis, "other-key", limit=2, retry_after=5):
            pass
    async with stream_slot(redis, "k", limit=2, retry_after=5), stream_slot(redis, "k", limit=2, retry_after=5):
        pass


async def test_a_dead_processs_stream_slots_expire_with_their_lease(redis: Redis, deps: Deps) -> None:
    await redis.zadd("outlast:streams:k", {"held-by-a-process-that-died": 1})  # a lease that ended long ago
    async with stream_slot(redis, "k", limit=1, retry_after=5):
        assert await redis.zcard("outlast:streams:k") == 1


async def lease_end_ms(redis: Redis, key: str = "k") -> float:
    """The lease end of the one slot `key` holds, in Redis time (ms)."""
    [(_, end)] = await redis.zrange(f"outlast:streams:{key}", 0, -1, withscores=True)
    return float(end)


async def redis_now_ms(redis: Redis) -> float:
    seconds, micros = await redis.time()
    return seconds * 1000 + micros / 1000


async def test_a_held_slot_is_renewed_past_its_lease(redis: Redis, deps: Deps) -> None:
    async with stream_slot(redis, "k", limit=1, retry_after=5, lease_s=0.3):
        first = await lease_end_ms(redis)

        async def first_lease_over() -> bool | None:
            return await redis_now_ms(redis) > first or None

        await eventually(first_lease_over)
        assert await lease_end_ms(redis) > first  # renewed in the background, so still held
        with pytest.raises(RateLimited):
            async with stream_slot(redis, "k", limit=1, retry_after=5, lease_s=0.3):
                pass


async def test_a_slot_taken_before_streaming_is_renewed_by_its_stream_or_lapses(redis: Redis, deps: Deps) -> None:
    """The pattern for a streaming response: take in the handler, renew with each keep-alive, release at the end."""
    slot = await StreamSlot.take(redis, "k", limit=1, retry_after=5, lease_s=30)
    taken = await lease_end_ms(redis)
    await slot.renew()
    assert await lease_end_ms(redis) >= taken  # the lease now runs from the renewal
    with pytest.raises(RateLimited):
        await StreamSlot.take(redis, "k", limit=1, retry_after=5)
    await slot.release()
    again = await StreamSlot.take(redis, "k", limit=1, retry_after=5, lease_s=0.3)
    lapses = await lease_end_ms(redis)

    async def lapsed() -> bool | None:  # a stream that never ran: nobody renews it
        return await redis_now_ms(redis) > lapses or None

    await eventually(lapsed)
    await (await StreamSlot.take(redis, "k", limit=1, retry_after=5)).release()  # the slot came back
    await again.release()


async def test_limits_fail_open_when_redis_is_down(deps: Deps) -> None:
    down = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        await Budget().take(down, "k", rate=1.0, burst=1)
        await Budget().take(down, "k", rate=1.0, burst=1)
        async with stream_slot(down, "k", limit=1, retry_after=5), stream_slot(down, "k", limit=1, retry_after=5):
            pass
    finally:
        await down.aclose()


async def test_a_body_that_does_not_arrive_in_time_is_408(config: Config, deps: Deps, api_key: str) -> None:
    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"type": "square_sum", '
        await asyncio.sleep(5)
        yield b'"input": {"data": [1]}}'

    async with app_with(config, body_timeout_s=0.3) as client:
        response = await client.post("/v1/jobs", content=trickle(), headers=bearer(api_key))
    assert response.status_code == 408, response.text
    assert response.json()["type"] == "/problems/request-timeout" and response.headers["connection"] == "close"
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 0


# -- a real web process: the resource-limit table, and its memory ----------------------------------------------


async def raw_request(port: int, head: bytes, parts: list[bytes | float]) -> int:
    """Send a hand-made request (a float in `parts` is a pause) and return the status of the first answer, which
    may come before the request is complete: it is read while the request is still being written."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):  # the server may answer, and close, before we are done
            writer.write(head)
            for part in parts:
                if isinstance(part, float):
                    await asyncio.sleep(part)
                else:
                    writer.write(part)
                    await writer.drain()

    answer = asyncio.ensure_future(reader.readline())
    sending = asyncio.create_task(send())
    try:
        status_line = await asyncio.wait_for(answer, 15)
        return int(status_line.split()[1]) if status_line else 0
    finally:
        sending.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await sending
            await writer.wait_closed()


class Case(NamedTuple):
    name: str
    parts: list[bytes | float]  # the body, in writes; a float is a pause
    status: int
    length: int | None = -1  # Content-Length: -1 the true one, None chunked


MIB = 1_048_576
GOOD = b'{"type": "square_sum", "input": {"data": [1, 2, 3]}}'
DEEP_METADATA = b'{"type": "sleep", "metadata": {"a": ' + b"[" * 60 + b"]" * 60 + b"}}"
# Against a web process with OUTLAST_BODY_TIMEOUT_S=1.
LIMIT_TABLE = [
    Case("oversized, with its length", [b"[" * (2 * MIB)], 413),
    Case("oversized, chunked without a length", [b"[" * MIB, b"[" * MIB], 413, None),
    Case(
        "nested past any parser",
        [b'{"type": "sleep", "metadata": {"a": ' + b"[" * 400_000 + b"]" * 400_000 + b"}}"],
        400,
    ),
    Case("metadata nested too deep", [DEEP_METADATA], 422),
    Case(
        "an input array longer than its type allows",
        [b'{"type": "square_sum", "input": {"data": [' + b"1," * 100_000 + b"1]}}"],
        422,
    ),
    Case("a length larger than the body", [GOOD], 408, 1000),
    Case("a length smaller than the body", [GOOD], 400, 20),
    Case("a body that trickles in", [x for b in GOOD for x in (bytes([b]), 0.2)], 408),
    Case("headers, then nothing", [], 408, 100),
]


def request_bytes(key: str, case: Case) -> tuple[bytes, list[bytes | float]]:
    body = [p for p in case.parts if isinstance(p, bytes)]
    if case.length is None:
        framing = "Transfer-Encoding: chunked"
        parts: list[bytes | float] = [b"%x\r\n%s\r\n" % (len(p), p) for p in body] + [b"0\r\n\r\n"]
    else:
        framing = f"Content-Length: {sum(map(len, body)) if case.length == -1 else case.length}"
        parts = case.parts
    head = f"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n{framing}\r\n\r\n"
    return head.encode(), parts


@pytest.mark.slow
async def test_the_limit_table_answers_4xx_never_5xx_and_the_web_processs_memory_stays_bounded(
    config: Config, deps: Deps, api_key: str, tmp_path: Path
) -> None:
    procs = Processes(process_env(config, OUTLAST_BODY_TIMEOUT_S="1"), tmp_path, api_key)
    procs.start_web()
    try:
        await procs.ready()
        assert procs.web is not None
        port = procs.port
        assert await raw_request(port, *request_bytes(api_key, Case("warm-up", [GOOD], 202))) == 202
        before = rss_kib(procs.web.pid)
        for _ in range(3):  # the whole table three times over, each time all at once
            answers = await asyncio.gather(*(raw_request(port, *request_bytes(api_key, c)) for c in LIMIT_TABLE))
            assert {c.name: a for c, a in zip(LIMIT_TABLE, answers, strict=True)} == {
                c.name: c.status for c in LIMIT_TABLE
            }
        grown_mib = (rss_kib(procs.web.pid) - before) / 1024
        print(f"\nweb RSS grew {grown_mib:.1f} MiB over {3 * len(LIMIT_TABLE)} hostile requests")
        assert grown_mib < 50
        assert procs.web.poll() is None
        assert "Traceback" not in procs.log("web") and " 500 " not in procs.log("web")
    finally:
        procs.stop()


async def takes_until_refused(budget: Budget, redis: Redis, *, burst: int) -> int:
    """How many submits `budget` lets through before its first 429 (the bucket refills at a token per 1,000 s)."""
    taken = 0
    while True:
        try:
            await budget.take(redis, "k", rate=0.001, burst=burst)
        except RateLimited:
            return taken
        taken += 1


async def test_processes_drawing_a_keys_tokens_in_handfuls_never_pass_its_burst(redis: Redis, deps: Deps) -> None:
    budgets = [Budget() for _ in range(3)]  # three web processes, each taking 10 at a time
    accepted, refused = 0, set()
    while len(refused) < len(budgets):
        for n, budget in enumerate(budgets):
            try:
                await budget.take(redis, "k", rate=0.001, burst=80)
                accepted += 1
            except RateLimited:
                refused.add(n)
    assert accepted == 80


async def test_a_busy_key_costs_one_round_trip_per_handful_of_submits(redis: Redis, deps: Deps) -> None:
    async def scripts_run() -> int:
        stats = await redis.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))

    before, budget = await scripts_run(), Budget()
    for _ in range(Budget.MAX_CHUNK):
        await budget.take(redis, "k", rate=1000.0, burst=8 * Budget.MAX_CHUNK)
    assert await scripts_run() - before <= 2  # one handful (and, the first time, loading the script)


async def test_tokens_a_process_held_too_long_are_dropped_not_spent(redis: Redis, deps: Deps) -> None:
    budget = Budget()
    budget.HOLD_S = 0.05
    await budget.take(redis, "k", rate=0.001, burst=16)  # takes 2 from the bucket, holds 1
    await asyncio.sleep(0.1)
    assert await takes_until_refused(budget, redis, burst=16) == 14  # the held one lapsed: 15 of 16 in all


def test_a_full_map_is_pruned_once_per_half_its_size_not_on_every_insertion() -> None:
    """Per-process memories (link tokens, held tokens, blocked addresses) fill with entries that are all still
    young under load: scanning them on each insertion made every request cost as much as the map is long."""
    from server.limits import pruned

    entries: dict[int, int] = {}
    looked_at = 0

    def young(_: int) -> bool:
        nonlocal looked_at
        looked_at += 1
        return True

    for n in range(10_000):
        entries = pruned(entries, young, 100)
        entries[n] = n
        assert len(entries) <= 100
    assert looked_at <= 3 * 10_000  # amortised: a scan of 100 at most every 50 insertions


def test_pruning_keeps_the_entries_still_in_use_when_few_are() -> None:
    from server.limits import pruned

    entries = {n: n for n in range(100)}
    assert pruned(entries, lambda v: v >= 90, 100) == {n: n for n in range(90, 100)}
    assert pruned(entries, lambda v: True, 101) is entries  # not full: untouched


@pytest.mark.slow
async def test_a_client_rotating_x_forwarded_for_is_still_throttled_by_the_web_as_the_procfile_runs_it(
    config: Config, deps: Deps, api_key: str, tmp_path: Path
) -> None:
    """Behind uvicorn's default proxy trust (127.0.0.1), rotating X-Forwarded-For sent 600 bad keys with no 429."""
    procs = Processes(process_env(config, OUTLAST_AUTH_FAILURES_PER_MIN="5"), tmp_path, api_key)
    procs.start_web()
    try:
        await procs.ready()
        async with httpx.AsyncClient(base_url=procs.url) as client:
            statuses = [
                (
                    await client.get(
                        "/v1/jobs", headers={"x-forwarded-for": f"198.51.100.{n}", **bearer(keys.new_key())}
                    )
                ).status_code
                for n in range(8)
            ]
            assert statuses == [401] * 5 + [429] * 3, statuses
            assert (await client.get("/v1/jobs", headers=bearer(api_key))).status_code == 200
    finally:
        procs.stop()
