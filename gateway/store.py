"""The only aiosqlite user: migrations, inbound messages, tickets, held mail, outbox.

Every connection runs SQLite in WAL mode with `synchronous=FULL`, so a commit is on
disk (the WAL fsync'd) before it returns: an acknowledged message survives power loss,
not only a crash of this process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import io
import re
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import aiosqlite

from gateway.errors import SchemaTooNewError, StoreError
from gateway.model import Inbound

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


# --- migrations -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> tuple[Migration, ...]:
    """The numbered .sql files shipped with the package, in order."""
    found = []
    for entry in resources.files("gateway.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise StoreError(f"migrations are not numbered 0001..{len(found):04d}: {versions}")
    return tuple(found)


def split_statements(sql: str) -> list[str]:
    """Split a script into complete statements (sqlite3 knows where one ends)."""
    statements, buffer = [], ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
            ln.strip().startswith("--") or not ln.strip() for ln in buffer.splitlines()):
        raise StoreError(f"incomplete SQL statement at the end of a migration: {buffer[:60]!r}")
    return statements


async def connect(path: Path) -> aiosqlite.Connection:
    """A connection in autocommit mode: transactions are explicit BEGIN/COMMIT."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = await aiosqlite.connect(path, isolation_level=None)
    except sqlite3.Error as err:
        raise StoreError(f"{path}: cannot open database: {err}") from None
    conn.row_factory = aiosqlite.Row
    try:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
        if mode and mode[0][0].lower() != "wal":
            log.warning("database %s: journal_mode is %s, not WAL", path, mode[0][0])
        await conn.execute("PRAGMA synchronous = FULL")
        await conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as err:
        await conn.close()
        raise StoreError(f"{path}: cannot use database: {err}") from None
    return conn


async def schema_version(conn: aiosqlite.Connection) -> int:
    rows = await conn.execute_fetchall(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'")
    if not rows:
        return 0
    rows = list(await conn.execute_fetchall("SELECT max(version) FROM schema_version"))
    return rows[0][0] or 0


async def migrate(conn: aiosqlite.Connection) -> list[str]:
    """Apply the migrations the database lacks, each in its own transaction.

    Refuses a database newer than the code. Safe against a concurrent migrate: the
    version is read again under the write lock.
    """
    migrations = load_migrations()
    latest = migrations[-1].version if migrations else 0
    applied: list[str] = []
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
    for migration in migrations:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            current = await schema_version(conn)
            if current > latest:
                raise SchemaTooNewError(
                    f"database schema version {current} is newer than this gateway "
                    f"(knows up to {latest}): upgrade s4e-gateway, do not downgrade")
            if migration.version <= current:
                await conn.execute("ROLLBACK")
                continue
            for statement in split_statements(migration.sql):
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, iso(utcnow())))
            await conn.execute("COMMIT")
            applied.append(migration.name)
            log.info("migration %s applied", migration.name)
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
    current = await schema_version(conn)
    if current > latest:
        raise SchemaTooNewError(
            f"database schema version {current} is newer than this gateway "
            f"(knows up to {latest}): upgrade s4e-gateway, do not downgrade")
    return applied


async def check_schema(conn: aiosqlite.Connection) -> None:
    """For commands that must not migrate: the schema must be exactly current."""
    migrations = load_migrations()
    latest = migrations[-1].version if migrations else 0
    current = await schema_version(conn)
    if current > latest:
        raise SchemaTooNewError(
            f"database schema version {current} is newer than this gateway "
            f"(knows up to {latest}): upgrade s4e-gateway, do not downgrade")
    if current < latest:
        raise StoreError(
            f"database schema version {current} is older than this gateway ({latest}): "
            "run `s4e-gateway migrate`")


async def setting(conn: aiosqlite.Connection, key: str, create: Any) -> str:
    """A value kept with the data, made by `create()` the first time it is asked for."""
    await conn.execute("INSERT OR IGNORE INTO settings (key, value) VALUES (?, ?)",
                       (key, create()))
    rows = list(await conn.execute_fetchall("SELECT value FROM settings WHERE key = ?", (key,)))
    return rows[0][0]


# --- write order ------------------------------------------------------------------

class WriteGate:
    """The order in which this process's connections take SQLite's one write lock:
    the intake writer first, then the others in arrival order.

    Without it a connection that finds the lock taken sleeps in SQLite's busy handler
    (1, 2, 5, 10, 15, 20, 25... ms), so a 250 waits out the processor's transaction
    and then the rest of a sleep step. With it the intake writer waits on a future
    that is resolved the moment the holder commits, ahead of the processor and the
    mailer. Other processes (the CLI) still meet busy_timeout.
    """

    def __init__(self) -> None:
        self._held = False
        self._intake: deque[asyncio.Future[None]] = deque()
        self._others: deque[asyncio.Future[None]] = deque()

    @asynccontextmanager
    async def hold(self, *, intake: bool = False) -> AsyncIterator[None]:
        await self._acquire(intake)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, intake: bool) -> None:
        if not self._held and not self._intake and (intake or not self._others):
            self._held = True
            return
        waiters = self._intake if intake else self._others
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # handed over just as we were cancelled: pass it on
            else:
                waiters.remove(future)
            raise

    def _release(self) -> None:
        for waiters in (self._intake, self._others):
            while waiters:
                future = waiters.popleft()
                if not future.done():
                    future.set_result(None)  # handed over: stays held
                    return
        self._held = False


def share_write_gate(*conns: aiosqlite.Connection) -> WriteGate:
    """Make these connections (one process, one database) take turns via one gate."""
    gate = WriteGate()
    for conn in conns:
        conn.write_gate = gate  # type: ignore[attr-defined]
    return gate


@asynccontextmanager
async def gated(conn: aiosqlite.Connection, *, intake: bool = False) -> AsyncIterator[None]:
    """Hold `conn`'s write gate, if it has one, around a write (a no-op inside a
    transaction: Tx holds it already)."""
    gate: WriteGate | None = getattr(conn, "write_gate", None)
    if gate is None or conn.in_transaction:
        yield
        return
    async with gate.hold(intake=intake):
        yield


# --- intake -----------------------------------------------------------------------

