"""Signed webhook delivery, its retry schedule and the signing secrets.

    a job ends ──trigger (same transaction)──▶ webhook_deliveries: pending, due now ──NOTIFY at commit──▶ every worker
    serving(): claim due rows (SKIP LOCKED) when woken, while a slot is free ──▶ deliver(): one attempt each
    deliver(): the final Job ─▶ signed (Standard Webhooks, every secret in force) ─▶ SSRF guard ─▶ POST to
               the checked address, naming the original host; redirects never followed, no body read
      2xx ─▶ delivered    410 ─▶ failed    anything else ─▶ pending again after Schedule.next_delay(),
      or failed once the retry window is over

Deliveries run in the worker process on their own tasks, at most `webhook_concurrency` at once, each within
`webhook_timeout_s` from DNS to status line: a slow or hostile receiver holds a delivery slot for that long
and never an arq slot, so it never delays a job. The schedule lives in PostgreSQL (`next_try_at`, by the
database clock), so it outlives restarts, Redis and arq's own 24 h limits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import logging
import math
import random
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import msgspec
from databases import Database
from standardwebhooks import Webhook

from worker import database, metrics, notify, resource, store, tokens, tracing, workflows
from worker.config import Config
from worker.database import open_database, persist
from worker.deps import Deps
from worker.job import Job
from worker.retry import envelope
from worker.webhooks import store as webhook_store
from worker.webhooks.ssrf import Forbidden, Resolver, Target, UrlGuard, send_pinned, system_resolver
from worker.webhooks.store import Claimed, DeliveryStatus

log = logging.getLogger("outlast.webhooks")
USER_AGENT = "Outlast-Webhooks/0.1"
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Schedule:
    """When to try again after attempt `attempt` failed, `elapsed_s` after the delivery was queued.

    The delay is drawn from [e/2, e] with e = min(cap, base · 2^(attempt-1)): exponential, jittered so that
    many deliveries failing together spread out, and still growing. No attempt is scheduled once `elapsed_s`
    reaches the window, so the last one comes after the window has passed and at most `cap_s` after it.
    With the defaults: 5 s, 10 s, 20 s … then every 2 to 4 h for 36 h: 23 to 26 attempts, the last by 40 h.
    """

    window_s: float = 36 * 3600.0
    base_s: float = 5.0
    cap_s: float = 4 * 3600.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def next_delay(self, attempt: int, elapsed_s: float, *, retry_after_s: float | None = None) -> float | None:
        """Seconds until the next attempt, or None: give up. A receiver's Retry-After (429, 503) is honoured
        up to `cap_s`: never sooner than it asks, never later than the schedule's longest gap."""
        if elapsed_s >= self.window_s:
            return None
        wait = envelope(attempt, base=self.base_s, cap=self.cap_s)
        delay = self.rng.uniform(wait / 2, wait)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.cap_s))
        return delay


# -- signing ----------------------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(signing: list[str], msg_id: str, timestamp: datetime, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers; one `v1,` signature per secret in force (two during a rotation)."""
    text = body.decode()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": " ".join(Webhook(secret).sign(msg_id, timestamp, text) for secret in signing),
    }


async def secrets_in_force(db: Database, tenant: str, fallback: str = "") -> list[tuple[str, datetime | None]]:
    """The tenant's signing secrets, current first, with their expiry (None: current). A tenant without one
    of its own uses `fallback` (OUTLAST_WEBHOOK_SECRET) or, when none is set, gets a fresh one now."""
    rows = await webhook_store.secrets(db, tenant)
    if rows:
        return rows
    if fallback:
        return [(fallback, None)]
    await webhook_store.add_current_secret(db, tenant, new_secret())
    return await webhook_store.secrets(db, tenant)


class Payload(Job, frozen=True, kw_only=True, omit_defaults=True):
    """The body: the final Job, with `result` replaced by `result_link` when the result is too large."""

    result_link: str | None = None


def payload(row: store.JobRow, max_result_bytes: int, *, secret: str = "", token_ttl_s: int = 900) -> bytes:
    """The Job; a result in the blob store, or larger than `max_result_bytes`, as `result_link`, which carries a
    read token (signed with `secret`, for `token_ttl_s` from this attempt) so that the receiver needs no API key."""
    job = resource.as_job(row)
    if row.result_size is None and (row.result is None or len(row.result.encode()) <= max_result_bytes):
        return _encode(job)
    link = job.links.result
    if secret:  # else development's open mode, whose web signs with a key of its own: the link alone
        link += f"?token={tokens.mint(secret.encode(), row.tenant_id, row.id, token_ttl_s)}"
    fields = msgspec.structs.asdict(job) | {"result": None}
    return _encode(Payload(**fields, result_link=link))


