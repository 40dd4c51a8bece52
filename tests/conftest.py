"""Real parts: our SMTP edge on 127.0.0.1 with an ephemeral port, a real SQLite file in
tmp_path, and a real aiosmtpd sink standing in for the relay."""

from __future__ import annotations

import asyncio
import itertools
import smtplib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import aiosqlite
import pytest
from aiosmtpd.smtp import SMTP

from gateway import store
from gateway.config import (AddressesConfig, Config, OutboundConfig, ProcessingConfig,
                            SmtpConfig,
                            StorageConfig, TicketsConfig)
from gateway.daemon import Gateway
from tests import pg_server as pg_server_module
from tests.pg_server import PgServer, migrate, running_server
from tests.pg_server import skip_reason as pg_skip_reason

INTAKE = "serwis@s4e.pl"
CRM = "crm@s4e.pl"


# --- which database the tests' gateways use ---------------------------------------------
#
# A test module that sets `BOTH_DATABASES = True` runs each of its tests twice: on a
# SQLite file in tmp_path ([sqlite]) and on a fresh PostgreSQL database of the test's
# own ([postgresql], tests/pg_server.py), because what it checks must hold on both.
# A test of such a module marked `@pytest.mark.sqlite_only` (it reads the SQLite file
# itself, or checks what only SQLite has) runs once. make_config, write_config and the
# `conn` fixture give the database of the current run.

# The PostgreSQL run's database, else None. Kept in tests.pg_server: pytest loads this
# file as `conftest` while the test modules import it as `tests.conftest`, two module
# objects with globals of their own.
_current = pg_server_module.CURRENT


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if (getattr(metafunc.module, "BOTH_DATABASES", False)
            and metafunc.definition.get_closest_marker("sqlite_only") is None):
        metafunc.parametrize("store_backend", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(autouse=True)
def store_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """"sqlite", or "postgresql" with this test's own database (see above)."""
    backend = getattr(request, "param", "sqlite")
    if backend != "postgresql":
        yield backend
        return
    _current["url"] = request.getfixturevalue("pg_url")
    try:
        yield backend
    finally:
        _current["url"] = None


def database_for(tmp_path: Path) -> Path | str:
    """The current run's database: PostgreSQL's URL, or a SQLite file in tmp_path."""
    return _current["url"] or tmp_path / "gw.db"


def query_database(database: Path | str, sql: str) -> list[dict]:
    """Rows of `sql` (no parameters) as dicts, from either database."""
    if isinstance(database, str):
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(database, autocommit=True, row_factory=dict_row) as pg:
            return list(pg.execute(sql).fetchall())
    import sqlite3

    conn = sqlite3.connect(database)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql).fetchall()]
    finally:
        conn.close()


