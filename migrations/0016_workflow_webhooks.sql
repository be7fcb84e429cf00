-- A workflow's callback_url: one signed webhook when it ends (and another if a resumed workflow ends again), with
-- the final Workflow as its body. The delivery row goes in the outbox in the statement that ends the workflow,
-- exactly as a job's does, and the same delivery worker, schedule, secrets and SSRF guard carry it.

ALTER TABLE workflows ADD COLUMN callback_url text;

ALTER TABLE webhook_deliveries
    ALTER COLUMN job_id DROP NOT NULL,
    ADD COLUMN workflow_id uuid REFERENCES workflows (id) ON DELETE CASCADE,
    ADD CONSTRAINT webhook_deliveries_of_one CHECK ((job_id IS NULL) <> (workflow_id IS NULL));
CREATE INDEX webhook_deliveries_workflow ON webhook_deliveries (workflow_id, created_at) WHERE workflow_id IS NOT NULL;

CREATE FUNCTION workflow_webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (workflow_id, url, reason) VALUES (NEW.id, NEW.callback_url, 'finished');
    RETURN NULL;
END
$$;
CREATE TRIGGER workflows_webhook_outbox AFTER UPDATE OF status ON workflows FOR EACH ROW
    WHEN (NEW.callback_url IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION workflow_webhook_outbox();
