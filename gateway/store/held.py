"""Mail held for an operator's decision (release or drop)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiosqlite

from gateway.model import HeldStatus
from gateway.store.connection import iso
from gateway.store.paging import walk


@dataclass(frozen=True, slots=True)
class HeldRow:
    """A message held for an operator, why, and what they decided."""

    id: int
    inbound_id: int
    ticket: int | None  # the ticket it named
    sender: str
    subject: str
    reason: str
    status: HeldStatus
    created_at: str
    decided_at: str | None
    announced_at: str | None  # when the held digest named it
    decided_by: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> HeldRow:
        return cls(row["id"], row["inbound_id"], row["ticket"], row["sender"], row["subject"],
                   row["reason"], HeldStatus(row["status"]), row["created_at"],
                   row["decided_at"], row["announced_at"], row["decided_by"])


async def add_held(conn: aiosqlite.Connection, *, inbound_id: int, ticket: int | None,
                   sender: str, subject: str, reason: str, now: datetime) -> None:
    await conn.execute(
        "INSERT INTO held (inbound_id, ticket, sender, subject, reason, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (inbound_id) DO NOTHING",
        (inbound_id, ticket, sender, subject, reason, iso(now)))


async def list_held(conn: aiosqlite.Connection,
                    status: HeldStatus | None = HeldStatus.HELD, *, after: int | None = None,
                    limit: int | None = None) -> list[HeldRow]:
    """One page of held mail in the order it was held: after id `after`, at most
    `limit`, only `status` (None: every status)."""
    sql, params = "SELECT * FROM held WHERE id > ?", list[Any]([after or 0])
    if status:
        sql += " AND status = ?"
        params.append(status)
    sql += " ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [HeldRow.from_row(r) for r in await conn.execute_fetchall(sql, params)]


def iter_held(conn: aiosqlite.Connection, status: HeldStatus | None = HeldStatus.HELD, *,
              after: int | None = None, limit: int | None = None) -> AsyncIterator[HeldRow]:
    """`list_held` walked page by page (each page its own short read)."""
    async def fetch(cursor: int | None, size: int) -> list[HeldRow]:
        return await list_held(conn, status, after=cursor, limit=size)

    return walk(fetch, lambda row: row.id, after=after, limit=limit)


async def get_held(conn: aiosqlite.Connection, held_id: int) -> HeldRow | None:
    rows = list(await conn.execute_fetchall("SELECT * FROM held WHERE id = ?", (held_id,)))
    return HeldRow.from_row(rows[0]) if rows else None


async def decide_held(conn: aiosqlite.Connection, held_id: int, status: HeldStatus,
                      now: datetime, *, actor: str | None = None) -> bool:
    cursor = await conn.execute(
        "UPDATE held SET status = ?, decided_at = ?, decided_by = ? WHERE id = ?"
        f" AND status = '{HeldStatus.HELD}'", (status, iso(now), actor, held_id))
    return cursor.rowcount == 1


async def held_of_inbound(conn: aiosqlite.Connection, inbound_id: int) -> HeldRow | None:
    rows = list(await conn.execute_fetchall("SELECT * FROM held WHERE inbound_id = ?", (inbound_id,)))
    return HeldRow.from_row(rows[0]) if rows else None
