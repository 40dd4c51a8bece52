-- Full-text search for `tickets list --search` (SPEC 8), PostgreSQL dialect of
-- ../0005_search.sql: what a search finds in SQLite it finds here.
--
-- SQLite: FTS5 tables ticket_search (subject, fields) and message_search (text) with
-- the unicode61 tokenizer (remove_diacritics 2) and l for the Polish barred l.
-- Here: the same two tables, holding a tsvector each, with GIN indexes, kept current
-- by triggers; gateway/store/search.py builds the tsquery. To find what unicode61
-- finds, the text is folded before PostgreSQL sees it (search_fold, below): lower
-- case, Latin diacritics removed (NFD, then the combining marks U+0300..U+036F
-- dropped, as remove_diacritics does), the barred l as l, and every run of
-- characters that are neither letters nor digits made one space, since unicode61
-- splits words there. What is left is plain words between single spaces, so the
-- simple configuration only has to number them: its own parser would otherwise keep
-- e-mail addresses, host names and "SN-12345" whole (a search for kowalski would
-- miss jan.kowalski@example.com) and the stemming configurations would change words.
-- The character classes and the case folding name the ICU root collation, so they
-- do not depend on the locale the database was created with (with locale C,
-- PostgreSQL thinks no letter beyond ASCII is a letter). Needs a UTF-8 database.
--
-- Known differences from unicode61, all outside what customers write: characters
-- that are numbers but not digits (superscripts, fractions, Roman numerals) and
-- private-use characters separate words here; non-Latin marks (Greek tonos) are
-- removed too; a message is indexed by its first 100000 characters (a tsvector holds
-- at most 1 MB; the worst case of text, Hangul syllables one by one, needs 9 bytes per
-- character), so a word further down a pasted log is not found.
-- Automatic notices are not indexed: their template words would match every ticket.

CREATE FUNCTION search_fold(t TEXT) RETURNS TEXT
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN btrim(regexp_replace(
        translate(regexp_replace(normalize(lower(t COLLATE "und-x-icu"), NFD),
                                 '[\u0300-\u036f]+', '', 'g'), 'ł', 'l') COLLATE "und-x-icu",
        '[^[:alnum:]]+', ' ', 'g'));

-- The words of a text with their positions; at most the first 100000 characters.
CREATE FUNCTION search_vector(t TEXT) RETURNS TSVECTOR
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN to_tsvector('simple', search_fold(left(t, 100000)));

