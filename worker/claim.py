"""The claim: a message's attempt starts, in one statement, when the job may run now: it is due, its tenant is
under its cap (worker/capacity.py), its concurrency key has a slot free, and its type's rate bucket a token. A job
turned away waits `queued`, undispatched, holding nothing, until a slot comes back (`wake`, `wake_keys`) or it is due
(the sweep); one over its type's rate is due again when a token will be there, and rung for then."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

import msgspec
from databases import Database

from worker import sql
from worker.capacity import CAP_SQL, LIMITS_SQL, RATES_SQL, Capacity, limit_values, rate_values
from worker.queue import Bell
from worker.status import insert_sql as status_event
from worker.store import Jobs

# A message may come this early (its ringer's clock ahead of the database's) and still start its job.
EARLY_S = 1.0


class Claimed(msgspec.Struct, frozen=True, kw_only=True, gc=False):  # strs, ints, a list of strs: no cycle
    id: UUID
    tenant_id: str
    type: str
    input: str
    attempt: int
    max_attempts: int
    timeout_s: int
    retry_safe: bool
    interrupted: int  # attempts handed back by a graceful shutdown: they don't count
    priority: int = 0
    concurrency_key: str | None = None
    # held while it runs ('tenant', 'key'): given back when it stops, waking a job that waits for it
    slots: list[str] | None = None
    workflow_id: UUID | None = None  # a step's job: its workflow moves on when it ends
    upstream: str | None = None  # JSON: ctx.upstream
    parent_id: UUID | None = None  # a spawned child: its parent may be waiting for it to end
    waits: int = 0  # how often it waited for its children: more than 0, they are its ctx.children
    traceparent: str | None = None  # the trace its attempts join (worker/tracing.py)
    waited_s: float = 0.0  # from due (next_run_at) to claimed: its queue wait

    @property
    def attempts_left(self) -> bool:
        return self.attempt - self.interrupted < self.max_attempts


_CLAIMED_COLUMNS = (
    "id, tenant_id, type, input, attempt, max_attempts, timeout_s, retry_safe, interrupted, priority,"
    " concurrency_key, slots, workflow_id, upstream, parent_id, waits, traceparent,"
    # LEAST: a parent resumed from its wait may read 'infinity' here, which has no epoch in an interval
    " greatest(0, extract(epoch FROM now() - LEAST(next_run_at, now()))) AS waited_s"
)

# Batches lock their rows in about id order, not a guaranteed one: should two workers' batches deadlock, PostgreSQL
# fails one, and worker/batch.py then sends each of its writes alone.
_CLAIM = f"""
WITH wanted AS (  -- a pair given twice counts once, at its first place; in id order, which the join mostly keeps
    SELECT DISTINCT ON (id, attempt) id, attempt, place
      FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[])) WITH ORDINALITY AS w(id, attempt, place)
     ORDER BY id, attempt, place
), candidate AS (  -- what the claim may take (the UPDATE checks each row again)
    SELECT j.id, j.attempt, j.tenant_id, j.type, j.concurrency_key AS key, w.place,
           j.concurrency_key IS NOT NULL AND l.n IS NOT NULL AS limited, r.type IS NOT NULL AS rated
      FROM jobs j JOIN wanted w ON j.id = w.id AND j.attempt = w.attempt
      LEFT JOIN {LIMITS_SQL} ON l.type = j.type
      LEFT JOIN {RATES_SQL} ON r.type = j.type
     WHERE j.status = 'queued' AND j.expires_at > now() AND j.cancel_requested_at IS NULL
           AND j.next_run_at <= now() + make_interval(secs => :early)
), keyed AS (
    -- the keys under a limit, locked as the tenants are below: two claims never both take a key's last slot
    SELECT s.type, s.key, l.n - s.running AS room
      FROM concurrency_slots s JOIN {LIMITS_SQL} ON l.type = s.type
     WHERE (s.type, s.key) IN (SELECT type, key FROM candidate WHERE limited)
     ORDER BY s.type, s.key
       FOR NO KEY UPDATE OF s
), key_admitted AS (  -- within a key, in the order the claims came, as many as its room
    SELECT c.id, c.attempt, c.tenant_id, c.type, c.place, c.rated, k.type IS NOT NULL AS keyed
      FROM (SELECT *, row_number() OVER (PARTITION BY type, key ORDER BY place) AS n FROM candidate) c
      LEFT JOIN keyed k ON c.limited AND k.type = c.type AND k.key = c.key
     WHERE k.type IS NULL OR c.n <= k.room
), capped AS (
    -- The tenants under a cap, locked (NO KEY: submits' foreign-key checks go on): a claim that waited for another
    -- here reads the running count that one left, so two claims never both take a tenant's last slot.
    SELECT t.id, {CAP_SQL} - t.running AS room
      FROM tenants t
     WHERE t.id IN (SELECT tenant_id FROM key_admitted) AND {CAP_SQL} IS NOT NULL
     ORDER BY t.id
       FOR NO KEY UPDATE
), tenant_admitted AS (  -- within a tenant, in the order the claims came, as many as its room
    SELECT c.id, c.attempt, c.type, c.place, c.rated, c.keyed, k.id IS NOT NULL AS capped
      FROM (SELECT *, row_number() OVER (PARTITION BY tenant_id ORDER BY place) AS n FROM key_admitted) c
      LEFT JOIN capped k ON k.id = c.tenant_id
     WHERE k.id IS NULL OR c.n <= k.room
), rated AS (  -- the rate-limited types' buckets, locked, refilled to now
    SELECT b.type, least(r.count, b.tokens + extract(epoch FROM now() - b.updated_at) * r.count / r.per) AS tokens,
           r.count / r.per AS per_s
      FROM rate_buckets b JOIN {RATES_SQL} ON r.type = b.type
     WHERE b.type IN (SELECT type FROM tenant_admitted WHERE rated)
     ORDER BY b.type
       FOR NO KEY UPDATE OF b
), ranked AS (  -- within a rate-limited type, in the order the claims came, as many as it has tokens
    SELECT c.*, b.type IS NOT NULL AS bucket, b.tokens, b.per_s,
           row_number() OVER (PARTITION BY c.type ORDER BY c.place) AS n
      FROM tenant_admitted c LEFT JOIN rated b ON c.rated AND b.type = c.type
), admitted AS (
    SELECT id, attempt, keyed, capped FROM ranked WHERE NOT rated OR (bucket AND n <= floor(tokens))
), claimed AS (
    UPDATE jobs
       SET status = 'running', attempt = jobs.attempt + 1, lease_owner = :owner,
           lease_expires_at = now() + make_interval(secs => :lease), started_at = COALESCE(started_at, now()),
           slots = NULLIF(array_remove(ARRAY[CASE WHEN a.capped THEN 'tenant' END,
                                             CASE WHEN a.keyed THEN 'key' END], NULL), '{{}}'),
           event_seq = event_seq + 1
      FROM admitted a
     WHERE jobs.id = a.id AND jobs.status = 'queued' AND jobs.attempt = a.attempt
           AND jobs.expires_at > now() AND jobs.cancel_requested_at IS NULL
    RETURNING jobs.*
), took AS (
    UPDATE tenants t SET running = t.running + n.taken
      FROM (SELECT tenant_id, count(*) AS taken FROM claimed WHERE 'tenant' = ANY(slots) GROUP BY tenant_id) n
     WHERE t.id = n.tenant_id
), took_keys AS (
    UPDATE concurrency_slots s SET running = s.running + n.taken
      FROM (SELECT type, concurrency_key, count(*) AS taken FROM claimed WHERE 'key' = ANY(slots)
             GROUP BY type, concurrency_key) n
     WHERE s.type = n.type AND s.key = n.concurrency_key
), took_tokens AS (
    UPDATE rate_buckets b SET tokens = r.tokens - COALESCE(n.taken, 0), updated_at = now()
      FROM rated r LEFT JOIN (SELECT type, count(*) AS taken FROM claimed GROUP BY type) n ON n.type = r.type
     WHERE b.type = r.type
), deferred AS (
    -- over its type's rate: due again when the bucket holds its token, each later than the one before, and rung
    -- by the caller with that delay. No event: it was queued and stays queued.
    UPDATE jobs SET next_run_at = now() + make_interval(secs => (d.n - d.tokens) / d.per_s), dispatched_at = now()
      FROM ranked d
     WHERE d.rated AND d.bucket AND d.n > floor(d.tokens)
           AND jobs.id = d.id AND jobs.attempt = d.attempt AND jobs.status = 'queued'
    RETURNING jobs.*, (d.n - d.tokens) / d.per_s AS deferred_s
), turned_away AS (
    -- at a cap or a key's limit, or rung before its time: it waits, undispatched, holding nothing, until a slot
    -- comes back or (the sweep) it is due
    UPDATE jobs SET dispatched_at = NULL
      FROM wanted w
     WHERE jobs.id = w.id AND jobs.attempt = w.attempt AND jobs.status = 'queued'
           AND w.id NOT IN (SELECT id FROM admitted) AND w.id NOT IN (SELECT id FROM ranked WHERE rated AND bucket)
), event AS ({status_event("claimed")})
SELECT {_CLAIMED_COLUMNS}, CAST(NULL AS float8) AS deferred_s FROM claimed
UNION ALL
SELECT {_CLAIMED_COLUMNS}, deferred_s FROM deferred
"""


async def claim_many(
    jobs: Jobs, wanted: Sequence[tuple[UUID, int]], *, owner: str, lease_s: float, capacity: Capacity | None = None
) -> list[Claimed | Bell | None]:
    """Start attempt `started + 1` of each `(job_id, started)` (a message's pair, worker/queue.py), in one
    statement. None: a stale or duplicate delivery, so run nothing (a pair given twice is claimed for its first
    place only), or a job that may not run now (see the module's doc): it waits undispatched. A Bell: a job over
    its type's rate, due again later: the caller rings it."""
    ids, attempts = [job_id for job_id, _ in wanted], [attempt for _, attempt in wanted]
    values = {
        "ids": ids,
        "attempts": attempts,
        "owner": owner,
        "lease": lease_s,
        "early": EARLY_S,
        "default_cap": None if capacity is None else capacity.default_cap,
        **limit_values({} if capacity is None else capacity.limits),
        **rate_values({} if capacity is None else capacity.rates),
    }
    records = await sql.fetch_all(jobs.db, _CLAIM, values)
    answers: dict[tuple[UUID, int], Claimed | Bell] = {}
    for r in records:
        if r["deferred_s"] is None:
            answers[r["id"], r["attempt"] - 1] = msgspec.convert(dict(r), Claimed)
        else:
            answers[r["id"], r["attempt"]] = Bell(r["id"], r["attempt"], r["priority"], delay_s=r["deferred_s"])
    jobs.changed(r["id"] for r in records if r["deferred_s"] is None)
    return [answers.pop(key, None) for key in wanted]


_WOKEN = """
SELECT id, attempt, priority, tenant_id FROM jobs
 WHERE id = :id AND attempt = :started AND status = 'queued' AND dispatched_at IS NOT NULL AND next_run_at <= now()
"""


async def woken_meanwhile(db: Database, job_id: UUID, started: int) -> Bell | None:
    """The doorbell of a job whose claim turned it away, if it has been woken since (marked dispatched again, by a
    slot given back). That wake rang while arq still held this message's id, so arq dropped the ring: the caller
    rings it again once arq has let the id go. None: it still waits, it started, or it ended."""
    record = await sql.fetch_one(db, _WOKEN, {"id": job_id, "started": started})
    return None if record is None else Bell(record["id"], record["attempt"], record["priority"], record["tenant_id"])


_OWNED = f"""
SELECT {_CLAIMED_COLUMNS} FROM jobs
 WHERE id = :id AND attempt = :attempt AND status = 'running' AND lease_owner = :owner
"""


async def owned(db: Database, job_id: UUID, attempt: int, *, owner: str) -> Claimed | None:
    """Attempt `attempt` if `owner` holds it running: a claim whose answer never arrived may still have committed."""
    record = await sql.fetch_one(db, _OWNED, {"id": job_id, "attempt": attempt, "owner": owner})
    return None if record is None else msgspec.convert(dict(record), Claimed)