def run_sql(database: Path | str, sql: str, params: tuple[object, ...] = ()) -> list[tuple]:
    """One statement (`?` placeholders) on either database, committed; its rows."""
    if isinstance(database, str):
        import psycopg

        from gateway.store.postgres import translate

        with psycopg.connect(database, autocommit=True) as pg:
            cursor = pg.execute(translate(sql), params)
            return [tuple(r) for r in cursor.fetchall()] if cursor.description else []
    import sqlite3

    conn = sqlite3.connect(database)
    try:
        rows = conn.execute(sql, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


@contextmanager
def write_lock_held(database: Path | str) -> Iterator[None]:
    """Another process in a write transaction, holding the store's write lock: SQLite's
    one lock, or the advisory lock of PostgreSQL's ticket changes."""
    if isinstance(database, str):
        import psycopg

        from gateway.store.postgres import WRITE_LOCK_KEY

        with psycopg.connect(database) as pg:  # not autocommit: one open transaction
            pg.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
            yield
            pg.rollback()
        return
    import sqlite3

    writer = sqlite3.connect(database, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def make_config(tmp_path: Path, **sections: object) -> Config:
    config = Config(
        smtp=SmtpConfig(listen="127.0.0.1:0", hostname="gw.test"),
        addresses=AddressesConfig(),
        storage=StorageConfig(database=database_for(tmp_path), attachments=tmp_path / "att"),
        outbound=OutboundConfig(maildir=tmp_path / "outbox"),
        tickets=TicketsConfig(),
        # In this process: tests look at its processor and mailer (tests/test_workers.py
        # and the daemon-process tests run the worker processes).
        processing=ProcessingConfig(workers=0),
    )
    return replace(config, **sections)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
async def gateway(config: Config) -> AsyncIterator[Gateway]:
    gw = Gateway(config)
    await gw.start(port=0)
    try:
        yield gw
    finally:
        await gw.stop(grace=2)


def smtp_send(port: int, mail_from: str, rcpts: list[str], raw: bytes) -> dict:
    """Blocking: one SMTP transaction, as an MTA delivers. Returns refused recipients.
    The client waits as long as an MTA would (the server's own deadlines are minutes),
    not less than a loaded CI machine may need for a reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        return client.sendmail(mail_from, rcpts, raw)


async def send(port: int, mail_from: str, rcpts: list[str], raw: bytes) -> dict:
    return await asyncio.to_thread(smtp_send, port, mail_from, rcpts, raw)


def make_mail(subject: str = "Awaria serwera", body: str = "Dzień dobry,\nserwer nie działa.\n",
              sender: str = "Jan Kowalski <jan.kowalski@example.com>", to: str = INTAKE,
              message_id: str | None = None, **headers: str) -> bytes:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    if message_id is not None:
        msg["Message-ID"] = message_id
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg.as_bytes()


@dataclass
class Sink:
    """A real SMTP server standing in for the relay; can be told to fail."""

    port: int = 0
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    fail_next: list[str] = field(default_factory=list)  # replies to give instead of 250
    attempts: int = 0

    async def handle_DATA(self, server: SMTP, session: object, envelope: object) -> str:
        self.attempts += 1
        if self.fail_next:
            return self.fail_next.pop(0)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),  # type: ignore[attr-defined]
                              envelope.original_content))  # type: ignore[attr-defined]
        return "250 2.0.0 Ok: sunk"

    def parsed(self) -> list[EmailMessage]:
        return [message_from_bytes(raw, policy=policy.default) for _, _, raw in self.messages]


@asynccontextmanager
async def sink_server(*, smtputf8: bool = True) -> AsyncIterator[Sink]:
    """A Sink listening on 127.0.0.1, an ephemeral port, for the block's duration."""
    sink = Sink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(sink, hostname="sink.test", enable_SMTPUTF8=smtputf8), "127.0.0.1", 0)
    sink.port = server.sockets[0].getsockname()[1]
    try:
        yield sink
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def smtp_sink() -> AsyncIterator[Sink]:
    async with sink_server() as sink:
        yield sink


async def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02):
    """Poll an async or sync predicate until it returns something truthy. The timeout
    only bounds a wait for something that should happen: generous, for CI's loaded
    2-core machine (a test whose proof is "before X" passes its own, shorter one)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


# --- the desk: the gateway as customers and engineers meet it -------------------------

REPORT_BODY = """Dzień dobry,

1. Imię i nazwisko osoby zgłaszającej problem: Jan Kowalski
2. Dane kontaktowe osoby zgłaszającej (mail, telefon): jan.kowalski@example.com, tel. 600 100 200
3. Adres instalacji sprzętu – realizacji naprawy: ul. Prosta 1, 30-001 Kraków
4. Opis problemu: Serwer nie uruchamia się po aktualizacji.
5. Numer seryjny urządzenia / numer Commcell ID: SN-12345

