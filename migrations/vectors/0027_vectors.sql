-- Vectors for vector_index and vector_search, per tenant and collection (worker/vectors/). An optional track:
-- worker/vectors/schema.py applies it only where the `vector` extension (pgvector >= 0.5) is installed, or can be.
CREATE TABLE vector_collections (
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    -- Fixed by the collection's first vectors: distances between vectors of two sizes mean nothing.
    dimensions  int NOT NULL CHECK (dimensions BETWEEN 1 AND 2000),
    -- The embedder that made its vectors from texts, or NULL for vectors given as numbers: a text query is
    -- embedded by the same model or not at all.
    model       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE vector_items (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   text NOT NULL,
    collection  text NOT NULL,
    dimensions  int NOT NULL,
    embedding   vector NOT NULL CHECK (vector_dims(embedding) = dimensions),
    text        text,
    metadata    jsonb NOT NULL DEFAULT '{}',
    job_id      uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, collection) REFERENCES vector_collections (tenant_id, name) ON DELETE CASCADE
);
CREATE INDEX vector_items_collection ON vector_items (tenant_id, collection);

-- HNSW needs a column of one size, so one partial index per common size, over the column cast to it; a search
-- names the same cast and predicate (worker/vectors/store.py). Other sizes are searched exactly.
CREATE INDEX vector_items_hnsw_256 ON vector_items USING hnsw ((embedding::vector(256)) vector_cosine_ops)
    WHERE dimensions = 256;
CREATE INDEX vector_items_hnsw_384 ON vector_items USING hnsw ((embedding::vector(384)) vector_cosine_ops)
    WHERE dimensions = 384;
CREATE INDEX vector_items_hnsw_512 ON vector_items USING hnsw ((embedding::vector(512)) vector_cosine_ops)
    WHERE dimensions = 512;
CREATE INDEX vector_items_hnsw_768 ON vector_items USING hnsw ((embedding::vector(768)) vector_cosine_ops)
    WHERE dimensions = 768;
CREATE INDEX vector_items_hnsw_1024 ON vector_items USING hnsw ((embedding::vector(1024)) vector_cosine_ops)
    WHERE dimensions = 1024;
CREATE INDEX vector_items_hnsw_1536 ON vector_items USING hnsw ((embedding::vector(1536)) vector_cosine_ops)
    WHERE dimensions = 1536;
