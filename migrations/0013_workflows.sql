-- Workflows (worker/workflows.py): a DAG of steps whose jobs are ordinary jobs carrying `workflow_id` and `step`.
--
-- The bookkeeping is a trigger on jobs, so that every path that ends a job (a worker's finish, a cancel, the
-- sweep's expiry or rescue) moves its workflow in the same transaction: a step's last job to succeed marks the steps
-- that were waiting on it `ready`, the first to fail for good fails the workflow. Making a ready step's jobs is
-- Python's (worker/workflows.py start_ready), through the INSERT every submit uses: the worker that finished the
-- job right after its commit, or the sweep if that worker died first. A `ready` step is taken by one UPDATE, in
-- the transaction that inserts its jobs, so it is started once.
CREATE TABLE workflows (
    id           uuid PRIMARY KEY,
    tenant_id    text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    status       text NOT NULL DEFAULT 'running'
                 CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    error        jsonb,                          -- why it failed: {"step", "type", "message"}
    metadata     jsonb NOT NULL DEFAULT '{}',
    idempotency_key text,                        -- the submit's Idempotency-Key: one workflow per key and tenant
    request_hash bytea,                          -- what it was asked with: the same key with another is refused
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    CHECK ((status = 'running') = (finished_at IS NULL))
);
CREATE INDEX workflows_tenant_newest ON workflows (tenant_id, id DESC);
CREATE UNIQUE INDEX workflows_idempotency ON workflows (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE workflow_steps (
    workflow_id   uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    name          text NOT NULL,
    position      integer NOT NULL,              -- its place in the request
    after         text[] NOT NULL DEFAULT '{}',  -- the steps it waits for, its map's source included
    map           text,                          -- one job per item of this step's result
    status        text NOT NULL DEFAULT 'waiting'
                  CHECK (status IN ('waiting', 'ready', 'running', 'succeeded', 'failed', 'cancelled')),
    remaining     integer NOT NULL DEFAULT 0,    -- its jobs not yet succeeded, while it runs
    -- the job each of its jobs is made from, checked and completed as a submit's is
    type          text NOT NULL,
    input         jsonb NOT NULL,
    metadata      jsonb NOT NULL DEFAULT '{}',
    max_attempts  integer NOT NULL,
    timeout_s     integer NOT NULL,
    retry_safe    boolean NOT NULL,
    priority      smallint NOT NULL DEFAULT 0,
    PRIMARY KEY (workflow_id, name)
);
-- What start_ready looks for: a pass of the sweep, or a worker right after a finish.
CREATE INDEX workflow_steps_ready ON workflow_steps (workflow_id) WHERE status = 'ready';

ALTER TABLE jobs
    ADD COLUMN workflow_id uuid REFERENCES workflows (id) ON DELETE CASCADE,
    ADD COLUMN step text,
    ADD COLUMN item integer,                     -- its place in its map step's list
    ADD COLUMN upstream jsonb;                   -- ctx.upstream: the results of the steps it came after
CREATE INDEX jobs_workflow ON jobs (workflow_id, step, item) WHERE workflow_id IS NOT NULL;

-- A step is over: the next steps whose every `after` has succeeded are ready, and the workflow ends once every step
-- has succeeded. Also called by start_ready for a map step over an empty list, which has no job to end.
CREATE OR REPLACE FUNCTION workflow_step_succeeded(wf uuid, done_step text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workflow_steps SET status = 'succeeded' WHERE workflow_id = wf AND name = done_step;
    UPDATE workflow_steps s SET status = 'ready'
     WHERE s.workflow_id = wf AND s.status = 'waiting' AND done_step = ANY (s.after)
       AND NOT EXISTS (SELECT 1 FROM workflow_steps d
                        WHERE d.workflow_id = wf AND d.name = ANY (s.after) AND d.status <> 'succeeded');
    IF NOT EXISTS (SELECT 1 FROM workflow_steps WHERE workflow_id = wf AND status <> 'succeeded') THEN
        UPDATE workflows SET status = 'succeeded', finished_at = now() WHERE id = wf AND status = 'running';
    END IF;
END
$$;

-- The workflow ends `outcome` (failed, cancelled) because of `at_step`: the steps not over are cancelled, and so are
-- its queued jobs, through the cancel mark the claim refuses and the sweep ends (worker/sweep.py cancel_requeued).
-- Running jobs finish as they will: a failure cancels what has not started.
CREATE OR REPLACE FUNCTION workflow_end(wf uuid, outcome text, at_step text, why jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workflows SET status = outcome, finished_at = now(), error = why WHERE id = wf AND status = 'running';
    UPDATE workflow_steps SET status = CASE WHEN name = at_step THEN outcome ELSE 'cancelled' END
     WHERE workflow_id = wf AND status IN ('waiting', 'ready', 'running');
    UPDATE jobs SET cancel_requested_at = now()
     WHERE workflow_id = wf AND status = 'queued' AND cancel_requested_at IS NULL;
END
$$;

CREATE OR REPLACE FUNCTION workflow_job_ended() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    left_to_run integer;
BEGIN
    -- one at a time per workflow: a step's last two jobs ending together both count down, and one of them sees 0
    PERFORM 1 FROM workflows WHERE id = NEW.workflow_id AND status = 'running' FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NEW.status = 'succeeded' THEN
        UPDATE workflow_steps SET remaining = remaining - 1
         WHERE workflow_id = NEW.workflow_id AND name = NEW.step AND status = 'running'
        RETURNING remaining INTO left_to_run;
        IF left_to_run = 0 THEN
            PERFORM workflow_step_succeeded(NEW.workflow_id, NEW.step);
        END IF;
    ELSE
        PERFORM workflow_end(
            NEW.workflow_id,
            CASE WHEN NEW.status = 'cancelled' THEN 'cancelled' ELSE 'failed' END,
            NEW.step,
            jsonb_build_object('step', NEW.step, 'job_id', NEW.id, 'status', NEW.status, 'error', NEW.error)
        );
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_workflow_advance AFTER UPDATE OF status ON jobs FOR EACH ROW
    WHEN (NEW.workflow_id IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('succeeded', 'failed', 'cancelled', 'expired'))
    EXECUTE FUNCTION workflow_job_ended();
