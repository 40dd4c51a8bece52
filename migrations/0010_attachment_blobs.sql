-- Attachment bytes in the database (#17), for when several gateway hosts share one
-- database (PostgreSQL): a folder of files would be on one host only. One row per
-- distinct content, named by its SHA-256 and inserted with ON CONFLICT (sha256) DO
-- NOTHING, so the same bytes are stored once, also when two nodes store them at once.
-- With SQLite the files under [storage] attachments stay the default and this table
-- stays empty (gateway/attachment_store.py chooses).
CREATE TABLE attachment_blobs (
    sha256 TEXT PRIMARY KEY,
    data BLOB NOT NULL,
    size INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
