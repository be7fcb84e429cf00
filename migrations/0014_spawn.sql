-- Children that a job's code spawns (ctx.spawn), and a parent that waits for them as a row, not as a coroutine
-- holding a worker slot (worker/spawn.py).

ALTER TABLE jobs
    -- the job whose code spawned this one; a parent deleted by retention leaves its children standing
    ADD COLUMN parent_id uuid REFERENCES jobs (id) ON DELETE SET NULL,
    ADD COLUMN spawn_key text,                   -- the key it was spawned with: one child per key and parent
    -- queued, and not due until its last child has ended: then it runs again, with its children's outcomes
    ADD COLUMN waiting boolean NOT NULL DEFAULT false,
    ADD COLUMN waits integer NOT NULL DEFAULT 0; -- how often it waited: bounded, so a job can't wait forever
CREATE UNIQUE INDEX jobs_spawned ON jobs (parent_id, spawn_key) WHERE parent_id IS NOT NULL;
-- What a parent's resume asks ("any child still live?") and what the sweep's cascade walks.
CREATE INDEX jobs_live_children ON jobs (parent_id) WHERE parent_id IS NOT NULL AND status IN ('queued', 'running');
CREATE INDEX jobs_waiting_for_children ON jobs (id) WHERE waiting;
