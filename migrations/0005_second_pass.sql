-- At most one redelivery of a job waits at a time: asking again while one is pending returns that one, so a loop
-- of redeliver calls can't queue a delivery (each retried for 36 h) per call.
CREATE UNIQUE INDEX webhook_deliveries_one_redeliver ON webhook_deliveries (job_id)
    WHERE reason = 'redeliver' AND status = 'pending';
