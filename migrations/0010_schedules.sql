-- Cron schedules (worker/schedules.py): each tick makes one job, through the same INSERT a submit uses.
--
-- A tick is taken by one UPDATE of its schedule's row (FOR UPDATE SKIP LOCKED, guarded by the next_run_at it read)
-- in the transaction that inserts its job, and that job carries the Idempotency-Key `schedule <id> <tick>` (a space:
-- no client's key can be spelled so), so jobs' UNIQUE (tenant_id, idempotency_key) holds a second job for the same
-- tick out whatever races. A paused schedule has no next run.
CREATE TABLE schedules (
    tenant_id    text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id           text NOT NULL CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'),
    cron         text NOT NULL,                 -- five fields, checked by worker/cron.py before it is written
    timezone     text NOT NULL,                 -- an IANA name
    type         text NOT NULL,
    input        jsonb NOT NULL,                -- as the type's Input decoded and encoded it
    metadata     jsonb NOT NULL DEFAULT '{}',
    declared     boolean NOT NULL DEFAULT false, -- from a job module's SCHEDULES: the code owns its definition
    paused       boolean NOT NULL DEFAULT false,
    next_run_at  timestamptz,                   -- the next tick, in UTC; NULL exactly while paused
    last_run_at  timestamptz,                   -- the tick (or trigger) that made the last job
    last_job_id  uuid,                          -- no foreign key: retention may delete the job first
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CHECK (paused = (next_run_at IS NULL))
);

-- The ticker's scan: due schedules, earliest first.
CREATE INDEX schedules_due ON schedules (next_run_at) WHERE next_run_at IS NOT NULL;
