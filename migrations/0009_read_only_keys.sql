-- A read-only key (`outlast keys create TENANT --read-only`) may read everything its tenant may, and every write
-- it sends answers 403: for dashboards, and for scripts that only watch.
ALTER TABLE api_keys ADD COLUMN read_only boolean NOT NULL DEFAULT false;

-- A key made read-only (or writable again) by plain SQL must change at once in every web process too: the
-- notification of migrations/0004 now covers the flag.
DROP TRIGGER api_key_changed ON api_keys;
CREATE TRIGGER api_key_changed
    AFTER UPDATE OF id, tenant_id, key_hash, revoked_at, read_only OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_key_changed();
