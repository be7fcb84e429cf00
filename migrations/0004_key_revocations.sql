-- Web processes keep the keys they verified in memory, and drop one when this notification names it: a key that is
-- revoked, deleted or rewritten stops working everywhere within a round trip, whoever changed the row (`outlast
-- keys revoke` or plain SQL). last_used_at is left out: touching a key must not cost every process its cache entry.
CREATE FUNCTION api_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outlast_api_keys', OLD.id);
    RETURN NULL;
END
$$;

CREATE TRIGGER api_key_changed
    AFTER UPDATE OF id, tenant_id, key_hash, revoked_at OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_key_changed();
