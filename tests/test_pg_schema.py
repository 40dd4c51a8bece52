"""migrations/postgresql/ against a real PostgreSQL server (tests/pg_server.py): the
files apply to an empty database once, the schema is SQLite's table by table and
column by column, constraints refuse what SQLite refuses, and `tickets list --search`
finds in PostgreSQL what it finds in SQLite."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import sqlite3
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway import store
from gateway.store.contracts import contract_hours, list_contracts
from gateway.store.search import expression_terms, find_tickets, search_expression
from tests.pg_server import (PgServer, find_bindir, migrate, pg_migrations, running_server,
                             skip_reason)

_databases = itertools.count(1)


def empty_database(server: PgServer) -> str:
    name = f"empty_{next(_databases)}"
    with psycopg.connect(server.url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return server.url(name)


# --- the files ---------------------------------------------------------------------------------

def test_every_migration_has_its_postgresql_twin() -> None:
    """Same numbers and names in both folders: the runner picks the folder by dialect
    and both must end at the same schema version."""
    folder = resources.files("gateway.migrations")
    sqlite_names = sorted(e.name for e in folder.iterdir() if re.match(r"\d{4}_.*\.sql$", e.name))
    assert [name for _, name, _ in pg_migrations()] == sqlite_names


def test_installed_package_ships_the_postgresql_migrations() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["gateway.migrations"]
    assert "postgresql/*.sql" in shipped


def test_migrations_apply_to_an_empty_database_once(pg_server: PgServer) -> None:
    url = empty_database(pg_server)
    names = [name for _, name, _ in pg_migrations()]
    assert migrate(url) == names
    assert migrate(url) == []  # a second run finds nothing to do
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == len(names)
        # A file run again by hand is refused, not half applied.
        with pytest.raises(psycopg.errors.DuplicateTable):
            conn.execute(pg_migrations()[0][2])


# --- the schema, compared with SQLite's -------------------------------------------------------

# FTS5 tables and their shadow tables in SQLite; tsvector tables here (both are the
# search index; tested by behaviour below). schema_version is the runner's own.
_SEARCH_TABLES = re.compile(r"^(ticket_search|message_search)(_\w+)?$|^schema_version$")


def sqlite_schema(path: Path) -> dict[str, Any]:
    db = sqlite3.connect(path)
    tables = [name for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " ORDER BY name") if not _SEARCH_TABLES.match(name)]
    columns, keys, uniques, foreign = {}, {}, set(), set()
    for table in tables:
        info = db.execute(f"PRAGMA table_info({table})").fetchall()
        columns[table] = [(name, bool(notnull or pk), default, kind.upper())
                          for _, name, kind, notnull, default, pk in info]
        keys[table] = [name for _, name, _, _, _, pk in sorted(info, key=lambda c: c[5]) if pk]
        for _, index, unique, origin, _ in db.execute(f"PRAGMA index_list({table})"):
            if unique and origin == "u":
                cols = [row[2] for row in db.execute(f"PRAGMA index_info({index})")]
                uniques.add((table, tuple(cols)))
        for row in db.execute(f"PRAGMA foreign_key_list({table})"):
            foreign.add((table, row[3], row[2], row[4], row[6]))  # from, table, to, on delete
    indexes = {(name, table) for name, table in db.execute(
        "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
    db.close()
    return {"columns": columns, "keys": keys, "uniques": uniques, "foreign": foreign,
            "indexes": indexes}


def pg_schema(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as db:
        columns: dict[str, list[tuple[str, bool, str | None, str, bool]]] = {}
        for table, name, nullable, default, kind, identity in db.execute(
                "SELECT table_name, column_name, is_nullable, column_default, data_type,"
                " is_identity FROM information_schema.columns WHERE table_schema = 'public'"
                " ORDER BY table_name, ordinal_position"):
            if not _SEARCH_TABLES.match(table):
                default = re.sub(r"::[a-z ]+$", "", default) if default else None
                columns.setdefault(table, []).append(
                    (name, nullable == "NO", default, kind, identity == "YES"))
        constraints = db.execute(
            "SELECT c.contype, t.relname,"
            " array(SELECT attname FROM unnest(c.conkey) WITH ORDINALITY k(n, i)"
            "       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY i),"
            " r.relname,"
            " array(SELECT attname FROM unnest(c.confkey) WITH ORDINALITY k(n, i)"
            "       JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY i),"
            " c.confdeltype"
            " FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid"
            " LEFT JOIN pg_class r ON r.oid = c.confrelid"
            " WHERE c.connamespace = 'public'::regnamespace").fetchall()
        backing = {name for (name,) in db.execute(
            "SELECT i.relname FROM pg_constraint c JOIN pg_class i ON i.oid = c.conindid"
            " WHERE c.contype IN ('p', 'u')")}
        indexes = {(name, table) for name, table in db.execute(
            "SELECT indexname, tablename FROM pg_indexes WHERE schemaname = 'public'")
            if name not in backing and not _SEARCH_TABLES.match(table)}
    on_delete = {"a": "NO ACTION", "c": "CASCADE", "r": "RESTRICT", "n": "SET NULL"}
    live = [c for c in constraints if not _SEARCH_TABLES.match(c[1])]
    return {
        "columns": columns,
        "keys": {table: list(cols) for kind, table, cols, *_ in live if kind == "p"},
        "uniques": {(table, tuple(cols)) for kind, table, cols, *_ in live if kind == "u"},
        "foreign": {(table, cols[0], ref, ref_cols[0], on_delete[action])
                    for kind, table, cols, ref, ref_cols, action in live if kind == "f"},
        "indexes": indexes,
    }


@pytest.fixture
async def sqlite_path(tmp_path: Path) -> Path:
    conn = await store.connect(tmp_path / "gw.db")
    await store.migrate(conn)
    await conn.close()
    return tmp_path / "gw.db"


# What only PostgreSQL has, and why.
PG_ONLY_COLUMNS = {
    ("attachments", "seq"): "the order attachments were stored in (SQLite has rowid)",
}
PG_ONLY_INDEXES = {
    ("outbox_sending", "outbox"): "claims of several nodes taken over after their lease",
}


def test_tables_columns_keys_and_indexes_match_sqlite(sqlite_path: Path, pg_url: str) -> None:
    lite, pg = sqlite_schema(sqlite_path), pg_schema(pg_url)
    for table, column in PG_ONLY_COLUMNS:
        pg["columns"][table] = [c for c in pg["columns"][table] if c[0] != column]
    pg["indexes"] -= set(PG_ONLY_INDEXES)
    assert sorted(pg["columns"]) == sorted(lite["columns"])
    for table, lite_columns in lite["columns"].items():
        pg_columns = pg["columns"][table]
        assert [c[0] for c in pg_columns] == [c[0] for c in lite_columns], table
        for (name, notnull, default, kind), (_, pg_notnull, pg_default, pg_kind, identity) \
                in zip(lite_columns, pg_columns, strict=True):
            where = f"{table}.{name}"
            assert pg_notnull == notnull, where
            assert pg_default == default, where
            rowid = kind == "INTEGER" and lite["keys"][table] == [name]
            if where == "tickets.number":  # we choose ticket numbers
                assert (pg_kind, identity) == ("integer", False)
            elif rowid:  # SQLite numbers the row: an identity, unless the id is another row's
                referencing = any(f[0] == table and f[1] == name for f in lite["foreign"])
                assert (pg_kind, identity) == ("bigint", not referencing), where
            else:
                expected = {"INTEGER": ("integer", "bigint"), "TEXT": ("text",),
                            "BLOB": ("bytea",)}[kind]
                assert pg_kind in expected and not identity, where
    assert pg["keys"] == lite["keys"]
    assert pg["uniques"] == lite["uniques"]
    assert pg["foreign"] == lite["foreign"]
    assert pg["indexes"] == lite["indexes"]
    # a reference has the type of what it names (ids are bigint here)
    types = {(t, c[0]): c[3] for t, cols in pg["columns"].items() for c in cols}
    for table, column, ref, ref_column, _ in pg["foreign"]:
        assert types[table, column] == types[ref, ref_column], (table, column)


# Each refused by both databases' constraints, with nothing stored.
_ROW = ("INSERT INTO tickets (number, status, subject, reporter_email, created_at, updated_at)"
        " VALUES (?, 'new', 's', 'a@example.com', 't', 't')")
_REFUSED = [
    ("ticket number above six digits", _ROW, (1000000,)),
    ("negative ticket number", _ROW, (-1,)),
    ("thread entry neither in nor out", "INSERT INTO ticket_messages (ticket, direction,"
     " from_addr, to_addrs, subject, message_id, date) VALUES (1, 'x', 'a', '[]', 's', 'm', 't')",
     ()),
    ("thread entry of no ticket", "INSERT INTO ticket_messages (ticket, direction,"
     " from_addr, to_addrs, subject, message_id, date) VALUES (7, 'in', 'a', '[]', 's', 'm', 't')",
     ()),
    ("same device id in other case", "INSERT INTO contracts VALUES ('sn-fast', 'B', 8, 't')", ()),
    ("same outbox Message-ID", "INSERT INTO outbox (kind, message_id, mail_from, rcpt_to,"
     " subject, auto, next_attempt_at, queued_at, created_at) VALUES"
     " ('k', '<m@x>', 'a', 'b', 's', 0, 't', 't', 't')", ()),
]


@pytest.mark.parametrize(("what", "sql", "params"), _REFUSED, ids=[r[0] for r in _REFUSED])
async def test_constraints_refuse_what_sqlite_refuses(lite: Any, pg: Any, what: str,
                                                      sql: str, params: tuple) -> None:
    setup = [(_ROW, (1,)), ("INSERT INTO contracts VALUES ('SN-FAST', 'A', 4, 't')", ()),
             (_REFUSED[-1][1], ())]
    for conn in (lite, pg):
        for statement, values in setup:
            await conn.execute(statement, values)
        with pytest.raises(sqlite3.IntegrityError):  # PgConnection speaks sqlite3's errors
            await conn.execute(sql, params)
        assert (await conn.execute_fetchall("SELECT count(*) FROM tickets"))[0][0] == 1


# --- the store's SQL on PostgreSQL ------------------------------------------------------------

@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[Any]:
    """The store's own PostgreSQL connection (store/postgres.py's PgConnection)."""
    conn = await store.connect(pg_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def lite(sqlite_path: Path) -> AsyncIterator[Any]:
    conn = await store.connect(sqlite_path)
    try:
        yield conn
    finally:
        await conn.close()


_TICKET = ("INSERT INTO tickets (number, status, subject, reporter_name, reporter_email,"
           " reporter_phone, install_address, description, serial_number, commcell_id,"
           " created_at, updated_at) VALUES (?, 'accepted', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_MESSAGE = ("INSERT INTO ticket_messages (ticket, direction, kind, from_addr, to_addrs, subject,"
            " message_id, body, date) VALUES (?, ?, ?, 'a@example.com', '[]', ?, ?, ?, 't')")

TICKETS = [
    (100001, "Awaria serwera", "Jan Kowalski", "jan.kowalski@example.com", "+48600100200",
     "ul. Długa 5, 30-001 Kraków", "Serwer nie uruchamia się po aktualizacji.", "SN-12345",
     "CC-77"),
    (100002, "Drukarka", "Anna Nowak", "anna@firma.pl", None, "Kraków, Rynek 1",
     "Drukarka Żółta zacina papier.", "SN-99999", None),
    (100003, "Łódź: macierz", "Łukasz Żak", "l.zak@example.org", "600 200 300", None,
     "Macierz dyskowa zgłasza błąd ĘĄ", "ABC_123/45", "7"),
    (100004, "Ærø café", None, "x@example.net", None, None, "naïve e\u0301tude", None, None),
]
MESSAGES = [
    (100001, "in", "customer", "Re: [#100001] Awaria serwera", "<f@x>",
     "Dodatkowo wentylator hałasuje.\n"),
    (100001, "out", "notice", "[#100001] Przyjęte", "<n@x>", "Zgłoszenie przyjęte do realizacji."),
    (100002, "out", "staff_reply", "Re: Drukarka", "<r@x>", "Proszę wymienić toner HP-85A."),
    (100003, "in", "staff_note", "notatka", "<s@x>", "Klient prosi o telefon po 16:00"),
]

# What each search finds (the SQLite result must be this too).
SEARCHES = {
    "SN-12345": [100001], "sn-99999": [100002], "SN-123": [100001], "SN": [100001, 100002],
    '"nie uruchamia"': [100001], '"uruchamia nie"': [], "wentylator": [100001],
    "halasuje": [100001], "hałasuje": [100001], "HAŁAS": [100001],
    "zolta drukarka": [100002], "Kowalski": [100001], "kraków": [100001, 100002],
    "krakow": [100001, 100002], "Przyjęte": [], "realizacji": [],
    "600100200": [100001], "600100": [100001], "+48600100200": [100001],
    "600 200 300": [100003], "jan.kowalski@example.com": [100001], "example": [100001, 100003, 100004],
    "kowalski@example": [100001], '"kowalski example"': [100001],
    "lodz": [100003], "ŁÓDŹ": [100003], "zak": [100003], "Łukasz": [100003],
    '"macierz lukasz"': [],  # the subject ends, the fields begin: no phrase across
    '"serwera jan"': [], "macierz lukasz": [100003], "abc_123": [100003], "123/45": [100003],
    "bląd": [100003], "ea": [100003], "ĘĄ": [100003], "cafe": [100004], "naive": [100004],
    "etude": [100004], "ærø": [100004], "aero": [], "toner hp-85a": [100002],
    '"wymienić toner"': [100002], '"toner wymienić"': [], "16:00": [100003], "7": [100001, 100003],  # CC-77 starts with 7
    "a": [100001, 100002, 100003], "x' OR 1=1 --": [],
    'a" OR "b': [100003],  # a*, or*, b*: abc, example.org, błąd
    "NEAR(a b)": [], "serwer AND": [], "^start": [], "a:b": [], "-x": [100004],
    # control characters and lone surrogates separate words (a web query, odd argv bytes)
    "kowalski\x00": [100001], "wenty\x00lator": [], "\udcffkraków": [100001, 100002],
    '"nie\turuchamia"': [100001],
}


async def fill(conn: Any) -> None:
    for ticket in TICKETS:
        await conn.execute(_TICKET, (*ticket, "2026-11-01T10:00:00+00:00",
                                     "2026-11-01T10:00:00+00:00"))
    for message in MESSAGES:
        await conn.execute(_MESSAGE, message)


async def found(conn: Any, text: str) -> list[int]:
    return [t.ticket.number for t in await find_tickets(conn, search=search_expression(text))]


async def test_search_finds_what_sqlite_finds(lite: Any, pg: Any) -> None:
    await fill(lite)
    await fill(pg)
    in_sqlite = {text: await found(lite, text) for text in SEARCHES}
    assert in_sqlite == SEARCHES
    assert {text: await found(pg, text) for text in SEARCHES} == in_sqlite


async def test_search_index_follows_changes(lite: Any, pg: Any) -> None:
    changes = [
        ("UPDATE tickets SET serial_number = 'SN-777' WHERE number = 100001", ()),
        ("UPDATE tickets SET status = 'closed' WHERE number = 100002", ()),
        ("UPDATE ticket_messages SET body = 'Wentylator ucichł' WHERE message_id = '<f@x>'", ()),
        ("UPDATE ticket_messages SET kind = 'notice' WHERE message_id = '<r@x>'", ()),
        ("UPDATE ticket_messages SET kind = 'staff_reply' WHERE message_id = '<n@x>'", ()),
    ]
    after = {"SN-777": [100001], "SN-12345": [], "zolta": [100002], "ucichl": [100001],
             "halasuje": [], "toner": [], "realizacji": [100001]}
    for conn in (lite, pg):
        await fill(conn)
        for sql, params in changes:
            await conn.execute(sql, params)
        for text, expected in after.items():
            assert await found(conn, text) == expected, (conn.__class__.__name__, text)


async def test_search_backfills_rows_stored_before_the_index(pg_server: PgServer) -> None:
    """Tickets and messages written under schema 4 are found after 0005."""
    url = empty_database(pg_server)
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                   " name TEXT NOT NULL, applied_at TEXT NOT NULL)")
        for version, name, sql in pg_migrations()[:4]:
            db.execute(sql)
            db.execute("INSERT INTO schema_version VALUES (%s, %s, 't')", (version, name))
        db.execute(_TICKET.replace("?", "%s"), (*TICKETS[0], "t", "t"))
        db.execute(_MESSAGE.replace("?", "%s"), MESSAGES[0])
        db.execute(_MESSAGE.replace("?", "%s"), MESSAGES[1])
    conn = await store.connect(url)
    try:
        assert (await store.migrate(conn))[0] == "0005_search.sql"
        assert await found(conn, "SN-12345") == [100001]
        assert await found(conn, "wentylator") == [100001]
        assert await found(conn, "realizacji") == []  # a notice, as in SQLite's backfill
    finally:
        await conn.close()


def test_search_terms_round_trip() -> None:
    text = 'SN-1 "nie działa" x"y "a""b" ł'
    assert expression_terms(search_expression(text)) == [
        ("SN-1", True), ("nie dziala", False), ('x"y', True), ("a", False), ("b", False),
        ("l", True)]
    with pytest.raises(ValueError):
        expression_terms('"a" OR "b"')


async def test_contracts_compare_device_ids_without_case(pg: Any) -> None:
    for device, hours in (("SN-FAST", 4), ("sn-slow", 48), ("Ab-1", 24)):
        await pg.execute("INSERT INTO contracts VALUES (?, 'ACME', ?, 't')", (device, hours))
    assert await contract_hours(pg, ["sn-fast"]) == 4
    assert await contract_hours(pg, [" SN-SLOW ", "nothing"]) == 48
    assert await contract_hours(pg, ["sn-fást"]) is None  # accents count, as in NOCASE
    assert [c.device_id for c in await list_contracts(pg)] == ["Ab-1", "SN-FAST", "sn-slow"]


async def test_web_sessions_of_a_user_on_postgresql(lite: Any, pg: Any) -> None:
    """web_sessions."user": a reserved word in PostgreSQL, quoted in the queries."""
    from datetime import UTC, datetime

    from gateway.web import accounts

    now = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    for conn in (lite, pg):
        user = await accounts.add_user(conn, "jan", "jan@s4e.pl", "hash", now)
        tokens = [await accounts.start_session(conn, user, 3600, now) for _ in range(2)]
        session = await accounts.find_session(conn, tokens[0], now)
        assert session is not None and session.user.name == "jan"
        assert await accounts.remove_user(conn, "jan") == 2  # both browsers signed out
        assert await accounts.find_session(conn, tokens[1], now) is None


# --- the throwaway cluster ----------------------------------------------------------------------

def test_without_postgresql_the_tests_skip_in_one_line(tmp_path: Path) -> None:
    assert skip_reason(path=str(tmp_path), pattern=str(tmp_path / "*" / "bin")) == (
        "PostgreSQL not installed (initdb/pg_ctl not found)")


@pytest.mark.skipif(not Path("/usr/lib/postgresql").is_dir(), reason="not Debian's postgresql")
def test_debian_programs_are_found_off_the_path(tmp_path: Path) -> None:
    bindir = find_bindir(path=str(tmp_path))  # nothing on this PATH
    assert bindir is not None and bindir.parent.parent == Path("/usr/lib/postgresql")
    assert (bindir / "initdb").exists() and (bindir / "pg_ctl").exists()


def test_throwaway_cluster_leaves_nothing_behind() -> None:
    if reason := skip_reason():
        pytest.skip(reason)
    with running_server() as server:
        with psycopg.connect(server.url()) as conn:
            assert conn.execute("SHOW fsync").fetchone()[0] == "off"
            assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        pid, folder, port = server.postmaster_pid(), server.folder, server.port
        assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not folder.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://s4e@127.0.0.1:{port}/postgres", connect_timeout=2)


async def test_cli_search_on_postgresql(pg: Any, pg_url: str, tmp_path: Path) -> None:
    """What an engineer types: `tickets list --search` with [storage] database a URL."""
    import json

    from tests.conftest import run_cli_sync

    await fill(pg)
    config = tmp_path / "gw.toml"
    config.write_text(f'[storage]\ndatabase = "{pg_url}"\nattachments = "{tmp_path}/att"\n'
                      f'[outbound]\nmaildir = "{tmp_path}/outbox"\n')
    for text, expected in (("halasuje", ["100001"]), ("Kraków", ["100001", "100002"]),
                           ('"macierz lukasz"', [])):
        code, out, err = await asyncio.to_thread(
            run_cli_sync, "tickets", "list", "--search", text, "--json", "--config", str(config))
        assert code == 0, err
        assert [t["number"] for t in json.loads(out)] == expected, text
    code, out, err = await asyncio.to_thread(
        run_cli_sync, "tickets", "list", "--search", " -- ", "--config", str(config))
    assert (code, out) == (1, "") and "nothing to search for" in err and len(err.splitlines()) == 1
