"""A ticket's thread (the messages in and out), its history of status changes and
its attachments."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiosqlite

from gateway.store.connection import iso
from gateway.store.dialect import insertion_order


@dataclass(frozen=True, slots=True)
class MessageRow:
    """One entry of a ticket's thread: a message received or sent, or a staff note."""

    id: int
    ticket: int
    direction: str  # "in" or "out"
    inbound_id: int | None
    outbox_id: int | None
    from_addr: str
    to_addrs: tuple[str, ...]
    subject: str
    message_id: str
    body: str
    date: str
    kind: str  # a MessageKind
    auth: str | None
    author: str | None
    # ticket_thread only: the sender verdict of the inbound message it came from
    # (None for entries of ours)
    verdict: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row, verdict: str | None = None) -> MessageRow:
        return cls(row["id"], row["ticket"], row["direction"], row["inbound_id"],
                   row["outbox_id"], row["from_addr"], tuple(json.loads(row["to_addrs"])),
                   row["subject"], row["message_id"], row["body"], row["date"], row["kind"],
                   row["auth"], row["author"], verdict)


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One change of a ticket (status, field, assignment...) and who made it."""

    id: int
    ticket: int
    from_status: str | None
    to_status: str
    actor: str
    note: str | None
    at: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> HistoryRow:
        return cls(row["id"], row["ticket"], row["from_status"], row["to_status"],
                   row["actor"], row["note"], row["at"])


@dataclass(frozen=True, slots=True)
class AttachmentRow:
    """An attachment of an inbound message; its bytes are a file named by sha256."""

    id: str
    ticket: int | None
    inbound_id: int | None
    filename: str  # as the sender wrote it: display data, never a path
    content_type: str
    size: int
    sha256: str
    is_log: bool

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> AttachmentRow:
        return cls(row["id"], row["ticket"], row["inbound_id"], row["filename"],
                   row["content_type"], row["size"], row["sha256"], bool(row["is_log"]))


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


async def ticket_messages(conn: aiosqlite.Connection, ticket: int) -> list[MessageRow]:
    return [MessageRow.from_row(r) for r in await conn.execute_fetchall(
        "SELECT * FROM ticket_messages WHERE ticket = ? ORDER BY date, id", (ticket,))]


async def ticket_thread(conn: aiosqlite.Connection, ticket: int) -> list[MessageRow]:
    """The thread entries with the sender verdict of the inbound message each came
    from (`verdict`: NULL for entries of ours)."""
    return [MessageRow.from_row(r, r["verdict"]) for r in await conn.execute_fetchall(
        "SELECT m.*, CASE WHEN m.direction = 'out' THEN NULL"
        " WHEN m.inbound_id IS NULL THEN m.auth"
        " ELSE coalesce(m.auth, i.auth, 'none') END AS verdict"
        " FROM ticket_messages m LEFT JOIN inbound i ON i.id = m.inbound_id"
        " WHERE m.ticket = ? ORDER BY m.date, m.id", (ticket,))]


async def add_history(conn: aiosqlite.Connection, *, ticket: int, from_status: str | None,
                      to_status: str, actor: str, note: str | None, now: datetime) -> None:
    await conn.execute(
        "INSERT INTO ticket_history (ticket, from_status, to_status, actor, note, at)"
        " VALUES (?, ?, ?, ?, ?, ?)", (ticket, from_status, to_status, actor, note, iso(now)))


async def ticket_history(conn: aiosqlite.Connection, ticket: int) -> list[HistoryRow]:
    return [HistoryRow.from_row(r) for r in await conn.execute_fetchall(
        "SELECT * FROM ticket_history WHERE ticket = ? ORDER BY id", (ticket,))]


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


async def ticket_attachments(conn: aiosqlite.Connection, ticket: int) -> list[AttachmentRow]:
    return [AttachmentRow.from_row(r) for r in await conn.execute_fetchall(
        f"SELECT * FROM attachments WHERE ticket = ? ORDER BY {insertion_order(conn)}",
        (ticket,))]


async def ticket_of_inbound(conn: aiosqlite.Connection, inbound_id: int) -> int | None:
    rows = list(await conn.execute_fetchall(
        "SELECT ticket FROM ticket_messages WHERE inbound_id = ? LIMIT 1", (inbound_id,)))
    return rows[0][0] if rows else None
