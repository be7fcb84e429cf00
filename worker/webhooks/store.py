"""Every SQL statement on webhook deliveries, their attempts and the signing secrets: store.py's sibling.

The outbox row itself is written by a trigger on `jobs` (migrations/0002_webhooks.sql), in the same
transaction as whichever statement ended the job. Here: claiming due deliveries (SKIP LOCKED, so many
workers never take the same one), recording an attempt's outcome (guarded by the attempt number), the
delivery log, redelivery, and the secrets. All times come from the database clock.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import msgspec
from databases import Database

from worker import sql

DeliveryStatus = Literal["pending", "delivered", "failed"]


def webhook_id(job_id: UUID) -> str:
    """The `webhook-id` of a job's end: the same for every attempt and every redelivery of it. A workflow's end is
    named by its delivery's id instead: a resumed workflow may end twice, and each end is news."""
    return f"msg_{job_id.hex}"


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    n: int
    started_at: datetime
    finished_at: datetime | None  # None: the worker stopped during the attempt (it is tried again)
    status_code: int | None  # the receiver's answer; None when there was none
    latency_ms: int | None
    error: str | None


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """One delivery of a job's end to its callback_url, with every attempt made so far."""

    id: UUID
    job_id: UUID
    webhook_id: str
    url: str
    reason: Literal["finished", "redeliver"]
    status: DeliveryStatus
    next_try_at: datetime | None  # when pending: the next attempt is due then
    created_at: datetime
    finished_at: datetime | None
    attempts: list[Attempt]


