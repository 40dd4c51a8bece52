-- Attachment bytes in the database (#17): several gateway hosts share this database,
-- and each must read the bytes another one stored. One row per distinct content,
-- named by its SHA-256 and inserted with ON CONFLICT (sha256) DO NOTHING, so the same
-- bytes are stored once, also when two nodes store them at once. (BYTEA keeps
-- PostgreSQL's default TOAST storage: logs, the usual attachment, compress well.)
CREATE TABLE attachment_blobs (
    sha256 TEXT PRIMARY KEY,
    data BYTEA NOT NULL,
    size INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
