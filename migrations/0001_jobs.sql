-- The jobs table is the product: PostgreSQL is the truth, Redis only a doorbell.

CREATE TABLE tenants (
    id          text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- One tenant until API keys land; every job already belongs to one.
INSERT INTO tenants (id) VALUES ('default');

CREATE TABLE jobs (
    id                  uuid PRIMARY KEY,           -- v7: ids sort by creation
    tenant_id           text NOT NULL DEFAULT 'default' REFERENCES tenants (id),
    type                text NOT NULL,
    status              text NOT NULL DEFAULT 'queued'
        CHECK (status IN (
            'queued',     -- accepted, waiting for a worker; also between attempts
            'running',    -- claimed by a worker that holds the lease
            'succeeded',  -- terminal: result is set
            'failed',     -- terminal: error is set
            'cancelled',  -- terminal: a client asked
            'expired'     -- terminal: not finished before expires_at
        )),
    input               jsonb NOT NULL,
    attempt             integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),  -- attempts started; the fencing token
    interrupted         integer NOT NULL DEFAULT 0 CHECK (interrupted BETWEEN 0 AND attempt),
                                                    -- attempts a graceful shutdown handed back: not counted
    max_attempts        integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    timeout_s           integer NOT NULL CHECK (timeout_s > 0),
    retry_safe          boolean NOT NULL,           -- may run again after a crash (copied from the type)
    next_run_at         timestamptz NOT NULL DEFAULT now(),  -- not before: the retry backoff
    dispatched_at       timestamptz,                -- last enqueue on Redis; NULL: the sweep must dispatch it
    lease_owner         text,                       -- the worker holding the running attempt
    lease_expires_at    timestamptz,                -- past it, the sweep rescues the job
    cancel_requested_at timestamptz,
    progress            jsonb NOT NULL DEFAULT '{"fraction": 0.0, "message": null}',
    result              jsonb,
    result_purged_at    timestamptz,                -- set when retention dropped the result: 410 Gone
    error               jsonb,
    callback_url        text,
    metadata            jsonb NOT NULL DEFAULT '{}',
    idempotency_key     text,
    request_hash        bytea,                      -- of the submit body, to tell a replay from a reuse
    event_seq           integer NOT NULL DEFAULT 0, -- last job_events.seq: bumped in the same UPDATE
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    expires_at          timestamptz NOT NULL,
    -- done <=> terminal, held by the database itself
    CHECK ((status IN ('succeeded', 'failed', 'cancelled', 'expired')) = (finished_at IS NOT NULL)),
    CHECK ((status = 'running') = (lease_expires_at IS NOT NULL))
);

-- Listing by tenant, newest first (v7 ids sort by time), with and without a status filter.
CREATE INDEX jobs_tenant_newest ON jobs (tenant_id, id DESC);
CREATE INDEX jobs_tenant_status_newest ON jobs (tenant_id, status, id DESC);
-- The sweep's scans, partial on live states so they stay small however many jobs are done.
CREATE INDEX jobs_queued_due ON jobs (next_run_at) WHERE status = 'queued';
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_live_expiry ON jobs (expires_at) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- The durable log behind SSE replay: every status change, progress update and log line.
CREATE TABLE job_events (
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq         integer NOT NULL,
    name        text NOT NULL CHECK (name IN ('status', 'progress', 'log')),
    data        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, seq)
);

-- The webhook outbox: one row per delivery, written in the transaction that ends the job.
CREATE TABLE webhook_deliveries (
    id           uuid PRIMARY KEY,
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    url          text NOT NULL,
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    next_try_at  timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_try_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id);
