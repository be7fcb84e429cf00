-- The job's W3C trace context (worker/tracing.py): the submit span's traceparent, so that each attempt, each child
-- it spawns and each webhook delivery of its end joins the trace its submit began. NULL while tracing is off. No
-- CHECK on its form: adding one would scan the table under its lock, and the value is written by the OpenTelemetry
-- propagator, never copied from a request.
ALTER TABLE jobs ADD COLUMN traceparent text;