_TRACE_HEADERS = frozenset({
    b"received", b"return-path", b"delivered-to", b"x-original-to", b"x-envelope-to",
    b"x-received", b"arc-seal", b"arc-message-signature", b"arc-authentication-results",
    b"authentication-results", b"received-spf", b"x-spam-status", b"x-spam-score",
    b"x-spam-flag", b"x-virus-scanned",
})
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.I | re.M)


def header_block(raw: bytes) -> bytes:
    match = _HEADER_END.search(raw)
    return raw[:match.start()] if match else raw


def extract_message_id(raw: bytes) -> str:
    """The Message-ID header's `<...>`, cheaply, from the header block; "" if none."""
    match = _MESSAGE_ID.search(header_block(raw)[:256 * 1024])
    if not match:
        return ""
    value = re.sub(rb"\s+", b"", match.group(1))
    angle = re.search(rb"<[^<>]+>", value)
    text = (angle.group(0) if angle else value).decode("ascii", "replace")
    return text[:998]


RAW_CHUNK = 1024 * 1024


def dedup_key(raw: bytes, message_id: str) -> str:
    """Identifies "the same message delivered again": its Message-ID and content,
    ignoring the trace headers each hop adds (Received, Return-Path...)."""
    return dedup_key_of(io.BytesIO(raw), message_id)


def dedup_key_of(stream: BinaryIO, message_id: str) -> str:
    """dedup_key of the message read from `stream` in chunks (a spooled message is
    never read whole into memory)."""
    head, body_start = _read_header_block(stream)
    digest = hashlib.sha256(message_id.encode("utf-8", "replace") + b"\0")
    keep = True
    for line in re.split(rb"\r?\n", head):
        if line[:1] in (b" ", b"\t"):
            if keep:
                digest.update(line.strip() + b"\n")
            continue
        name = line.split(b":", 1)[0].strip().lower()
        keep = name not in _TRACE_HEADERS
        if keep:
            digest.update(line.rstrip() + b"\n")
    digest.update(b"\0")
    # The body with CRLF as LF, chunk by chunk (a CR at a chunk's end waits for the next).
    pending = b""
    chunk = body_start
    while True:
        if chunk:
            data = pending + chunk
            pending = b"\r" if data.endswith(b"\r") else b""
            digest.update((data[:-1] if pending else data).replace(b"\r\n", b"\n"))
        chunk = stream.read(RAW_CHUNK)
        if not chunk:
            break
    digest.update(pending)
    return digest.hexdigest()


def _read_header_block(stream: BinaryIO) -> tuple[bytes, bytes]:
    """(the header block, what was read of the body) as header_block() splits them."""
    data = b""
    while True:
        chunk = stream.read(RAW_CHUNK)
        data += chunk
        match = _HEADER_END.search(data)
        # A match that touches the end might grow with the next chunk ("\n\r" + "\n").
        if match and (match.end() < len(data) or not chunk):
            return data[:match.start()], data[match.end():]
        if not chunk:
            return data, b""


