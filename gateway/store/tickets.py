"""Tickets: the rows staff work on, created under a fresh random number, updated,
found by number or by a Message-ID of their thread."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiosqlite

from gateway.errors import StoreError
from gateway.store.connection import iso

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
    def from_row(cls, row: sqlite3.Row) -> TicketRow:
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
                        now: datetime, draw: Callable[[], int]) -> int:
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