# -- sending ----------------------------------------------------------------------------------------


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What one attempt got: a status code, or an error line (and whether trying again could help)."""

    status_code: int | None = None
    latency_ms: int = 0
    error: str | None = None
    retry_after_s: float | None = None
    permanent: bool = False


def retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds, from either of its forms (delta-seconds or an HTTP date)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds()) if when.tzinfo else None


class Sender:
    """POSTs to an address the guard checked, naming the original host in `Host` and SNI.

    httpx's `sni_hostname` request extension keeps TLS (SNI and certificate checks) on the name while the
    socket goes to the pinned address; no keep-alive, so a connection never serves another host. Redirects
    are not followed, proxies from the environment are ignored, and no response body is read.
    """

    def __init__(self, guard: UrlGuard, *, timeout_s: float, verify: ssl.SSLContext | bool = True) -> None:
        self.guard, self.timeout_s = guard, timeout_s
        self.client = httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=False,
            trust_env=False,
            verify=verify,
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"user-agent": USER_AGENT},
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Outcome:
        started = time.monotonic()

        def took() -> int:
            return round((time.monotonic() - started) * 1000)

        try:
            async with asyncio.timeout(self.timeout_s):  # the whole attempt: DNS, connect, TLS, status line
                target = await self.guard.check(url)
                status, retry = await self._send(target, body, headers)
        except Forbidden as exc:
            log.warning("webhook to %s refused: %s", url.partition("?")[0][:200], exc.detail)
            return Outcome(latency_ms=took(), error=f"refused: {exc}", permanent=exc.permanent)
        except (TimeoutError, httpx.TimeoutException):
            return Outcome(latency_ms=took(), error=f"no answer within {self.timeout_s:g} s")
        except (httpx.HTTPError, OSError) as exc:
            return Outcome(latency_ms=took(), error=f"{type(exc).__name__}: {exc}")
        return Outcome(status_code=status, latency_ms=took(), retry_after_s=retry)

    async def _send(self, target: Target, body: bytes, headers: Mapping[str, str]) -> tuple[int, float | None]:
        response = await send_pinned(self.client, "POST", target, headers=headers, content=body)
        await response.aclose()
        wait = retry_after(response.headers.get("retry-after")) if response.status_code in (429, 503) else None
        return response.status_code, wait


def verdict(outcome: Outcome, claimed: Claimed, schedule: Schedule) -> tuple[DeliveryStatus, float, str | None]:
    """(status, seconds to the next attempt, error line) for the attempt's outcome."""
    code = outcome.status_code
    if code is not None and 200 <= code < 300:
        return "delivered", 0.0, None
    if code == 410:
        return "failed", 0.0, "answered 410 Gone: no more attempts"
    error = outcome.error
    if error is None:
        error = f"answered {code}" + (" (redirects are not followed)" if code is not None and 300 <= code < 400 else "")
    if outcome.permanent:
        return "failed", 0.0, error
    elapsed = claimed.elapsed_s + outcome.latency_ms / 1000
    delay = schedule.next_delay(claimed.attempt, elapsed, retry_after_s=outcome.retry_after_s)
    if delay is None:
        return "failed", 0.0, f"{error}; the retry window is over"
    return "pending", delay, error


# -- the delivery worker ----------------------------------------------------------------------------


async def _attempt(deps: Deps, sender: Sender, claimed: Claimed) -> Outcome:
    config = deps.config
    traceparent: str | None = None  # the trace the job's submit began (worker/tracing.py); a workflow's: none
    if claimed.workflow_id is not None:  # the final Workflow (worker/workflows.py), named by this delivery
        workflow = await workflows.get(deps.db, claimed.tenant_id, claimed.workflow_id)
        if workflow is None:
            return Outcome(error="the workflow no longer exists", permanent=True)
        body, msg_id = _encode(workflow), webhook_store.webhook_id(claimed.id)
    else:
        assert claimed.job_id is not None  # the table's CHECK: one or the other
        row = await store.get_job(deps.db, claimed.tenant_id, claimed.job_id)
        if row is None:
            return Outcome(error="the job no longer exists", permanent=True)
        body = payload(row, config.webhook_max_result_bytes, secret=config.secret_key, token_ttl_s=config.token_ttl_s)
        msg_id = webhook_store.webhook_id(row.id)
        traceparent = row.traceparent
    signing = [s for s, _ in await secrets_in_force(deps.db, claimed.tenant_id, config.webhook_secret)]
    headers = {"content-type": "application/json", **sign(signing, msg_id, claimed.now, body)}
    noted: dict[str, str | int] = {
        "outlast.webhook.delivery": str(claimed.id),
        "outlast.webhook.attempt": claimed.attempt,
    }
    with tracing.outgoing("POST", claimed.url, name="webhook POST", parent=traceparent, attributes=noted) as traced:
        outcome = await sender.post(claimed.url, body, {**headers, **traced})
        tracing.answered(outcome.status_code, error=outcome.error)
    return outcome


