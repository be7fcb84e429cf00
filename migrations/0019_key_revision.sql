-- Through a transaction pooler (PgBouncer) a LISTEN hears nothing, so a web process there without a direct URL polls
-- this one row instead of listening (server/keycache.py). Every change the notification announces bumps it in the
-- same transaction: a poll that reads the new revision sees the change too, and never sees one before its commit.
CREATE TABLE api_key_revision (
    one       boolean PRIMARY KEY DEFAULT true CHECK (one),
    revision  bigint NOT NULL
);
INSERT INTO api_key_revision (revision) VALUES (0);

CREATE OR REPLACE FUNCTION api_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outlast_api_keys', OLD.id);
    UPDATE api_key_revision SET revision = revision + 1;
    RETURN NULL;
END
$$;
