-- A workflow that ends failed or cancelled: its steps' last changes are logged before its own end, so that the
-- `workflow` event that ends its stream (migrations/0015) comes last, as a succeeded workflow's does. The workflow's
-- row is locked first, as every other writer of its steps locks it.
CREATE OR REPLACE FUNCTION workflow_end(wf uuid, outcome text, at_step text, why jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM workflows WHERE id = wf AND status = 'running' FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE workflow_steps SET status = CASE WHEN name = at_step THEN outcome ELSE 'cancelled' END
     WHERE workflow_id = wf AND status IN ('waiting', 'ready', 'running');
    UPDATE workflows SET status = outcome, finished_at = now(), error = why WHERE id = wf AND status = 'running';
    UPDATE jobs SET cancel_requested_at = now()
     WHERE workflow_id = wf AND status = 'queued' AND cancel_requested_at IS NULL;
END
$$;
