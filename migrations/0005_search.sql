-- Full-text search for `tickets list --search` (SPEC §8): the subject and report fields
-- of each ticket, and the text of its thread entries, kept current by triggers.
-- unicode61 with remove_diacritics 2 finds "dzialа" in "działa", except for ł, which
-- Unicode does not decompose: it is folded to l here and in the query.
-- Automatic notices are not indexed: their template words would match every ticket.

CREATE VIRTUAL TABLE ticket_search USING fts5(
    subject, fields, tokenize = 'unicode61 remove_diacritics 2');  -- rowid = tickets.number

CREATE VIRTUAL TABLE message_search USING fts5(
    ticket UNINDEXED, text, tokenize = 'unicode61 remove_diacritics 2');  -- rowid = ticket_messages.id

CREATE TRIGGER ticket_search_insert AFTER INSERT ON tickets BEGIN
    INSERT INTO ticket_search (rowid, subject, fields) VALUES (
        new.number,
        replace(replace(new.subject, 'ł', 'l'), 'Ł', 'L'),
        replace(replace(coalesce(new.reporter_name, '') || ' ' || new.reporter_email || ' '
            || coalesce(new.reporter_phone, '') || ' ' || coalesce(substr(new.reporter_phone, -9), '')
            || ' ' || coalesce(new.install_address, '') || ' ' || coalesce(new.description, '')
            || ' ' || coalesce(new.serial_number, '') || ' ' || coalesce(new.commcell_id, ''),
            'ł', 'l'), 'Ł', 'L'));
END;

CREATE TRIGGER ticket_search_update AFTER UPDATE OF subject, reporter_name, reporter_email,
        reporter_phone, install_address, description, serial_number, commcell_id ON tickets BEGIN
    UPDATE ticket_search SET
        subject = replace(replace(new.subject, 'ł', 'l'), 'Ł', 'L'),
        fields = replace(replace(coalesce(new.reporter_name, '') || ' ' || new.reporter_email || ' '
            || coalesce(new.reporter_phone, '') || ' ' || coalesce(substr(new.reporter_phone, -9), '')
            || ' ' || coalesce(new.install_address, '') || ' ' || coalesce(new.description, '')
            || ' ' || coalesce(new.serial_number, '') || ' ' || coalesce(new.commcell_id, ''),
            'ł', 'l'), 'Ł', 'L')
      WHERE rowid = new.number;
END;

CREATE TRIGGER ticket_search_delete AFTER DELETE ON tickets BEGIN
    DELETE FROM ticket_search WHERE rowid = old.number;
END;

CREATE TRIGGER message_search_insert AFTER INSERT ON ticket_messages
        WHEN new.kind != 'notice' BEGIN
    INSERT INTO message_search (rowid, ticket, text) VALUES (
        new.id, new.ticket, replace(replace(new.subject || ' ' || new.body, 'ł', 'l'), 'Ł', 'L'));
END;

CREATE TRIGGER message_search_update AFTER UPDATE OF subject, body, kind ON ticket_messages BEGIN
    DELETE FROM message_search WHERE rowid = old.id;
    INSERT INTO message_search (rowid, ticket, text)
        SELECT new.id, new.ticket, replace(replace(new.subject || ' ' || new.body, 'ł', 'l'), 'Ł', 'L')
        WHERE new.kind != 'notice';
END;

CREATE TRIGGER message_search_delete AFTER DELETE ON ticket_messages BEGIN
    DELETE FROM message_search WHERE rowid = old.id;
END;

-- The tickets and messages stored before this migration.
INSERT INTO ticket_search (rowid, subject, fields)
    SELECT number, replace(replace(subject, 'ł', 'l'), 'Ł', 'L'),
        replace(replace(coalesce(reporter_name, '') || ' ' || reporter_email || ' '
            || coalesce(reporter_phone, '') || ' ' || coalesce(substr(reporter_phone, -9), '')
            || ' ' || coalesce(install_address, '') || ' ' || coalesce(description, '')
            || ' ' || coalesce(serial_number, '') || ' ' || coalesce(commcell_id, ''),
            'ł', 'l'), 'Ł', 'L')
    FROM tickets;
INSERT INTO message_search (rowid, ticket, text)
    SELECT id, ticket, replace(replace(subject || ' ' || body, 'ł', 'l'), 'Ł', 'L')
    FROM ticket_messages WHERE kind != 'notice';

-- Who released or dropped a held message (`held release/drop --by`).
ALTER TABLE held ADD COLUMN decided_by TEXT;
