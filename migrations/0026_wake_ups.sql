-- Wake-ups (worker/notify.py): a worker's webhook loop and cron ticker sleep until what they know is due. These
-- notify every worker, at commit, of what makes something due sooner, whichever process committed it.
CREATE FUNCTION outlast_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');  -- the same channel and payload twice in a transaction: one notification
    RETURN NULL;
END
$$;

-- A new delivery: a job or a workflow ended with a callback_url, or a redeliver was asked for.
CREATE TRIGGER webhook_deliveries_notify AFTER INSERT ON webhook_deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION outlast_notify('outlast_webhooks');

-- A schedule whose next run comes sooner than before: made, resumed, or its cron changed. A tick's advance moves it
-- later, and notifies no one.
CREATE TRIGGER schedules_notify_made AFTER INSERT ON schedules
    FOR EACH ROW WHEN (NEW.next_run_at IS NOT NULL)
    EXECUTE FUNCTION outlast_notify('outlast_schedules');
CREATE TRIGGER schedules_notify_sooner AFTER UPDATE OF next_run_at ON schedules
    FOR EACH ROW WHEN (NEW.next_run_at < OLD.next_run_at OR (OLD.next_run_at IS NULL AND NEW.next_run_at IS NOT NULL))
    EXECUTE FUNCTION outlast_notify('outlast_schedules');
