-- Retention takes a workflow whole: its jobs are deleted with it (jobs.workflow_id cascades), never one by one before
-- it, so a kept workflow always shows all its steps' jobs. What the sweep's pass looks for:
CREATE INDEX workflows_ended ON workflows (finished_at) WHERE status <> 'running';
