-- How many jobs a tenant may run at once, so that one tenant's long jobs never take every worker slot.
--
-- A claim admits a job only while its tenant's `running` is under its cap (`max_running`, or the deployment's
-- default share of the live workers' slots, OUTLAST_TENANT_MAX_SHARE), counting and locking in the claim's own
-- statement; the job then holds a slot (`jobs.slots`) until it stops running, whichever statement stops it
-- (finish, retry, rescue, expiry, a shutdown's hand-back): the trigger below gives the slot back in that same
-- statement, so a killed worker's slots come back with its rescue, never later.

-- Each worker process, refreshed every sweep pass: the deployment's live slots, and who runs what.
CREATE TABLE workers (
    name        text PRIMARY KEY,                 -- OUTLAST_WORKER_NAME or the platform's instance name
    host        text NOT NULL,
    pid         integer NOT NULL,
    slots       integer NOT NULL CHECK (slots > 0),  -- OUTLAST_WORKER_MAX_JOBS
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE tenants
    ADD COLUMN max_running integer CHECK (max_running >= 0),   -- NULL: the deployment's default share
    ADD COLUMN running integer NOT NULL DEFAULT 0;             -- jobs running now that took a slot of the tenant's

-- The slots a running attempt holds ('tenant'): given back when it stops running. NULL: none (no cap was in force).
ALTER TABLE jobs ADD COLUMN slots text[];

CREATE FUNCTION jobs_give_back_slots() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF 'tenant' = ANY(OLD.slots) THEN
        UPDATE tenants SET running = greatest(running - 1, 0) WHERE id = OLD.tenant_id;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    NEW.slots := NULL;
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_give_back_slots
    BEFORE UPDATE OF status ON jobs
    FOR EACH ROW WHEN (OLD.slots IS NOT NULL AND OLD.status = 'running' AND NEW.status <> 'running')
    EXECUTE FUNCTION jobs_give_back_slots();
CREATE TRIGGER jobs_give_back_slots_on_delete
    BEFORE DELETE ON jobs
    FOR EACH ROW WHEN (OLD.slots IS NOT NULL AND OLD.status = 'running')
    EXECUTE FUNCTION jobs_give_back_slots();

-- Jobs a claim turned away at their tenant's cap wait here, undispatched, until a slot is given back.
CREATE INDEX jobs_waiting ON jobs (tenant_id, next_run_at) WHERE status = 'queued' AND dispatched_at IS NULL;
