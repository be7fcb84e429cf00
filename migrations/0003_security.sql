-- API keys. A key belongs to one tenant and is stored only as a hash: the key itself is shown once, by
-- `outlast keys create`, and never again. A key reads olk_<id>_<secret>; its id is public (it finds the
-- row, `outlast keys list` shows it), its secret is 256 random bits.
CREATE TABLE api_keys (
    id            text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{12}$'),
    tenant_id     text NOT NULL REFERENCES tenants (id),
    key_hash      bytea NOT NULL CHECK (length(key_hash) = 32),  -- SHA-256 of the whole key
    name          text NOT NULL DEFAULT '',                      -- a label for people: who holds it, what for
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,                                   -- written at most every few minutes per web process
    revoked_at    timestamptz                                    -- set: the key answers 401 from then on
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
-- Development's open mode asks "is there any usable key?" on each keyless request.
CREATE INDEX api_keys_active ON api_keys (created_at) WHERE revoked_at IS NULL;
