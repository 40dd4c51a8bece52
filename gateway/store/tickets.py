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


async def list_tickets(conn: aiosqlite.Connection, status: str | None = None, *,
                       after: tuple[str, int] | None = None,
                       limit: int | None = None) -> list[TicketRow]:
    """One page of tickets, oldest first: after the position `after` (created_at,
    number), at most `limit`."""
    where, params = [], list[Any]()
    if status:
        where.append("status = ?")
        params.append(status)
    if after is not None:
        where.append("(created_at, number) > (?, ?)")
        params += after
    sql = "SELECT * FROM tickets" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY created_at, number"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
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
    for attempt in range(RANDOM_DRAWS + 2):
        number = draw()
        if attempt >= RANDOM_DRAWS:  # nearly full: the next free number after a random one
            found = await free_number_from(conn, number)
            if found is None:
                raise NumberSpaceExhausted(
                    f"no ticket number left: all {TICKET_NUMBERS:,} six-digit numbers are "
                    "taken (numbers are never reused); the report stays stored (see README, "
                    "\"When the ticket numbers run out\")")
            number = found
        rows = list(await conn.execute_fetchall(
            f"INSERT INTO tickets ({columns}) VALUES ({marks})"
            " ON CONFLICT (number) DO NOTHING RETURNING number",
            (number, *values.values(), iso(now), iso(now))))
        if rows:
            return rows[0][0]
    raise StoreError("no free ticket number found: every one tried was taken meanwhile")


# --- the number space ------------------------------------------------------------------

TICKET_NUMBERS = TICKET_MAX - TICKET_MIN + 1  # 900,000; never reused
# Random draws before looking for the next free number in order: with 99 % used all
# 100 miss for one report in three (0.99**100 = 0.37), with 95 % for one in 170.
RANDOM_DRAWS = 100


class NumberSpaceExhausted(StoreError):
    """Every six-digit ticket number is taken: a new report cannot open a ticket."""


@dataclass(frozen=True, slots=True)
class NumberSpace:
    used: int  # numbers taken (tickets are never deleted)
    created_recently: int  # tickets created since the moment asked about
    total: int = TICKET_NUMBERS

    @property
    def left(self) -> int:
        return max(0, self.total - self.used)

    @property
    def used_share(self) -> float:
        return self.used / self.total


async def number_space(conn: aiosqlite.Connection, since: datetime | None = None) -> NumberSpace:
    """How many ticket numbers are taken and, with `since`, how many tickets were made
    from then on (the pace, for how long the rest lasts; a scan of the table)."""
    if since is None:
        rows = list(await conn.execute_fetchall(
            "SELECT count(*), 0 FROM tickets WHERE number BETWEEN ? AND ?",
            (TICKET_MIN, TICKET_MAX)))
    else:
        rows = list(await conn.execute_fetchall(
            "SELECT count(*), coalesce(sum(CASE WHEN created_at >= ? THEN 1 ELSE 0 END), 0)"
            " FROM tickets WHERE number BETWEEN ? AND ?", (iso(since), TICKET_MIN, TICKET_MAX)))
    return NumberSpace(int(rows[0][0]), int(rows[0][1]))


async def free_number_from(conn: aiosqlite.Connection, start: int) -> int | None:
    """The first free ticket number from `start` on, wrapping round to TICKET_MIN; None
    when every number is taken."""
    for low, high in ((start, TICKET_MAX), (TICKET_MIN, start)):
        taken = list(await conn.execute_fetchall(
            "SELECT 1 FROM tickets WHERE number = ?", (low,)))
        if not taken:
            return low
        rows = list(await conn.execute_fetchall(
            "SELECT min(t.number) + 1 FROM tickets t WHERE t.number >= ? AND t.number < ?"
            " AND NOT EXISTS (SELECT 1 FROM tickets u WHERE u.number = t.number + 1)",
            (low, high)))
        if rows and rows[0][0] is not None:
            return int(rows[0][0])
    return None


async def update_ticket(conn: aiosqlite.Connection, number: int, now: datetime,
                        **values: Any) -> None:
    sets = ", ".join(f"{name} = ?" for name in values)
    await conn.execute(f"UPDATE tickets SET {sets}, updated_at = ? WHERE number = ?",
                       (*values.values(), iso(now), number))