-- A ticket: its subject, then its report fields in one text, as the two columns of
-- the FTS5 table. A phrase in FTS5 never runs from one column into the next: a
-- lexeme no query can hold (a hyphen: queries hold letters and digits only) sits
-- between them, one position apart from both.
CREATE FUNCTION ticket_search_document(t tickets) RETURNS TSVECTOR
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN search_vector(t.subject) || '''-'':1'::tsvector || search_vector(
        coalesce(t.reporter_name, '') || ' ' || t.reporter_email || ' '
        || coalesce(t.reporter_phone, '') || ' ' || coalesce(right(t.reporter_phone, 9), '')
        || ' ' || coalesce(t.install_address, '') || ' ' || coalesce(t.description, '')
        || ' ' || coalesce(t.serial_number, '') || ' ' || coalesce(t.commcell_id, ''));

CREATE FUNCTION message_search_document(m ticket_messages) RETURNS TSVECTOR
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN search_vector(m.subject || ' ' || m.body);

-- A search term as a tsquery: its words in this order, next to each other, the last
-- one also as a prefix when `prefix` (a word typed, not a "quoted phrase"). NULL when
-- nothing of it is left after folding: a term that can match nothing, and NULL makes
-- the whole AND of terms match nothing, as in FTS5.
CREATE FUNCTION search_term(term TEXT, prefix BOOLEAN) RETURNS TSQUERY
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN to_tsquery('simple', replace(nullif(search_fold(term), ''), ' ', ' <-> ')
                                || CASE WHEN prefix THEN ':*' ELSE '' END);

CREATE TABLE ticket_search (
    ticket   INTEGER PRIMARY KEY REFERENCES tickets (number) ON DELETE CASCADE,
    document TSVECTOR NOT NULL
);
CREATE INDEX ticket_search_document ON ticket_search USING gin (document);

CREATE TABLE message_search (
    id       BIGINT PRIMARY KEY REFERENCES ticket_messages (id) ON DELETE CASCADE,
    ticket   INTEGER NOT NULL,
    document TSVECTOR NOT NULL
);
CREATE INDEX message_search_document ON message_search USING gin (document);

CREATE FUNCTION ticket_search_refresh() RETURNS TRIGGER LANGUAGE plpgsql AS '
BEGIN
    INSERT INTO ticket_search (ticket, document)
        VALUES (NEW.number, ticket_search_document(NEW))
        ON CONFLICT (ticket) DO UPDATE SET document = EXCLUDED.document;
    RETURN NULL;
END';

CREATE FUNCTION message_search_refresh() RETURNS TRIGGER LANGUAGE plpgsql AS '
BEGIN
    INSERT INTO message_search (id, ticket, document)
        VALUES (NEW.id, NEW.ticket, message_search_document(NEW))
        ON CONFLICT (id) DO UPDATE SET document = EXCLUDED.document;
    RETURN NULL;
END';

CREATE FUNCTION message_search_forget() RETURNS TRIGGER LANGUAGE plpgsql AS '
BEGIN
    DELETE FROM message_search WHERE id = OLD.id;
    RETURN NULL;
END';

CREATE TRIGGER ticket_search_insert AFTER INSERT ON tickets
    FOR EACH ROW EXECUTE FUNCTION ticket_search_refresh();

-- Only when a searched field really changed (a status change rewrites no index).
CREATE TRIGGER ticket_search_update AFTER UPDATE OF subject, reporter_name, reporter_email,
        reporter_phone, install_address, description, serial_number, commcell_id ON tickets
    FOR EACH ROW WHEN ((OLD.subject, OLD.reporter_name, OLD.reporter_email, OLD.reporter_phone,
                        OLD.install_address, OLD.description, OLD.serial_number, OLD.commcell_id)
                       IS DISTINCT FROM
                       (NEW.subject, NEW.reporter_name, NEW.reporter_email, NEW.reporter_phone,
                        NEW.install_address, NEW.description, NEW.serial_number, NEW.commcell_id))
    EXECUTE FUNCTION ticket_search_refresh();

CREATE TRIGGER message_search_insert AFTER INSERT ON ticket_messages
    FOR EACH ROW WHEN (NEW.kind <> 'notice') EXECUTE FUNCTION message_search_refresh();

CREATE TRIGGER message_search_update AFTER UPDATE OF subject, body, kind ON ticket_messages
    FOR EACH ROW WHEN (NEW.kind <> 'notice' AND (OLD.subject, OLD.body, OLD.kind)
                       IS DISTINCT FROM (NEW.subject, NEW.body, NEW.kind))
    EXECUTE FUNCTION message_search_refresh();

-- A message that became a notice leaves the index.
CREATE TRIGGER message_search_update_notice AFTER UPDATE OF kind ON ticket_messages
    FOR EACH ROW WHEN (NEW.kind = 'notice' AND OLD.kind <> 'notice')
    EXECUTE FUNCTION message_search_forget();

-- Deleted tickets and messages leave the index by the cascading keys above.

-- The tickets and messages stored before this migration.
INSERT INTO ticket_search (ticket, document)
    SELECT t.number, ticket_search_document(t) FROM tickets t;
INSERT INTO message_search (id, ticket, document)
    SELECT m.id, m.ticket, message_search_document(m) FROM ticket_messages m
    WHERE m.kind <> 'notice';

-- Who released or dropped a held message (`held release/drop --by`).
ALTER TABLE held ADD COLUMN decided_by TEXT;