def sha256_of(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(RAW_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Spool:
    """A message larger than spool_threshold, in a file while it waits for its commit
    (the edge deletes the file after the 250; the database holds the bytes)."""

    path: Path
    size: int


@dataclass(frozen=True, slots=True)
class Pending:
    inbound: Inbound
    outcome: str | None
    spool: Spool | None = None  # then inbound.raw is only the head


@dataclass(frozen=True, slots=True)
class Stored:
    id: int
    duplicate: bool
    message_id: str = ""  # as extracted for the row (for the intake log line)


class IntakeWriter:
    """Commits accepted messages with group commit.

    Sessions hand their message over and wait; the writer takes everything queued
    since its last commit into one fsync'd transaction as soon as it is free (no
    fixed wait, so a lone sender is not slowed down). Each session is answered only
    after the transaction holding its own message committed.
    """

    def __init__(self, conn: aiosqlite.Connection, on_commit: Any = None) -> None:
        self._conn = conn
        self._queue: asyncio.Queue[tuple[Pending, asyncio.Future[Stored]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._on_commit = on_commit

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="intake-writer")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(StoreError("gateway shutting down"))

    async def store(self, inbound: Inbound, outcome: str | None = None, *,
                    spool: Spool | None = None) -> Stored:
        """Commit `inbound`; with an `outcome` it is stored as already routed (mail
        refused at the end of DATA is kept for the record, never processed). With a
        `spool`, the message's bytes are that file's (inbound.raw is only its head);
        they are copied into the database in chunks inside the same commit."""
        if self._task is None or self._task.done():
            raise StoreError("intake writer is not running")
        future: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()
        await self._queue.put((Pending(inbound, outcome, spool), future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            live = [(item, fut) for item, fut in batch if not fut.done()]
            if not live:
                continue
            try:
                results = await self._write([item for item, _ in live])
            except asyncio.CancelledError:
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(StoreError("gateway shutting down"))
                raise
            except Exception as err:  # noqa: BLE001 - every failure becomes a 451
                if len(live) == 1:
                    live[0][1].set_exception(err)
                    continue
                # One bad message must not fail its neighbours: retry one by one.
                log.warning("group commit of %d messages failed (%s); retrying singly",
                            len(live), err)
                for item, fut in live:
                    try:
                        (result,) = await self._write([item])
                    except Exception as single:  # noqa: BLE001
                        if not fut.done():
                            fut.set_exception(single)
                    else:
                        if not fut.done():
                            fut.set_result(result)
                if self._on_commit:
                    self._on_commit()
                continue
            for (_, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
            if self._on_commit:
                self._on_commit()

    async def _write(self, items: Iterable[Pending]) -> list[Stored]:
        """The whole batch in one trip to the connection's thread.

        Each aiosqlite call is a hand-over to that thread and back (two GIL
        switches): with BEGIN, two statements per message and COMMIT that cost more
        CPU than SQLite itself. The hashing runs there too, off the event loop
        (hashlib releases the GIL on large data).
        """
        batch = list(items)
        conn = self._conn
        async with gated(conn, intake=True):
            # aiosqlite has no public "run this on the connection's thread"; _execute
            # is what all of its own methods go through (aiosqlite>=0.20, see pyproject).
            return await conn._execute(_write_batch, conn._conn, batch)


def _write_batch(db: sqlite3.Connection, items: list[Pending]) -> list[Stored]:
    """BEGIN IMMEDIATE, the inserts, COMMIT; on the intake connection's thread."""
    db.execute("BEGIN IMMEDIATE")
    try:
        results = [_insert_inbound(db, item.inbound, item.outcome, item.spool)
                   for item in items]
        db.execute("COMMIT")
    except BaseException:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:  # the original error matters more
            pass
        raise
    return results


def _insert_inbound(db: sqlite3.Connection, inbound: Inbound, outcome: str | None,
                    spool: Spool | None = None) -> Stored:
    message_id = extract_message_id(inbound.raw)
    if spool is None:
        key = dedup_key(inbound.raw, message_id)
        sha, size = hashlib.sha256(inbound.raw).hexdigest(), len(inbound.raw)
    else:
        with open(spool.path, "rb") as fh:
            key = dedup_key_of(fh, message_id)
            fh.seek(0)
            sha = sha256_of(fh)
            size = fh.tell()
    rows = db.execute(
        "INSERT INTO inbound (message_id, dedup_key, sha256, size, peer, mail_from,"
        " rcpt_tos, received_at, state, outcome, processed_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
        (message_id, key, sha, size, inbound.peer, inbound.mail_from, json.dumps(list(inbound.rcpt_tos)),
         iso(inbound.received_at), "done" if outcome else "queued", outcome,
         iso(inbound.received_at) if outcome else None)).fetchall()
    if rows:
        row_id = rows[0][0]
        if spool is None:
            db.execute("INSERT INTO inbound_raw (id, raw) VALUES (?, ?)", (row_id, inbound.raw))
        else:
            _copy_spool(db, row_id, spool.path, size)
        return Stored(row_id, duplicate=False, message_id=message_id)
    # Delivered before: keep one copy, but remember every address it was sent to.
    existing = db.execute(
        "SELECT id, rcpt_tos, state FROM inbound WHERE dedup_key = ?", (key,)).fetchone()
    known = json.loads(existing["rcpt_tos"])
    merged = known + [r for r in inbound.rcpt_tos if r not in known]
    if merged != known and existing["state"] == "queued":
        db.execute("UPDATE inbound SET rcpt_tos = ? WHERE id = ?",
                   (json.dumps(merged), existing["id"]))
    return Stored(existing["id"], duplicate=True, message_id=message_id)


def _copy_spool(db: sqlite3.Connection, row_id: int, path: Path, size: int) -> None:
    """The spool file into inbound_raw in RAW_CHUNK pieces (zeroblob, then blobopen):
    memory stays at one chunk whatever the message's size."""
    db.execute("INSERT INTO inbound_raw (id, raw) VALUES (?, zeroblob(?))", (row_id, size))
    with open(path, "rb") as fh, db.blobopen("inbound_raw", "raw", row_id) as blob:
        while chunk := fh.read(RAW_CHUNK):
            blob.write(chunk)
        if blob.tell() != size:
            raise StoreError(f"spool file {path} changed while it was stored")


# --- inbound queue ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class InboundRow:
    id: int
    message_id: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    received_at: str
    size: int
    state: str
    attempts: int
    outcome: str | None
    ticket: int | None
    error: str | None
    peer: str = ""
    auth: str | None = None  # the sender verdict, once processed
    auth_reason: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> InboundRow:
        return cls(row["id"], row["message_id"], row["mail_from"],
                   tuple(json.loads(row["rcpt_tos"])), row["received_at"], row["size"],
                   row["state"], row["attempts"], row["outcome"], row["ticket"], row["error"],
                   row["peer"], row["auth"], row["auth_reason"])

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "message_id": self.message_id, "mail_from": self.mail_from,
                "rcpt_tos": list(self.rcpt_tos), "received_at": self.received_at,
                "size": self.size, "outcome": self.outcome,
                "ticket": None if self.ticket is None else f"{self.ticket:06d}"}


_INBOUND_COLUMNS = ("id, message_id, mail_from, rcpt_tos, received_at, size, state,"
                    " attempts, outcome, ticket, error, peer, auth, auth_reason")


async def recover_inbound(conn: aiosqlite.Connection, slot: int | None = None) -> int:
    """Rows a crash left mid-way go back to the queue: all of them (no worker is
    running), or those of one worker slot (that worker died and is starting again)."""
    if slot is None:
        cursor = await conn.execute(
            "UPDATE inbound SET state = 'queued', claimed_by = NULL WHERE state = 'processing'")
    else:
        cursor = await conn.execute(
            "UPDATE inbound SET state = 'queued', claimed_by = NULL"
            " WHERE state = 'processing' AND claimed_by = ?", (slot,))
    return cursor.rowcount


async def claim_inbound(conn: aiosqlite.Connection,
                        slot: int | None = None) -> InboundRow | None:
    """Take the oldest queued message (in arrival order) for processing, for worker
    `slot` (None: this process)."""
    async with gated(conn):
        rows = list(await conn.execute_fetchall(
            "UPDATE inbound SET state = 'processing', attempts = attempts + 1, claimed_by = ?"
            " WHERE id = (SELECT id FROM inbound WHERE state = 'queued' ORDER BY id LIMIT 1)"
            f" AND state = 'queued' RETURNING {_INBOUND_COLUMNS}", (slot,)))
    return InboundRow.from_row(rows[0]) if rows else None


async def read_raw(conn: aiosqlite.Connection, inbound_id: int,
                   attachments: Path | None = None) -> bytes:
    """The message exactly as received. Its attachment bytes live in the files under
    `attachments` ([storage] attachments) and are put back (SPEC §12: stored once)."""
    rows = list(await conn.execute_fetchall(
        "SELECT r.raw, r.spans, i.raw_dropped_at FROM inbound i"
        " LEFT JOIN inbound_raw r ON r.id = i.id WHERE i.id = ?", (inbound_id,)))
    if not rows or rows[0][0] is None:
        if rows and rows[0][2]:
            raise StoreError(f"inbound message {inbound_id}: raw mail dropped on "
                             f"{rows[0][2][:10]} (storage.keep_raw); text and attachments kept")
        raise StoreError(f"inbound message {inbound_id}: raw bytes missing")
    raw, spans = bytes(rows[0][0]), rows[0][1]
    if not spans:
        return raw
    from gateway import attachments as files

    if attachments is None:
        raise StoreError(f"inbound message {inbound_id}: its attachments are stored as files;"
                         " read_raw needs the attachments folder")
    try:
        return files.restore_raw(raw, files.spans_from_json(spans),
                                 lambda sha: files.read_attachment(attachments, sha))
    except files.AttachmentMissing as err:
        raise StoreError(f"inbound message {inbound_id}: {err}") from None


async def store_cut_raw(conn: aiosqlite.Connection, inbound_id: int, raw: bytes,
                        spans: str) -> None:
    """Keep the raw without its attachment bytes (already safe in their files)."""
    await conn.execute("UPDATE inbound_raw SET raw = ?, spans = ? WHERE id = ?",
                       (raw, spans, inbound_id))


async def mark_inbound(conn: aiosqlite.Connection, inbound_id: int, *, state: str,
                       outcome: str | None, ticket: int | None = None,
                       error: str | None = None, report: str | None = None,
                       auth: str | None = None, auth_reason: str | None = None) -> None:
    await conn.execute(
        "UPDATE inbound SET state = ?, outcome = ?, ticket = ?, error = ?,"
        " report = coalesce(?, report), auth = coalesce(?, auth),"
        " auth_reason = coalesce(?, auth_reason), processed_at = ? WHERE id = ?",
        (state, outcome, ticket, error, report, auth, auth_reason, iso(utcnow()), inbound_id))


async def list_inbound(conn: aiosqlite.Connection, outcome: str | None = None,
                       limit: int | None = None) -> list[InboundRow]:
    sql = f"SELECT {_INBOUND_COLUMNS} FROM inbound"
    params: list[Any] = []
    if outcome:
        sql += " WHERE outcome = ?"
        params.append(outcome)
    sql += " ORDER BY id"
    if limit:
        sql += " LIMIT ?"
        params.append(limit)
    return [InboundRow.from_row(r) for r in await conn.execute_fetchall(sql, params)]


async def get_inbound(conn: aiosqlite.Connection, inbound_id: int) -> InboundRow | None:
    rows = list(await conn.execute_fetchall(
        f"SELECT {_INBOUND_COLUMNS} FROM inbound WHERE id = ?", (inbound_id,)))
    return InboundRow.from_row(rows[0]) if rows else None


async def list_inbound_for_address(conn: aiosqlite.Connection,
                                   address: str) -> list[InboundRow]:
    """Messages whose envelope sender, an envelope recipient or From header is
    `address` (case-insensitive), oldest first."""
    address = address.strip().lower()
    sql = (f"SELECT {_INBOUND_COLUMNS} FROM inbound WHERE lower(mail_from) = ?"
           " OR lower(json_extract(report, '$.sender')) = ?"
           " OR EXISTS (SELECT 1 FROM json_each(inbound.rcpt_tos) WHERE lower(value) = ?)"
           " ORDER BY id")
    return [InboundRow.from_row(r)
            for r in await conn.execute_fetchall(sql, (address, address, address))]


async def inbound_details(conn: aiosqlite.Connection, inbound_id: int) -> Any | None:
    """Everything stored about one inbound message except its raw bytes."""
    rows = list(await conn.execute_fetchall(
        "SELECT id, message_id, sha256, size, peer, mail_from, rcpt_tos, received_at, state,"
        " attempts, outcome, ticket, error, report, processed_at, auth, auth_reason"
        " FROM inbound WHERE id = ?", (inbound_id,)))
    return rows[0] if rows else None


async def inbound_report(conn: aiosqlite.Connection, inbound_id: int) -> dict[str, Any]:
    """The parsed report stored with a processed inbound message ({} when none)."""
    rows = list(await conn.execute_fetchall("SELECT report FROM inbound WHERE id = ?", (inbound_id,)))
    if not rows or not rows[0][0]:
        return {}
    try:
        value = json.loads(rows[0][0])
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def requeue_inbound(conn: aiosqlite.Connection, inbound_id: int) -> bool:
    cursor = await conn.execute(
        "UPDATE inbound SET state = 'queued', attempts = 0 WHERE id = ?"
        " AND state != 'processing'", (inbound_id,))
    return cursor.rowcount == 1


async def count_inbound_by_state(conn: aiosqlite.Connection) -> dict[str, int]:
    rows = await conn.execute_fetchall("SELECT state, count(*) FROM inbound GROUP BY state")
    return {r[0]: r[1] for r in rows}


# --- outbox -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    ticket: int | None
    inbound_id: int | None
    kind: str
    message_id: str
    mail_from: str
    rcpt_to: str
    subject: str
    auto: bool
    status: str
    attempts: int
    next_attempt_at: str
    last_error: str | None
    queued_at: str
    created_at: str
    sent_at: str | None

    @classmethod
    def from_row(cls, row: Any) -> OutboxRow:
        return cls(row["id"], row["ticket"], row["inbound_id"], row["kind"], row["message_id"],
                   row["mail_from"], row["rcpt_to"], row["subject"], bool(row["auto"]),
                   row["status"], row["attempts"], row["next_attempt_at"], row["last_error"],
                   row["queued_at"], row["created_at"], row["sent_at"])

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "ticket": None if self.ticket is None else f"{self.ticket:06d}",
                "kind": self.kind, "from": self.mail_from, "to": self.rcpt_to,
                "subject": self.subject, "message_id": self.message_id, "status": self.status,
                "attempts": self.attempts, "next_attempt_at": self.next_attempt_at,
                "last_error": self.last_error, "created_at": self.created_at,
                "sent_at": self.sent_at}


_OUTBOX_COLUMNS = ("id, ticket, inbound_id, kind, message_id, mail_from, rcpt_to, subject, auto,"
                   " status, attempts, next_attempt_at, last_error, queued_at, created_at, sent_at")


async def enqueue_outbox(conn: aiosqlite.Connection, *, ticket: int | None,
                         inbound_id: int | None, kind: str, message_id: str, mail_from: str,
                         rcpt_to: str, subject: str, auto: bool, raw: bytes,
                         now: datetime, topic: str = "") -> int:
    """Queue one composed mail; call inside the transaction of the change causing it."""
    rows = list(await conn.execute_fetchall(
        "INSERT INTO outbox (ticket, inbound_id, kind, message_id, mail_from, rcpt_to, subject,"
        " auto, next_attempt_at, queued_at, created_at, topic, rcpt_key)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (ticket, inbound_id, kind, message_id, mail_from, rcpt_to, subject, int(auto),
         iso(now), iso(now), iso(now), topic, address_key(rcpt_to))))
    outbox_id = rows[0][0]
    await conn.execute("INSERT INTO outbox_raw (id, raw) VALUES (?, ?)", (outbox_id, raw))
    return outbox_id


async def recover_outbox(conn: aiosqlite.Connection) -> int:
    """Rows a crash left "sending" go back to due. The relay may have taken the mail
    already: it goes again with the same Message-ID, the same mail, never another."""
    cursor = await conn.execute(
        "UPDATE outbox SET status = 'pending' WHERE status = 'sending'")
    return cursor.rowcount


async def claim_due_outbox(conn: aiosqlite.Connection, now: datetime) -> OutboxRow | None:
    async with gated(conn):
        rows = list(await conn.execute_fetchall(
            "UPDATE outbox SET status = 'sending', attempts = attempts + 1"
            " WHERE id = (SELECT id FROM outbox WHERE status = 'pending' AND next_attempt_at <= ?"
            # Parallel sessions keep one ticket's mails in order: none while another
            # of that ticket is being sent.
            "             AND (ticket IS NULL OR ticket NOT IN (SELECT ticket FROM outbox"
            "                  WHERE status = 'sending' AND ticket IS NOT NULL))"
            "             ORDER BY next_attempt_at, id LIMIT 1)"
            f" AND status = 'pending' RETURNING {_OUTBOX_COLUMNS}", (iso(now),)))
    return OutboxRow.from_row(rows[0]) if rows else None


async def next_outbox_due(conn: aiosqlite.Connection) -> datetime | None:
    rows = list(await conn.execute_fetchall(
        "SELECT min(next_attempt_at) FROM outbox WHERE status = 'pending'"))
    return datetime.fromisoformat(rows[0][0]) if rows and rows[0][0] else None


async def read_outbox_raw(conn: aiosqlite.Connection, outbox_id: int) -> bytes:
    rows = list(await conn.execute_fetchall("SELECT raw FROM outbox_raw WHERE id = ?", (outbox_id,)))
    if not rows:
        raise StoreError(f"outbox {outbox_id}: raw bytes missing")
    return bytes(rows[0][0])


async def mark_outbox_sent(conn: aiosqlite.Connection, outbox_id: int, now: datetime) -> None:
    async with gated(conn):
        await conn.execute(
            "UPDATE outbox SET status = 'sent', sent_at = ?, last_error = NULL WHERE id = ?",
            (iso(now), outbox_id))


async def mark_outbox_retry(conn: aiosqlite.Connection, outbox_id: int, next_at: datetime,
                            error: str) -> None:
    await conn.execute(
        "UPDATE outbox SET status = 'pending', next_attempt_at = ?, last_error = ? WHERE id = ?",
        (iso(next_at), error[:1000], outbox_id))


async def mark_outbox_failed(conn: aiosqlite.Connection, outbox_id: int, error: str) -> None:
    await conn.execute(
        "UPDATE outbox SET status = 'failed', last_error = ? WHERE id = ?",
        (error[:1000], outbox_id))


async def retry_outbox(conn: aiosqlite.Connection, outbox_id: int, now: datetime) -> bool:
    """An operator's `outbox retry`: a failed (or bounced) row is due again now, with a
    fresh give_up_after window."""
    cursor = await conn.execute(
        "UPDATE outbox SET status = 'pending', next_attempt_at = ?, queued_at = ?, attempts = 0"
        " WHERE id = ? AND status IN ('failed', 'bounced')", (iso(now), iso(now), outbox_id))
    return cursor.rowcount == 1


async def get_outbox(conn: aiosqlite.Connection, outbox_id: int) -> OutboxRow | None:
    rows = list(await conn.execute_fetchall(
        f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id = ?", (outbox_id,)))
    return OutboxRow.from_row(rows[0]) if rows else None


async def list_outbox(conn: aiosqlite.Connection, status: str | None = None) -> list[OutboxRow]:
    sql = f"SELECT {_OUTBOX_COLUMNS} FROM outbox"
    params: list[Any] = []
    if status:
        sql += " WHERE status = ?"
        params.append(status)
    sql += " ORDER BY id"
    return [OutboxRow.from_row(r) for r in await conn.execute_fetchall(sql, params)]


async def outbox_for_inbound(conn: aiosqlite.Connection, inbound_id: int) -> list[OutboxRow]:
    """The answers a received message caused."""
    rows = await conn.execute_fetchall(
        f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE inbound_id = ? ORDER BY id", (inbound_id,))
    return [OutboxRow.from_row(r) for r in rows]


async def outbox_sizes_since(conn: aiosqlite.Connection, after_id: int) -> list[tuple[int, int]]:
    """(id, size of the composed mail) of the outbox rows after `after_id`."""
    rows = await conn.execute_fetchall(
        "SELECT id, length(raw) FROM outbox_raw WHERE id > ? ORDER BY id", (after_id,))
    return [(r[0], r[1]) for r in rows]


async def last_outbox_id(conn: aiosqlite.Connection) -> int:
    rows = list(await conn.execute_fetchall("SELECT coalesce(max(id), 0) FROM outbox"))
    return rows[0][0]


async def outbox_depth(conn: aiosqlite.Connection) -> tuple[int, str | None]:
    """How many mails wait to be sent, and since when the oldest waits."""
    rows = list(await conn.execute_fetchall(
        "SELECT count(*), min(queued_at) FROM outbox WHERE status IN ('pending', 'sending')"))
    return rows[0][0], rows[0][1]


class Tx:
    """`async with Tx(conn):` BEGIN IMMEDIATE ... COMMIT; ROLLBACK on any error."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def __aenter__(self) -> aiosqlite.Connection:
        self._gate = gated(self.conn)
        await self._gate.__aenter__()
        try:
            await self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            await self._gate.__aexit__(None, None, None)
            raise
        return self.conn

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                await self.conn.execute("COMMIT")
            else:
                try:
                    await self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
        finally:
            await self._gate.__aexit__(None, None, None)


# --- tickets ----------------------------------------------------------------------

TICKET_MIN, TICKET_MAX = 100_000, 999_999  # six digits without a leading zero


@dataclass(frozen=True, slots=True)
class TicketRow:
    number: int
    status: str
    subject: str
    reporter_name: str | None
    reporter_email: str
    reporter_phone: str | None
    install_address: str | None
    description: str | None
    serial_number: str | None
    commcell_id: str | None
    missing: tuple[str, ...]
    participants: tuple[str, ...]
    linked_to: int | None
    phone_confirmation_required: bool
    phone_confirmed: bool
    rating: int | None
    reporter_bounced: bool
    resolved_at: str | None
    closed_at: str | None
    closed_reason: str | None
    created_at: str
    updated_at: str
    assignee: str | None = None
    dispatcher: str | None = None  # gets a copy (Cc) of every mail of the ticket
    contact_email: str | None = None  # named in the report's body; never mailed
    rating_requested: bool = False
    last_customer_at: str | None = None
    last_staff_at: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> TicketRow:
        return cls(
            row["number"], row["status"], row["subject"], row["reporter_name"],
            row["reporter_email"], row["reporter_phone"], row["install_address"],
            row["description"], row["serial_number"], row["commcell_id"],
            tuple(json.loads(row["missing"])), tuple(json.loads(row["participants"])),
            row["linked_to"], bool(row["phone_confirmation_required"]),
            bool(row["phone_confirmed"]), row["rating"], bool(row["reporter_bounced"]),
            row["resolved_at"], row["closed_at"], row["closed_reason"], row["created_at"],
            row["updated_at"], row["assignee"], row["dispatcher"], row["contact_email"],
            bool(row["rating_requested"]), row["last_customer_at"], row["last_staff_at"])


async def get_ticket(conn: aiosqlite.Connection, number: int) -> TicketRow | None:
    rows = list(await conn.execute_fetchall("SELECT * FROM tickets WHERE number = ?", (number,)))
    return TicketRow.from_row(rows[0]) if rows else None


async def list_tickets(conn: aiosqlite.Connection, status: str | None = None) -> list[TicketRow]:
    sql, params = "SELECT * FROM tickets", []
    if status:
        sql += " WHERE status = ?"
        params.append(status)
    sql += " ORDER BY created_at, number"
    return [TicketRow.from_row(r) for r in await conn.execute_fetchall(sql, params)]


_SEARCH_TERM = re.compile(r'"([^"]*)"|(\S+)')


def search_expression(text: str) -> str:
    """User text as an FTS5 query that cannot break the MATCH syntax: each "quoted
    phrase" and each word becomes one quoted FTS5 string (a word also matches as a
    prefix), all of them required. "" when the text holds nothing to search for."""
    terms = []
    for phrase, word in _SEARCH_TERM.findall(text):
        term = (phrase or word).replace("ł", "l").replace("Ł", "L")
        if not any(c.isalnum() for c in term):
            continue
        quoted = '"' + term.replace('"', '""') + '"'
        terms.append(quoted if phrase else quoted + " *")
    return " AND ".join(terms)


@dataclass(frozen=True, slots=True)
class ListedTicket:
    ticket: TicketRow
    waiting_since: str | None  # the oldest customer message no staff reply followed


# The first customer message after the last staff reply: the customer waits since
# then. NULL when staff answered last (notices and internal notes answer nobody) and
# on closed tickets.
_WAITING_SINCE = """
    CASE WHEN t.status = 'closed' THEN NULL ELSE
    (SELECT m.date FROM ticket_messages m
      WHERE m.ticket = t.number AND m.kind = 'customer'
        AND m.id > coalesce((SELECT max(s.id) FROM ticket_messages s
                              WHERE s.ticket = t.number AND s.kind = 'staff_reply'), 0)
      ORDER BY m.id LIMIT 1) END"""


async def find_tickets(conn: aiosqlite.Connection, *, status: str | None = None,
                       assignee: str | None = None, search: str | None = None,
                       waiting: bool = False) -> list[ListedTicket]:
    """Tickets by status, assignee (case-insensitive) and full-text `search` (an
    expression from `search_expression`); `waiting`: only open tickets whose customer
    waits for an answer, oldest wait first; otherwise oldest ticket first."""
    where: list[str] = []
    params: list[Any] = []
    if status:
        where.append("t.status = ?")
        params.append(status)
    if assignee:
        where.append("lower(t.assignee) = lower(?)")
        params.append(assignee)
    if search is not None:
        where.append("t.number IN (SELECT rowid FROM ticket_search WHERE ticket_search MATCH ?"
                     " UNION SELECT ticket FROM message_search WHERE message_search MATCH ?)")
        params += [search, search]
    if waiting:
        where.append("t.status != 'closed'")
    sql = (f"SELECT t.*, {_WAITING_SINCE} AS waiting_since FROM tickets t"
           + (" WHERE " + " AND ".join(where) if where else ""))
    if waiting:
        sql = (f"SELECT * FROM ({sql}) WHERE waiting_since IS NOT NULL"
               " ORDER BY waiting_since, number")
    else:
        sql += " ORDER BY t.created_at, t.number"
    return [ListedTicket(TicketRow.from_row(r), r["waiting_since"])
            for r in await conn.execute_fetchall(sql, params)]


async def ticket_for_message_ids(conn: aiosqlite.Connection,
                                 message_ids: Iterable[str]) -> int | None:
    """The ticket a message we sent or received for it belongs to (newest id first)."""
    for message_id in message_ids:
        rows = list(await conn.execute_fetchall(
            "SELECT ticket FROM ticket_messages WHERE message_id = ? ORDER BY id DESC LIMIT 1",
            (message_id,)))
        if rows:
            return rows[0][0]
    return None


async def create_ticket(conn: aiosqlite.Connection, *, values: dict[str, Any],
                        now: datetime, draw: Any) -> int:
    """Insert a ticket under a fresh random number. `draw()` gives a candidate; numbers
    are never reused (tickets are never deleted) and a taken one is simply drawn again,
    so concurrent creators cannot collide (the PRIMARY KEY decides)."""
    columns = ", ".join(["number", *values, "created_at", "updated_at"])
    marks = ", ".join("?" * (len(values) + 3))
    for _ in range(1000):
        number = draw()
        rows = list(await conn.execute_fetchall(
            f"INSERT INTO tickets ({columns}) VALUES ({marks})"
            " ON CONFLICT (number) DO NOTHING RETURNING number",
            (number, *values.values(), iso(now), iso(now))))
        if rows:
            return rows[0][0]
    raise StoreError("no free ticket number found (the number space is nearly full)")


async def update_ticket(conn: aiosqlite.Connection, number: int, now: datetime,
                        **values: Any) -> None:
    sets = ", ".join(f"{name} = ?" for name in values)
    await conn.execute(f"UPDATE tickets SET {sets}, updated_at = ? WHERE number = ?",
                       (*values.values(), iso(now), number))


async def add_ticket_message(conn: aiosqlite.Connection, *, ticket: int, direction: str,
                             from_addr: str, to_addrs: Iterable[str], subject: str,
                             message_id: str, date: datetime, body: str = "",
                             inbound_id: int | None = None,
                             outbox_id: int | None = None, kind: str = "customer",
                             auth: str | None = None, author: str | None = None) -> None:
    await conn.execute(
        "INSERT INTO ticket_messages (ticket, direction, inbound_id, outbox_id, from_addr,"
        " to_addrs, subject, message_id, body, date, kind, auth, author)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (ticket, direction, inbound_id, outbox_id, from_addr, json.dumps(list(to_addrs)),
         subject, message_id, body, iso(date), str(kind), auth, author))


async def ticket_messages(conn: aiosqlite.Connection, ticket: int) -> list[Any]:
    return list(await conn.execute_fetchall(
        "SELECT * FROM ticket_messages WHERE ticket = ? ORDER BY date, id", (ticket,)))


async def ticket_thread(conn: aiosqlite.Connection, ticket: int) -> list[Any]:
    """The thread entries with the sender verdict of the inbound message each came
    from (`verdict`: NULL for entries of ours)."""
    return list(await conn.execute_fetchall(
        "SELECT m.*, CASE WHEN m.direction = 'out' THEN NULL"
        " WHEN m.inbound_id IS NULL THEN m.auth"
        " ELSE coalesce(m.auth, i.auth, 'none') END AS verdict"
        " FROM ticket_messages m LEFT JOIN inbound i ON i.id = m.inbound_id"
        " WHERE m.ticket = ? ORDER BY m.date, m.id", (ticket,)))


async def add_history(conn: aiosqlite.Connection, *, ticket: int, from_status: str | None,
                      to_status: str, actor: str, note: str | None, now: datetime) -> None:
    await conn.execute(
        "INSERT INTO ticket_history (ticket, from_status, to_status, actor, note, at)"
        " VALUES (?, ?, ?, ?, ?, ?)", (ticket, from_status, to_status, actor, note, iso(now)))


async def ticket_history(conn: aiosqlite.Connection, ticket: int) -> list[Any]:
    return list(await conn.execute_fetchall(
        "SELECT * FROM ticket_history WHERE ticket = ? ORDER BY id", (ticket,)))


async def replace_attachments(conn: aiosqlite.Connection, *, inbound_id: int,
                              ticket: int | None, items: Iterable[dict[str, Any]]) -> None:
    """The attachments of one inbound message (idempotent for reprocessing)."""
    await conn.execute("DELETE FROM attachments WHERE inbound_id = ?", (inbound_id,))
    for item in items:
        await conn.execute(
            "INSERT INTO attachments (id, ticket, inbound_id, filename, content_type, size,"
            " sha256, is_log) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (item["id"], ticket, inbound_id, item["filename"], item["content_type"],
             item["size"], item["sha256"], int(item["is_log"])))


async def ticket_attachments(conn: aiosqlite.Connection, ticket: int) -> list[Any]:
    return list(await conn.execute_fetchall(
        "SELECT * FROM attachments WHERE ticket = ? ORDER BY rowid", (ticket,)))


async def processed_with_message_id(conn: aiosqlite.Connection, message_id: str,
                                    exclude_id: int) -> list[InboundRow]:
    """Earlier inbound messages with this Message-ID that were already routed."""
    rows = await conn.execute_fetchall(
        f"SELECT {_INBOUND_COLUMNS} FROM inbound WHERE message_id = ? AND id < ?"
        " AND state = 'done' AND outcome IS NOT NULL"
        " AND outcome NOT IN ('duplicate', 'failed', 'closed_rejected')"
        " ORDER BY id LIMIT 20", (message_id, exclude_id))
    return [InboundRow.from_row(r) for r in rows]


def body_digest(raw: bytes) -> str:
    """The content of a message without its header block (line ends normalised)."""
    end = _HEADER_END.search(raw)
    body = raw[end.end():] if end else b""
    return hashlib.sha256(body.replace(b"\r\n", b"\n")).hexdigest()


async def sent_since(conn: aiosqlite.Connection, address: str, kind: str, topic: str,
                     since: datetime) -> bool:
    rows = await conn.execute_fetchall(
        "SELECT 1 FROM outbox WHERE rcpt_to = ? AND kind = ? AND topic = ? AND created_at >= ?"
        " LIMIT 1", (address, kind, topic, iso(since)))
    return bool(rows)


async def ticket_of_inbound(conn: aiosqlite.Connection, inbound_id: int) -> int | None:
    rows = list(await conn.execute_fetchall(
        "SELECT ticket FROM ticket_messages WHERE inbound_id = ? LIMIT 1", (inbound_id,)))
    return rows[0][0] if rows else None


async def answered(conn: aiosqlite.Connection, inbound_id: int, kind: str) -> bool:
    rows = await conn.execute_fetchall(
        "SELECT 1 FROM outbox WHERE inbound_id = ? AND kind = ? LIMIT 1", (inbound_id, kind))
    return bool(rows)


def address_key(address: str) -> str:
    """An address as the automatic-answer cap counts it: lower-case, without a +tag."""
    local, at, domain = address.strip().lower().rpartition("@")
    if not at:
        return address.strip().lower()
    return f"{local.split('+', 1)[0]}@{domain}"


async def auto_replies_since(conn: aiosqlite.Connection, addresses: Iterable[str],
                             since: datetime) -> int:
    """The most automatic answers any one of these addresses (a sender, a recipient)
    got for inbound mail since `since` (not the notices staff caused)."""
    wanted = sorted({address_key(a) for a in addresses if a})
    if not wanted:
        return 0
    marks = ", ".join("?" * len(wanted))
    rows = await conn.execute_fetchall(
        f"SELECT rcpt_key, count(*) FROM outbox WHERE rcpt_key IN ({marks}) AND auto = 1"
        " AND created_at >= ? AND inbound_id IS NOT NULL GROUP BY rcpt_key",
        (*wanted, iso(since)))
    return max((r[1] for r in rows), default=0)


async def mark_bounced(conn: aiosqlite.Connection, message_ids: Iterable[str],
                       reason: str = "bounced") -> list[int]:
    """A DSN reports on mail we sent: mark it bounced and flag the ticket's reporter
    address. Only rows already sent: a DSN never cancels mail not yet sent (a forged one
    could otherwise stop an acknowledgement for good). Returns the tickets concerned."""
    tickets = []
    for message_id in message_ids:
        rows = await conn.execute_fetchall(
            "UPDATE outbox SET status = 'bounced', last_error = ? WHERE message_id = ?"
            " AND status = 'sent' RETURNING ticket", (reason[:1000], message_id))
        for (ticket,) in rows:
            if ticket is not None:
                await conn.execute(
                    "UPDATE tickets SET reporter_bounced = 1 WHERE number = ?", (ticket,))
                tickets.append(ticket)
    return tickets


async def contract_hours(conn: aiosqlite.Connection, device_ids: Iterable[str]) -> int | None:
    """The shortest repair time of the contracts covering any of these devices."""
    best = None
    for device_id in device_ids:
        rows = list(await conn.execute_fetchall(
            "SELECT repair_hours FROM contracts WHERE device_id = ?", (device_id.strip(),)))
        if rows and (best is None or rows[0][0] < best):
            best = rows[0][0]
    return best


async def list_contracts(conn: aiosqlite.Connection) -> list[Any]:
    return list(await conn.execute_fetchall(
        "SELECT device_id, customer, repair_hours, imported_at FROM contracts"
        " ORDER BY device_id COLLATE NOCASE"))


# --- held -------------------------------------------------------------------------

async def add_held(conn: aiosqlite.Connection, *, inbound_id: int, ticket: int | None,
                   sender: str, subject: str, reason: str, now: datetime) -> None:
    await conn.execute(
        "INSERT INTO held (inbound_id, ticket, sender, subject, reason, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (inbound_id) DO NOTHING",
        (inbound_id, ticket, sender, subject, reason, iso(now)))


async def list_held(conn: aiosqlite.Connection, status: str | None = "held") -> list[Any]:
    sql, params = "SELECT * FROM held", []
    if status:
        sql += " WHERE status = ?"
        params.append(status)
    return list(await conn.execute_fetchall(sql + " ORDER BY id", params))


async def get_held(conn: aiosqlite.Connection, held_id: int) -> Any | None:
    rows = list(await conn.execute_fetchall("SELECT * FROM held WHERE id = ?", (held_id,)))
    return rows[0] if rows else None


async def decide_held(conn: aiosqlite.Connection, held_id: int, status: str,
                      now: datetime, *, actor: str | None = None) -> bool:
    cursor = await conn.execute(
        "UPDATE held SET status = ?, decided_at = ?, decided_by = ? WHERE id = ?"
        " AND status = 'held'", (status, iso(now), actor, held_id))
    return cursor.rowcount == 1


async def held_of_inbound(conn: aiosqlite.Connection, inbound_id: int) -> Any | None:
    rows = list(await conn.execute_fetchall("SELECT * FROM held WHERE inbound_id = ?", (inbound_id,)))
    return rows[0] if rows else None


# --- operations: gauges and health ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class QueueCounts:
    """What the gauges and /healthz show, read from the database at scrape time."""

    inbound_queued: int
    inbound_failed: int
    held: int
    outbox_waiting: int
    outbox_failed: int
    outbox_oldest_queued_at: str | None  # the oldest mail waiting to be sent
    outbox_oldest_due_at: str | None  # the longest-due mail not sent yet


async def queue_counts(conn: aiosqlite.Connection) -> QueueCounts:
    inbound = await count_inbound_by_state(conn)
    (held,) = list(await conn.execute_fetchall(
        "SELECT count(*) FROM held WHERE status = 'held'"))[0]
    waiting, oldest, due, failed = list(await conn.execute_fetchall(
        "SELECT count(*) FILTER (WHERE status IN ('pending', 'sending')),"
        " min(queued_at) FILTER (WHERE status IN ('pending', 'sending')),"
        " min(next_attempt_at) FILTER (WHERE status IN ('pending', 'sending')),"
        " count(*) FILTER (WHERE status = 'failed') FROM outbox"))[0]
    return QueueCounts(inbound.get("queued", 0) + inbound.get("processing", 0),
                       inbound.get("failed", 0), held, waiting, failed, oldest, due)


async def probe_write(conn: aiosqlite.Connection, now: datetime) -> None:
    """A real write, committed: raises when the database cannot be written (read-only,
    disk full, locked for longer than the connection's busy timeout)."""
    async with Tx(conn):
        await conn.execute("INSERT INTO settings (key, value) VALUES ('healthz_at', ?)"
                           " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                           (iso(now),))


async def drop_old_raw(conn: aiosqlite.Connection, closed_before: datetime, now: datetime,
                       limit: int = 200) -> int:
    """[storage] keep_raw: the raw mail (inbound, and outbound already sent) of tickets
    closed before `closed_before` is dropped; tickets, threads, attachment rows and
    files stay. At most `limit` inbound messages per call (short transactions)."""
    async with Tx(conn):
        rows = await conn.execute_fetchall(
            "SELECT i.id FROM inbound i JOIN tickets t ON t.number = i.ticket"
            " WHERE t.status = 'closed' AND t.closed_at < ? AND i.raw_dropped_at IS NULL"
            " AND i.state = 'done' LIMIT ?", (iso(closed_before), limit))
        ids = [r[0] for r in rows]
        for inbound_id in ids:
            await conn.execute("DELETE FROM inbound_raw WHERE id = ?", (inbound_id,))
            await conn.execute("UPDATE inbound SET raw_dropped_at = ? WHERE id = ?",
                               (iso(now), inbound_id))
        sent = list(await conn.execute_fetchall(
            "SELECT o.id FROM outbox o JOIN tickets t ON t.number = o.ticket"
            " WHERE t.status = 'closed' AND t.closed_at < ? AND o.status = 'sent'"
            " AND o.raw_dropped_at IS NULL LIMIT ?", (iso(closed_before), limit)))
        for (outbox_id,) in sent:
            await conn.execute("DELETE FROM outbox_raw WHERE id = ?", (outbox_id,))
            await conn.execute("UPDATE outbox SET raw_dropped_at = ? WHERE id = ?",
                               (iso(now), outbox_id))
    return len(ids) + len(sent)
