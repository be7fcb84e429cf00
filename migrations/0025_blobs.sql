-- The blob store (worker/blobs.py): results too large for the row, the files a job writes with ctx.output, and
-- uploads (POST /v1/uploads). A blob's row says what it is; its bytes are chunks here, or an object in S3-compatible
-- storage under its id (worker/blobs_s3.py).
CREATE TABLE blobs (
    id uuid PRIMARY KEY,
    tenant_id text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('result', 'output', 'upload')),
    -- the job that wrote it (a result or an output) and the attempt, which a later attempt's files never mix with.
    -- SET NULL when the job is deleted: the blob is then retention's to delete, bytes first (blobs_orphaned).
    job_id uuid REFERENCES jobs (id) ON DELETE SET NULL,
    attempt int,
    name text NOT NULL DEFAULT '',
    content_type text NOT NULL,
    size bigint,  -- NULL while its bytes are being written: no reader sees it until they all are
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX blobs_of_job ON blobs (job_id, attempt, kind, name) WHERE job_id IS NOT NULL;
CREATE INDEX blobs_orphaned ON blobs (created_at) WHERE job_id IS NULL AND kind <> 'upload';
CREATE INDEX blobs_uploads ON blobs (created_at) WHERE kind = 'upload';
CREATE INDEX blobs_unfinished ON blobs (created_at) WHERE size IS NULL;

-- The bytes of a blob kept in PostgreSQL, in 1 MiB chunks: a Range read fetches the chunks it covers, never the whole.
CREATE TABLE blob_chunks (
    blob_id uuid NOT NULL REFERENCES blobs (id) ON DELETE CASCADE,
    seq int NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (blob_id, seq)
);
-- Out of line and uncompressed: most blobs are compressed already (Parquet) or read by range, and pglz would spend
-- a write's CPU for little.
ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

-- A result kept in the blob store: `result` is NULL and this is its size in bytes (the Job's `result_size`).
ALTER TABLE jobs ADD COLUMN result_size bigint;
