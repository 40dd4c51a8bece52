-- Placeholder so that 0007_storage.sql applies on this branch alone: 0006 belongs to
-- the web branch (0006_web.sql). DELETE THIS FILE WHEN MERGING.
SELECT 1;
