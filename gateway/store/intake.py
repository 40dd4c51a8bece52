"""Intake: accepted messages committed with group commit, before the 250.

Also what identifies a message cheaply from its bytes: the header block, the
Message-ID, the dedup key ("the same message delivered again") and content digests.
A message larger than spool_threshold arrives as a spool file and is copied into the
database in chunks.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiosqlite

from gateway.errors import StoreError
from gateway.model import Inbound, InboundState
from gateway.intake_signal import IntakeSignal
from gateway.store.connection import gated, iso, run_on_thread
from gateway.store.dialect import is_postgres

log = logging.getLogger(__name__)

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


def body_digest(raw: bytes) -> str:
    """The content of a message without its header block (line ends normalised)."""
    end = _HEADER_END.search(raw)
    body = raw[end.end():] if end else b""
    return hashlib.sha256(body.replace(b"\r\n", b"\n")).hexdigest()


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

    def __init__(self, conn: aiosqlite.Connection,
                 on_commit: Callable[[], None] | None = None,
                 signal: IntakeSignal | None = None) -> None:
        """`signal`: tells the processing workers while a commit wants the write lock."""
        self._conn = conn
        self._signal = signal
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
        if is_postgres(conn):
            return await _write_batch_postgres(conn, batch)
        async with gated(conn, intake=True):
            if self._signal is None:
                return await run_on_thread(conn, lambda db: _write_batch(db, batch))
            with self._signal.writing():
                return await run_on_thread(conn, lambda db: _write_batch(db, batch))


# How often intake tries for SQLite's write lock while another connection holds it.
INTAKE_LOCK_POLL_SECONDS = 0.0005


def _begin_first(db: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, ahead of the other processes' writers.

    Processing workers and the mail process write from processes of their own, so the
    in-process write gate cannot put intake first. SQLite's busy handler sleeps 1, 2,
    5, 10, 15 ms... between tries: a 250 waited out a worker's commit and then most of a
    sleep step. Intake tries every half millisecond instead (the others keep the
    handler's steps), within the connection's busy_timeout as before."""
    timeout_ms = db.execute("PRAGMA busy_timeout").fetchone()[0]
    deadline = time.monotonic() + timeout_ms / 1000
    db.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() >= deadline:
                    raise
            time.sleep(INTAKE_LOCK_POLL_SECONDS)
    finally:
        db.execute(f"PRAGMA busy_timeout = {timeout_ms}")


def _write_batch(db: sqlite3.Connection, items: list[Pending]) -> list[Stored]:
    """BEGIN IMMEDIATE, the inserts, COMMIT; on the intake connection's thread."""
    _begin_first(db)
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
    d = _digests(Pending(inbound, outcome, spool))
    message_id, key, sha, size = d.message_id, d.key, d.sha256, d.size
    rows = db.execute(_INSERT_INBOUND, (message_id, key, sha, size, inbound.peer, inbound.mail_from, json.dumps(list(inbound.rcpt_tos)),
         iso(inbound.received_at), InboundState.DONE if outcome else InboundState.QUEUED, outcome,
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
    if merged != known and existing["state"] == InboundState.QUEUED:
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


# --- PostgreSQL ---------------------------------------------------------------------

_INSERT_INBOUND = (
    "INSERT INTO inbound (message_id, dedup_key, sha256, size, peer, mail_from,"
    " rcpt_tos, received_at, state, outcome, processed_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (dedup_key) DO NOTHING RETURNING id")


async def _write_batch_postgres(conn: aiosqlite.Connection, items: list[Pending]) -> list[Stored]:
    """The batch in one transaction, committed (synchronous_commit) before any 250.

    The same message arriving at two nodes at once (two MX hosts, a resend) meets the
    unique dedup key: one insert wins, the other finds the winner's row (a plain
    `ON CONFLICT DO NOTHING` waits for the other transaction, so the row is there).
    No write lock: intake never waits for a ticket change. The workers are woken by
    the schema's NOTIFY trigger, with the commit."""
    prepared = [_digests(item) if item.spool is None and len(item.inbound.raw) < INLINE_DIGEST
                else await asyncio.to_thread(_digests, item) for item in items]
    if len(items) == 1:
        # One message (a lone sender, a quiet moment): one statement, its own commit,
        # one round trip.
        return [await _insert_postgres(conn, items[0], prepared[0])]
    await conn.execute("BEGIN")
    try:
        results = [await _insert_postgres(conn, item, digests)
                   for item, digests in zip(items, prepared, strict=True)]
        await conn.execute("COMMIT")
    except BaseException:
        try:
            await conn.execute("ROLLBACK")
        except sqlite3.Error:  # the original error matters more
            pass
        raise
    return results


# The row and its raw bytes in one statement (one round trip); no row back when the
# dedup key is taken (the same message stored before, maybe by another node).
_INSERT_WITH_RAW = (f"WITH new AS ({_INSERT_INBOUND})"
                    " INSERT INTO inbound_raw (id, raw) SELECT id, ? FROM new RETURNING id")


INLINE_DIGEST = 256 * 1024  # larger messages are hashed on a thread, off the event loop


@dataclass(frozen=True, slots=True)
class _Digests:
    message_id: str
    key: str
    sha256: str
    size: int


def _digests(item: Pending) -> _Digests:
    """What identifies the message (off the event loop: hashing a large one)."""
    inbound, spool = item.inbound, item.spool
    message_id = extract_message_id(inbound.raw)
    if spool is None:
        return _Digests(message_id, dedup_key(inbound.raw, message_id),
                        hashlib.sha256(inbound.raw).hexdigest(), len(inbound.raw))
    with open(spool.path, "rb") as fh:
        key = dedup_key_of(fh, message_id)
        fh.seek(0)
        sha = sha256_of(fh)
        return _Digests(message_id, key, sha, fh.tell())


async def _insert_postgres(conn: aiosqlite.Connection, item: Pending, d: _Digests) -> Stored:
    inbound, outcome = item.inbound, item.outcome
    if item.spool is None:
        raw = inbound.raw
    else:
        # PostgreSQL has no incremental blob writes: the bytes go in one value
        # (max_message_size bounds it).
        raw = await asyncio.to_thread(item.spool.path.read_bytes)
        if len(raw) != d.size:
            raise StoreError(f"spool file {item.spool.path} changed while it was stored")
    rows = list(await conn.execute_fetchall(_INSERT_WITH_RAW, (
        d.message_id, d.key, d.sha256, d.size, inbound.peer, inbound.mail_from,
        json.dumps(list(inbound.rcpt_tos)), iso(inbound.received_at),
        InboundState.DONE if outcome else InboundState.QUEUED, outcome,
        iso(inbound.received_at) if outcome else None, raw)))
    if rows:
        return Stored(rows[0][0], duplicate=False, message_id=d.message_id)
    existing = list(await conn.execute_fetchall(
        "SELECT id, rcpt_tos, state FROM inbound WHERE dedup_key = ? FOR UPDATE", (d.key,)))[0]
    known = json.loads(existing["rcpt_tos"])
    merged = known + [r for r in inbound.rcpt_tos if r not in known]
    if merged != known and existing["state"] == InboundState.QUEUED:
        await conn.execute("UPDATE inbound SET rcpt_tos = ? WHERE id = ?",
                           (json.dumps(merged), existing["id"]))
    return Stored(existing["id"], duplicate=True, message_id=d.message_id)
