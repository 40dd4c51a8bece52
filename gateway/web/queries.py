"""Read-only views the desk's pages need beyond gateway.store (plain SELECTs: WAL
readers, never waiting for the daemon's writes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiosqlite

from gateway.model import OPEN_STATUSES
from gateway.store import AttachmentRow, TicketCursor, TicketRow
from gateway.store.dialect import insertion_order
from gateway.store.search import WAITING_SINCE


@dataclass(frozen=True, slots=True)
class Attention:
    ticket: TicketRow
    customer_waiting: bool
    phone_pending: bool
    since: str  # since when the customer waits, else when the ticket was opened

    def cursor(self) -> TicketCursor:
        return (self.since, self.ticket.number)


# Open tickets whose customer waits, or whose confirming phone call (contract under
# 24 h) is not recorded: a ticket once, under the time it needs attention since.
_ATTENTION = f"""
    SELECT *, coalesce(waiting_since, created_at) AS since FROM (
      SELECT t.*, {WAITING_SINCE} AS waiting_since FROM tickets t
       WHERE t.status IN ({', '.join(f"'{s}'" for s in sorted(OPEN_STATUSES))})) AS a
     WHERE (waiting_since IS NOT NULL
            OR (phone_confirmation_required = 1 AND phone_confirmed = 0))"""


async def attention_page(conn: aiosqlite.Connection, *, after: TicketCursor | None = None,
                         limit: int) -> list[Attention]:
    """One page of the tickets needing attention, the longest waiting first: after
    the position `after` (since, number), at most `limit`."""
    sql, params = _ATTENTION, list[Any]()
    if after is not None:
        sql += " AND (coalesce(waiting_since, created_at), number) > (?, ?)"
        params += after
    rows = await conn.execute_fetchall(sql + " ORDER BY since, number LIMIT ?",
                                       [*params, limit])
    return [Attention(TicketRow.from_row(r), r["waiting_since"] is not None,
                      bool(r["phone_confirmation_required"]) and not r["phone_confirmed"],
                      r["since"]) for r in rows]


async def ticket_attachment(conn: aiosqlite.Connection, number: int,
                            sha256: str) -> AttachmentRow | None:
    """One attachment of this ticket (never another ticket's, whatever the hash)."""
    rows = list(await conn.execute_fetchall(
        "SELECT * FROM attachments WHERE ticket = ? AND sha256 = ?"
        f" ORDER BY {insertion_order(conn)} LIMIT 1",
        (number, sha256)))
    return AttachmentRow.from_row(rows[0]) if rows else None
