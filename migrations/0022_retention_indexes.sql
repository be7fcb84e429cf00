-- Retention at scale (worker/retention.py, bench/retention.py): each of its statements finds its batch through an
-- index holding only the rows it is after, so a pass costs its batch, not the table.

-- Results not yet purged. Without it the purge found nothing by reading every row of a table whose results were all
-- gone: 230 ms a pass over 1,000,000 jobs past result retention, every pass.
CREATE INDEX jobs_result_unpurged ON jobs (finished_at)
    WHERE status = 'succeeded' AND result_purged_at IS NULL AND workflow_id IS NULL;
-- Ended jobs outside workflows, oldest first: the delete's LIMIT stops after its batch, and a kept workflow's jobs
-- (deleted with their workflow) never crowd the index's front to be skipped again each pass.
CREATE INDEX jobs_retained ON jobs (finished_at) WHERE finished_at IS NOT NULL AND workflow_id IS NULL;
-- Idempotency-Keys by age, released once past idempotency_ttl_s.
CREATE INDEX jobs_idempotency_age ON jobs (created_at) WHERE idempotency_key IS NOT NULL;
