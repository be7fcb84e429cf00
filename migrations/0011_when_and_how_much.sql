-- When and how much: a job may ask to start later (`run_at`), before others (`priority`), and share a limit on how
-- many run at once with the jobs of its `concurrency_key` (its type declares the limit).
ALTER TABLE jobs
    ADD COLUMN run_at timestamptz,                                             -- asked for; next_run_at enforces it
    ADD COLUMN priority smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN -10 AND 10),
    ADD COLUMN concurrency_key text;

-- How many jobs of each (type, concurrency_key) run now. A claim locks the row, counts and admits in its own
-- statement (as it does for tenants), and a job that holds a key's slot ('key' in jobs.slots) gives it back in the
-- statement that stops it running, rescue of a killed worker included.
CREATE TABLE concurrency_slots (
    type     text NOT NULL,
    key      text NOT NULL,
    running  integer NOT NULL DEFAULT 0 CHECK (running >= 0),
    PRIMARY KEY (type, key)
);

CREATE OR REPLACE FUNCTION jobs_give_back_slots() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF 'tenant' = ANY(OLD.slots) THEN
        UPDATE tenants SET running = greatest(running - 1, 0) WHERE id = OLD.tenant_id;
    END IF;
    IF 'key' = ANY(OLD.slots) THEN
        UPDATE concurrency_slots SET running = greatest(running - 1, 0)
         WHERE type = OLD.type AND key = OLD.concurrency_key;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    NEW.slots := NULL;
    RETURN NEW;
END
$$;

-- Jobs a claim turned away at their key's limit wait here, undispatched, until a slot of that key comes back.
CREATE INDEX jobs_waiting_for_key ON jobs (type, concurrency_key, priority DESC, next_run_at)
    WHERE status = 'queued' AND dispatched_at IS NULL AND concurrency_key IS NOT NULL;