Pozdrawiam
Jan Kowalski
"""


def run_cli_sync(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from gateway import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


class Desk:
    """A running gateway plus the ways a test looks at it: what customers send,
    what the CLI shows, and the mail that leaves."""

    def __init__(self, gateway: Gateway, config_file: Path) -> None:
        self.gw = gateway
        self.config_file = config_file

    @property
    def db(self) -> Path | str:
        return self.gw.config.storage.database

    async def mail(self, raw: bytes, *, mail_from: str = "jan.kowalski@example.com",
                   rcpts: tuple[str, ...] = (INTAKE,)) -> dict:
        """Deliver over SMTP and wait until the message was routed; its inbox row."""
        before = {r["id"] for r in await self.inbox()}
        await send(self.gw.port, mail_from, list(rcpts), raw)

        async def routed():
            rows = [r for r in await self.inbox() if r["id"] not in before]
            if rows and all(r["outcome"] is not None for r in rows):
                return rows[-1]
            return None

        return await wait_for(routed)

    async def cli(self, *argv: str, ok: bool = True) -> tuple[int, str, str]:
        result = await asyncio.to_thread(run_cli_sync, *argv, "--config", str(self.config_file))
        if ok:
            assert result[0] == 0, result
        return result

    async def cli_json(self, *argv: str):
        import json

        _, out, _ = await self.cli(*argv, "--json")
        return json.loads(out)

    async def inbox(self) -> list[dict]:
        return await self.cli_json("inbox", "list")

    async def ticket(self, number: str) -> dict:
        return await self.cli_json("tickets", "show", number)

    def outbox(self) -> list[tuple[dict, EmailMessage]]:
        """Every mail queued to leave, oldest first, parsed as a client would."""
        rows = query_database(self.db, "SELECT o.*, r.raw FROM outbox o"
                              " JOIN outbox_raw r USING (id) ORDER BY o.id")
        return [(r, message_from_bytes(bytes(r["raw"]), policy=policy.default)) for r in rows]

    def mails_to(self, address: str) -> list[EmailMessage]:
        return [m for row, m in self.outbox() if row["rcpt_to"] == address]


def write_config(tmp_path: Path, extra: str = "", sink: Sink | None = None,
                 storage: str = "") -> Path:
    """`storage`: more lines for the [storage] table (e.g. 'keep_raw = "30d"\\n')."""
    text = (f'[smtp]\nlisten = "127.0.0.1:0"\nhostname = "gw.test"\n'
            f'[storage]\ndatabase = "{database_for(tmp_path)}"\nattachments = "{tmp_path}/att"\n'
            + storage)
    outbound = f'[outbound]\nmaildir = "{tmp_path}/outbox"\n'
    if sink is not None:
        outbound += f'relay = "127.0.0.1:{sink.port}"\nretry_first = "1s"\nretry_max = "2s"\n'
    if "[processing]" not in extra:  # see make_config
        outbound += "[processing]\nworkers = 0\n"
    path = tmp_path / "gw.toml"
    path.write_text(text + outbound + extra)
    return path


@pytest.fixture
def desk_options() -> str:
    """Extra TOML for the desk fixture (override in a test module)."""
    return ""


@asynccontextmanager
async def running_desk(tmp_path: Path, options: str = "", sink: Sink | None = None,
                       storage: str = "") -> AsyncIterator[Desk]:
    """A gateway started from a real config file (as `serve` would), stopped after."""
    from gateway.config import load_config

    path = write_config(tmp_path, options, sink=sink, storage=storage)
    gw = Gateway(load_config(path))
    await gw.start(port=0)
    try:
        yield Desk(gw, path)
    finally:
        await gw.stop(grace=2)


@pytest.fixture
async def desk(tmp_path: Path, desk_options: str) -> AsyncIterator[Desk]:
    async with running_desk(tmp_path, desk_options) as running:
        yield running


def body_text(message: EmailMessage) -> str:
    part = message.get_body(("plain",)) if message.is_multipart() else message
    return part.get_content().replace("\r\n", "\n")


@pytest.fixture
async def desk_with_relay(tmp_path: Path, smtp_sink: Sink, desk_options: str) -> AsyncIterator[Desk]:
    """The desk with the real aiosmtpd sink as its relay: assert on what arrives."""
    async with running_desk(tmp_path, desk_options, sink=smtp_sink) as running:
        yield running


# A real DNS server on 127.0.0.1 (`dns_server`) and a DKIM key to sign with (`dkim_key`),
# for every test module: see tests/dns_server.py.
from dns_server import dkim_key, dns_server  # noqa: E402, F401


def received(sink: Sink, rcpt: str) -> list[EmailMessage]:
    """What the relay sink got for `rcpt`, parsed as a mail client would."""
    return [message_from_bytes(raw, policy=policy.default)
            for _, rcpts, raw in sink.messages if rcpt in rcpts]


async def arrive(sink: Sink, rcpt: str, count: int) -> list[EmailMessage]:
    """Wait until `rcpt` got at least `count` mails; all of them, oldest first."""
    await wait_for(lambda: len(received(sink, rcpt)) >= count, timeout=30)
    return received(sink, rcpt)


@pytest.fixture
async def conn(tmp_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    """A migrated database of its own (the mailer tests)."""
    connection = await store.connect(database_for(tmp_path))
    await store.migrate(connection)
    try:
        yield connection
    finally:
        await connection.close()


# --- PostgreSQL (tests/pg_server.py) ------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One throwaway PostgreSQL cluster for the whole session, stopped at its end."""
    reason = pg_skip_reason()
    if reason:
        pytest.skip(reason)
    with running_server() as server:
        yield server


@pytest.fixture(scope="session")
def pg_template(pg_server: PgServer) -> str:
    """A database migrated once per session; each test gets a copy (CREATE DATABASE
    ... TEMPLATE copies files, far faster than migrating again)."""
    import psycopg

    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        admin.execute("CREATE DATABASE tmpl")
    migrate(pg_server.url("tmpl"))
    return "tmpl"


_pg_databases = itertools.count(1)


@pytest.fixture
def pg_url(pg_server: PgServer, pg_template: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own: a postgresql:// URL."""
    import psycopg

    name = f"t_{next(_pg_databases)}"
    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        # FILE_COPY: copies the template's files (a checkpoint first, cheap with fsync
        # off), twice as fast here as PostgreSQL 15's default of copying through the WAL.
        admin.execute(f"CREATE DATABASE {name} TEMPLATE {pg_template} STRATEGY FILE_COPY")
    try:
        yield pg_server.url(name)
    finally:
        with psycopg.connect(pg_server.url(), autocommit=True) as admin:
            # FORCE: a daemon the test left running must not keep the database.
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
