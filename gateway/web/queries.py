"""Read-only views the desk's pages need beyond gateway.store (plain SELECTs: WAL
readers, never waiting for the daemon's writes)."""

from __future__ import annotations

from dataclasses import dataclass

import aiosqlite

from gateway.store import AttachmentRow, ListedTicket, TicketRow
from gateway.store.dialect import insertion_order


@dataclass(frozen=True, slots=True)
class Attention:
    ticket: TicketRow
    customer_waiting: bool
    phone_pending: bool
    since: str  # since when the customer waits, else when the ticket was opened


async def phone_pending(conn: aiosqlite.Connection) -> list[TicketRow]:
    """Open tickets whose confirming phone call (contract under 24 h) is not recorded."""
    return [TicketRow.from_row(r) for r in await conn.execute_fetchall(
        "SELECT * FROM tickets WHERE status != 'closed' AND phone_confirmation_required = 1"
        " AND phone_confirmed = 0 ORDER BY created_at, number")]


def attention_list(waiting: list[ListedTicket], phone: list[TicketRow]) -> list[Attention]:
    """Both lists in one, a ticket once, the longest waiting first."""
    pending = {t.number for t in phone}
    items = [Attention(w.ticket, True, w.ticket.number in pending, w.waiting_since or "")
             for w in waiting]
    seen = {w.ticket.number for w in waiting}
    items += [Attention(t, False, True, t.created_at) for t in phone if t.number not in seen]
    items.sort(key=lambda a: (a.since, a.ticket.number))
    return items


async def ticket_attachment(conn: aiosqlite.Connection, number: int,
                            sha256: str) -> AttachmentRow | None:
    """One attachment of this ticket (never another ticket's, whatever the hash)."""
    rows = list(await conn.execute_fetchall(
        "SELECT * FROM attachments WHERE ticket = ? AND sha256 = ?"
        f" ORDER BY {insertion_order(conn)} LIMIT 1",
        (number, sha256)))
    return AttachmentRow.from_row(rows[0]) if rows else None
