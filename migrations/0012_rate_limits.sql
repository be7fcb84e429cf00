-- Per-type rate limits (JobType(rate=Rate(count, per_s))): a token bucket per type, refilled by the clock, spent by
-- the claim that starts a job, in the claim's own statement and under the row's lock, so every worker shares it.
-- Workers create the rows of the types they know (each sweep pass); a claim finds none and turns the job away until
-- one exists.
CREATE TABLE rate_buckets (
    type        text PRIMARY KEY,
    tokens      double precision NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
