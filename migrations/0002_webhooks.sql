-- Webhooks: the outbox (written by a trigger in the transaction that ends a job), a log of every
-- attempt, and the per-tenant signing secrets. The retry schedule lives here too: `next_try_at`.

-- 0001's placeholder, never written to: replaced by the shape the delivery worker needs.
DROP TABLE webhook_deliveries;

CREATE TABLE webhook_deliveries (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    url          text NOT NULL,                  -- the job's callback_url when the delivery was queued
    reason       text NOT NULL CHECK (reason IN (
        'finished',   -- written by the trigger below when the job ended
        'redeliver'   -- asked for with POST /v1/jobs/{id}/deliveries/redeliver
    )),
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN (
        'pending',    -- waiting for its next attempt, or in one
        'delivered',  -- the receiver answered 2xx
        'failed'      -- given up: the schedule ran out, the receiver answered 410, or the URL can never pass
    )),
    attempts     integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),  -- attempts started: an outcome's fencing token
    -- due at; while an attempt is in flight, the moment it counts as lost (the worker died) and is due again
    next_try_at  timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now(),  -- the retry window runs from here
    finished_at  timestamptz,
    CHECK ((status = 'pending') = (finished_at IS NULL))
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_try_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id, created_at);

-- One row per attempt, written when it starts and completed when it ends.
CREATE TABLE webhook_attempts (
    delivery_id  uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    n            integer NOT NULL CHECK (n >= 1),
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,                     -- NULL: the worker stopped during the attempt
    status_code  integer,                         -- the receiver's answer; NULL when there was none
    latency_ms   integer,
    error        text,                            -- why it did not count as delivered, in a line
    PRIMARY KEY (delivery_id, n)
);

-- Signing secrets: one current per tenant, and old ones that still sign until they expire (rotation).
CREATE TABLE webhook_secrets (
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    secret      text NOT NULL CHECK (secret ~ '^whsec_[A-Za-z0-9+/]+={0,2}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,                      -- NULL: the current secret
    PRIMARY KEY (tenant_id, secret)
);
CREATE UNIQUE INDEX webhook_secrets_current ON webhook_secrets (tenant_id) WHERE expires_at IS NULL;

-- The outbox: whichever statement ends a job (finish, sweep, cancel, expiry), its delivery row commits
-- or rolls back with it.
CREATE FUNCTION webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (job_id, url, reason) VALUES (NEW.id, NEW.callback_url, 'finished');
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_webhook_outbox AFTER UPDATE OF status ON jobs FOR EACH ROW
    WHEN (NEW.callback_url IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('succeeded', 'failed', 'cancelled', 'expired'))
    EXECUTE FUNCTION webhook_outbox();
