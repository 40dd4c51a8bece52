-- PostgreSQL dialect of ../0008_claims.sql (read it for why).
ALTER TABLE inbound ADD COLUMN claimed_by INTEGER;
CREATE INDEX inbound_processing ON inbound (claimed_by) WHERE state = 'processing';
