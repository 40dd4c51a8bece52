-- Placeholder so that 0007_storage.sql applies on this branch alone: number 0006 belongs
-- to another branch (deskcli: 0005, web: 0006). DELETE THIS FILE WHEN MERGING.
SELECT 1;
