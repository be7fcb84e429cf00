-- The tenant-wide feed behind GET /v1/events (worker/feed.py): one small row per change of a job's status or
-- progress, written by triggers in the statement that makes the change, whoever makes it. A row names the job only:
-- the feed shows each job as it is when read, so the log stays a few dozen bytes a change.
--
-- Order without a lock: a per-tenant counter would serialise every transition of a tenant on one row. Instead each
-- row carries its transaction's id, and readers take only rows of transactions older than every one still running
-- (pg_snapshot_xmin), in (xid, id) order: that set only ever grows at its end, so a cursor never skips a row that
-- commits late. The cost: a transaction left open delays the feed (never loses from it) until it ends.
-- No foreign key: a job's delete needs no index here, and retention deletes the log by age (worker/retention.py).

CREATE TABLE tenant_events (
    id          bigint GENERATED ALWAYS AS IDENTITY,  -- no index of its own: the order index below serves
    tenant_id   text NOT NULL,
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    job_id      uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenant_events_order ON tenant_events (tenant_id, xid, id);

-- Inserts come in batches (a batch submit, a workflow's steps, a parent's children): one INSERT per statement.
CREATE FUNCTION tenant_events_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tenant_events (tenant_id, job_id) SELECT tenant_id, id FROM added;
    RETURN NULL;
END
$$;

CREATE FUNCTION tenant_event_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tenant_events (tenant_id, job_id) VALUES (NEW.tenant_id, NEW.id);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_feed_new AFTER INSERT ON jobs REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION tenant_events_added();
-- Row by row with a WHEN, which PostgreSQL evaluates without calling the function: a heartbeat that only renews a
-- lease, a dispatch, a purge cost nothing here.
CREATE TRIGGER jobs_feed_changed AFTER UPDATE OF status, progress ON jobs FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.progress IS DISTINCT FROM NEW.progress)
    EXECUTE FUNCTION tenant_event_changed();

-- Retention by age, oldest first: two indexes in all, so a change costs the row and two index entries.
CREATE INDEX tenant_events_age ON tenant_events (created_at);
