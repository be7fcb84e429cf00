-- A workflow's own event log (GET /v1/workflows/{id}/events): every change of a step's status and of the workflow's,
-- numbered per workflow as a job's events are, written by triggers in the statement that makes the change, whoever
-- makes it (a job's end, start_ready, a cancel, a resume).

ALTER TABLE workflows ADD COLUMN event_seq integer NOT NULL DEFAULT 0;  -- its last workflow_events.seq

CREATE TABLE workflow_events (
    workflow_id uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    seq         integer NOT NULL,
    name        text NOT NULL CHECK (name IN ('step', 'workflow')),
    data        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, seq)
);

-- Every writer of a step holds the workflow's row already (the job-end trigger locks it first, as do start_ready,
-- cancel and resume), so numbering here adds no lock and no order of its own.
CREATE FUNCTION workflow_log(wf uuid, kind text, body jsonb) RETURNS void LANGUAGE sql AS $$
    WITH n AS (UPDATE workflows SET event_seq = event_seq + 1 WHERE id = wf RETURNING event_seq)
    INSERT INTO workflow_events (workflow_id, seq, name, data) SELECT wf, event_seq, kind, body FROM n;
$$;

CREATE FUNCTION workflow_step_logged() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM workflow_log(NEW.workflow_id, 'step', jsonb_build_object('step', NEW.name, 'status', NEW.status));
    RETURN NULL;
END
$$;

CREATE FUNCTION workflow_logged() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM workflow_log(NEW.id, 'workflow', jsonb_build_object(
        'status', NEW.status, 'error', NEW.error, 'finished_at', NEW.finished_at));
    RETURN NULL;
END
$$;

CREATE TRIGGER workflows_log_new AFTER INSERT ON workflows FOR EACH ROW EXECUTE FUNCTION workflow_logged();
CREATE TRIGGER workflows_log AFTER UPDATE OF status ON workflows FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION workflow_logged();
CREATE TRIGGER workflow_steps_log_new AFTER INSERT ON workflow_steps FOR EACH ROW
    EXECUTE FUNCTION workflow_step_logged();
CREATE TRIGGER workflow_steps_log AFTER UPDATE OF status ON workflow_steps FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION workflow_step_logged();