class Claimed(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery taken for one attempt: of a job's end, or of a workflow's."""

    id: UUID
    job_id: UUID | None
    workflow_id: UUID | None = None
    tenant_id: str
    url: str
    attempt: int  # 1 for the first
    elapsed_s: float  # since the delivery was queued, by the database clock
    now: datetime  # the database clock at the claim: the attempt's webhook-timestamp


_DELIVERY_COLUMNS = """
d.id, d.job_id, d.url, d.reason, d.status, d.next_try_at, d.created_at, d.finished_at,
COALESCE((SELECT json_agg(json_build_object('n', a.n, 'started_at', a.started_at, 'finished_at', a.finished_at,
                                           'status_code', a.status_code, 'latency_ms', a.latency_ms,
                                           'error', a.error) ORDER BY a.n)
            FROM webhook_attempts a WHERE a.delivery_id = d.id), '[]') AS attempts
"""


def _delivery(record: Any) -> Delivery:
    row = dict(record)
    return Delivery(
        id=row["id"],
        job_id=row["job_id"],
        webhook_id=webhook_id(row["job_id"]),
        url=row["url"],
        reason=row["reason"],
        status=row["status"],
        next_try_at=row["next_try_at"] if row["status"] == "pending" else None,
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        attempts=msgspec.json.decode(row["attempts"], type=list[Attempt]),
    )


# -- the delivery worker ----------------------------------------------------------------------------

_CLAIM = """
WITH due AS (
    SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_try_at <= now()
     ORDER BY next_try_at LIMIT :limit FOR UPDATE SKIP LOCKED
), claimed AS (
    -- in flight until the lease ends: past it, a worker that died mid-attempt leaves the row due again
    UPDATE webhook_deliveries d SET attempts = d.attempts + 1, next_try_at = now() + make_interval(secs => :lease)
      FROM due WHERE d.id = due.id
    RETURNING d.*
), started AS (
    INSERT INTO webhook_attempts (delivery_id, n) SELECT id, attempts FROM claimed
), taken AS (
    SELECT c.id, c.job_id, c.workflow_id, COALESCE(j.tenant_id, w.tenant_id) AS tenant_id, c.url,
           c.attempts AS attempt, CAST(extract(epoch FROM now() - c.created_at) AS float8) AS elapsed_s, now() AS now
      FROM claimed c LEFT JOIN jobs j ON j.id = c.job_id LEFT JOIN workflows w ON w.id = c.workflow_id
), next AS (
    -- the earliest of the rest: a retry's time, or another worker's attempt in flight, due again if it dies
    SELECT CAST(extract(epoch FROM min(next_try_at) - now()) AS float8) AS next_in_s FROM webhook_deliveries
     WHERE status = 'pending' AND id NOT IN (SELECT id FROM claimed)
)
SELECT taken.*, next.next_in_s FROM next LEFT JOIN taken ON true
"""


class Claim(msgspec.Struct, frozen=True):
    """What one claim took, and in how many seconds the earliest delivery it left is due (None: none is pending)."""

    taken: list[Claimed]
    next_in_s: float | None


async def claim(db: Database, *, limit: int, lease_s: float) -> Claim:
    """Take up to `limit` due deliveries for one attempt each (the attempt's row is started now), and say when the
    earliest of the others is due."""
    records = [dict(r) for r in await sql.fetch_all(db, _CLAIM, {"limit": limit, "lease": lease_s})]
    taken = [msgspec.convert({k: v for k, v in r.items() if k != "next_in_s"}, Claimed) for r in records if r["id"]]
    return Claim(taken, records[0]["next_in_s"])


_RECORD = """
WITH attempt AS (
    UPDATE webhook_attempts
       SET finished_at = now(), status_code = :status_code, latency_ms = :latency_ms, error = :error
     WHERE delivery_id = :id AND n = :n
)
UPDATE webhook_deliveries
   SET status = :status,
       next_try_at = CASE WHEN :status = 'pending' THEN now() + make_interval(secs => :delay) ELSE next_try_at END,
       finished_at = CASE WHEN :status = 'pending' THEN NULL ELSE now() END
 WHERE id = :id AND attempts = :n AND status = 'pending'
"""


async def record(
    db: Database,
    delivery_id: UUID,
    n: int,
    status: DeliveryStatus,
    *,
    retry_in_s: float = 0.0,
    status_code: int | None = None,
    latency_ms: int | None = None,
    error: str | None = None,
) -> None:
    """Write attempt `n`'s outcome, and move the delivery on unless a later attempt owns it already."""
    values = {
        "id": delivery_id,
        "n": n,
        "status": status,
        "delay": retry_in_s,
        "status_code": status_code,
        "latency_ms": latency_ms,
        "error": error,
    }
    await sql.execute(db, _RECORD, values)


# -- the API ----------------------------------------------------------------------------------------

_LIST = f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d WHERE d.job_id = :job_id ORDER BY d.created_at, d.id"


async def list_deliveries(db: Database, job_id: UUID) -> list[Delivery]:
    """A job's deliveries, oldest first, each with its attempts (the caller checked the job's tenant)."""
    return [_delivery(r) for r in await sql.fetch_all(db, _LIST, {"job_id": job_id})]


_REDELIVER = f"""
WITH d AS (
    INSERT INTO webhook_deliveries (job_id, url, reason)
    SELECT id, callback_url, 'redeliver' FROM jobs
     WHERE id = :job_id AND tenant_id = :tenant AND callback_url IS NOT NULL AND finished_at IS NOT NULL
    ON CONFLICT (job_id) WHERE reason = 'redeliver' AND status = 'pending' DO NOTHING
    RETURNING *
)
SELECT {_DELIVERY_COLUMNS} FROM d
UNION ALL
SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d
 WHERE d.job_id = :job_id AND d.reason = 'redeliver' AND d.status = 'pending'
   AND EXISTS (SELECT 1 FROM jobs WHERE id = :job_id AND tenant_id = :tenant)
"""


async def redeliver(db: Database, tenant: str, job_id: UUID) -> Delivery | None:
    """Queue a fresh delivery of a finished job with a callback_url, or return the redelivery of it still pending
    (asking again coalesces). None when it has no callback_url or is not done."""
    for _ in range(2):  # a pending one committed by a concurrent call after this statement began: look again
        record = await sql.fetch_one(db, _REDELIVER, {"job_id": job_id, "tenant": tenant})
        if record is not None:
            return _delivery(record)
    return None


# -- signing secrets --------------------------------------------------------------------------------

_SECRETS = """
SELECT secret, expires_at FROM webhook_secrets
 WHERE tenant_id = :tenant AND (expires_at IS NULL OR expires_at > now())
 ORDER BY expires_at DESC NULLS FIRST
"""
_ADD_SECRET = """
INSERT INTO webhook_secrets (tenant_id, secret, expires_at)
VALUES (:tenant, :secret, now() + make_interval(secs => CAST(:expires_in AS float8)))
ON CONFLICT DO NOTHING
"""
_RETIRE = """
UPDATE webhook_secrets SET expires_at = now() + make_interval(secs => :overlap)
 WHERE tenant_id = :tenant AND expires_at IS NULL
RETURNING secret
"""


async def secrets(db: Database, tenant: str) -> list[tuple[str, datetime | None]]:
    """The tenant's secrets that sign now, current first, each with its expiry (None: current)."""
    return [(r["secret"], r["expires_at"]) for r in await sql.fetch_all(db, _SECRETS, {"tenant": tenant})]


async def add_current_secret(db: Database, tenant: str, secret: str) -> None:
    """Make `secret` the tenant's current one unless it has one already (a concurrent caller won)."""
    await sql.execute(db, _ADD_SECRET, {"tenant": tenant, "secret": secret, "expires_in": None})


async def tenant_exists(db: Database, tenant: str) -> bool:
    return bool(await sql.fetch_val(db, "SELECT count(*) = 1 FROM tenants WHERE id = :tenant", {"tenant": tenant}))


async def rotate_secret(db: Database, tenant: str, secret: str, *, overlap_s: float, previous: str = "") -> None:
    """`secret` becomes current; the old current one (or `previous`, the deployment-wide secret the tenant
    used until now) keeps signing for `overlap_s` more seconds, so receivers can switch without a gap."""
    async with db.transaction():
        await sql.execute(db, "SELECT id FROM tenants WHERE id = :tenant FOR UPDATE", {"tenant": tenant})
        await sql.execute(
            db, "DELETE FROM webhook_secrets WHERE tenant_id = :tenant AND expires_at <= now()", {"tenant": tenant}
        )
        retired = await sql.fetch_all(db, _RETIRE, {"tenant": tenant, "overlap": overlap_s})
        if not retired and previous:
            await sql.execute(db, _ADD_SECRET, {"tenant": tenant, "secret": previous, "expires_in": overlap_s})
        await sql.execute(db, _ADD_SECRET, {"tenant": tenant, "secret": secret, "expires_in": None})