async def deliver(deps: Deps, sender: Sender, claimed: Claimed, schedule: Schedule) -> float | None:
    """One attempt of one claimed delivery, recorded whatever happens (a lost record: the lease runs out). Returns
    the seconds until its next attempt when it was booked one."""
    try:
        outcome = await _attempt(deps, sender, claimed)
        status, delay, error = verdict(outcome, claimed, schedule)
        metrics.webhooks.labels("retrying" if status == "pending" else status).inc()
        if outcome.status_code is not None:
            metrics.webhook_seconds.observe(outcome.latency_ms / 1000)
        await persist(
            lambda: webhook_store.record(
                deps.db,
                claimed.id,
                claimed.attempt,
                status,
                retry_in_s=delay,
                status_code=outcome.status_code,
                latency_ms=outcome.latency_ms,
                error=error,
            ),
            what=f"webhook {claimed.id}",
        )
        return delay if status == "pending" else None
    except database.UNAVAILABLE as exc:
        log.warning("webhook %s attempt %d: database unavailable (%s)", claimed.id, claimed.attempt, exc)
    except Exception:
        log.exception("webhook %s attempt %d failed", claimed.id, claimed.attempt)
    return None


def lease_s(config: Config) -> float:
    """How long a claimed attempt may take before it counts as lost and is due again."""
    return 2 * config.webhook_timeout_s + 30


async def serve(deps: Deps, sender: Sender, ear: notify.Ear) -> None:
    """Claim due deliveries whenever a slot is free and one may be due; each attempt runs on its own task. Runs until
    cancelled.

    A claim happens when the `ear` hears of a new delivery (at most one claim per OUTLAST_WEBHOOK_POLL_S while they
    keep coming, so a stream of ends costs no more claims than the poll did), when a retry this worker booked is due,
    when the earliest delivery the last claim left is due (another worker's retry, or its attempt's lease: a dead
    worker's deliveries are found then), and at least every notify.IDLE_S. Not listening, it polls every
    OUTLAST_WEBHOOK_POLL_S."""
    config = deps.config
    schedule = Schedule(window_s=config.webhook_retry_window_s)
    poll_s = config.webhook_poll_s
    alarm = ear.alarm(notify.WEBHOOKS, heard_every_s=poll_s)
    running: set[asyncio.Task[float | None]] = set()

    def ended(task: asyncio.Task[float | None]) -> None:
        running.discard(task)
        if not task.cancelled() and (delay := task.result()) is not None:
            alarm.ring(time.monotonic() + delay)

    try:
        while True:
            if free := config.webhook_concurrency - len(running):
                claimed_at = time.monotonic()
                alarm.looking()
                try:
                    got = await webhook_store.claim(deps.db, limit=free, lease_s=lease_s(config))
                except database.UNAVAILABLE as exc:
                    log.warning("webhooks: database unavailable (%s)", exc)
                    got = webhook_store.Claim([], poll_s)
                for one in got.taken:
                    task = asyncio.create_task(deliver(deps, sender, one, schedule))
                    running.add(task)
                    task.add_done_callback(ended)
                next_in = math.inf if got.next_in_s is None else got.next_in_s
                if len(got.taken) < free:  # what it left due, another worker's claim holds: not this loop's
                    next_in = max(next_in, poll_s)
                alarm.learned(claimed_at + next_in)
            if len(running) >= config.webhook_concurrency:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)  # full: wait for a slot
            else:
                await alarm.sleep(notify.IDLE_S if ear.listening else poll_s)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


@contextlib.asynccontextmanager
async def serving(deps: Deps, ear: notify.Ear, *, resolver: Resolver = system_resolver) -> AsyncIterator[Sender]:
    """Run the delivery loop in the background for as long as the context lasts (the worker's lifetime), woken by
    what `ear` hears."""
    sender = Sender(UrlGuard.from_config(deps.config, resolver), timeout_s=deps.config.webhook_timeout_s)
    task = asyncio.create_task(serve(deps, sender, ear))
    try:
        yield sender
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sender.aclose()


# -- `outlast webhooks secret TENANT` ---------------------------------------------------------------


async def tenant_secrets(
    config: Config, tenant: str, *, rotate: bool = False, overlap_s: float = 86_400.0
) -> list[tuple[str, datetime | None]]:
    """The tenant's secrets in force (current first), after a rotation when asked. LookupError: no such tenant."""
    db = open_database(config)
    await db.connect()
    try:
        if not await webhook_store.tenant_exists(db, tenant):
            raise LookupError(f"no tenant {tenant!r}")
        if rotate:
            await webhook_store.rotate_secret(
                db, tenant, new_secret(), overlap_s=overlap_s, previous=config.webhook_secret
            )
        return await secrets_in_force(db, tenant, config.webhook_secret)
    finally:
        await db.disconnect()
