"""Read-only views the desk's pages need beyond gateway.store (plain SELECTs: WAL
readers, never waiting for the daemon's writes)."""

from __future__ import annotations

from dataclasses import dataclass

import aiosqlite

from gateway.store import TicketRow


@dataclass(frozen=True, slots=True)
class Attention:
    ticket: TicketRow
    customer_waiting: bool
    phone_pending: bool
    since: str  # when the customer last wrote, else when the ticket was opened


async def needing_attention(conn: aiosqlite.Connection) -> list[Attention]:
    """Open tickets whose last human message is the customer's (no staff reply since),
    or whose confirming phone call is still missing; the longest waiting first."""
    rows = await conn.execute_fetchall(
        "SELECT t.*,"
        " (SELECT max(date) FROM ticket_messages m WHERE m.ticket = t.number"
        "  AND m.kind = 'customer') AS last_in,"
        " (SELECT max(date) FROM ticket_messages m WHERE m.ticket = t.number"
        "  AND m.kind = 'staff_reply') AS last_reply"
        " FROM tickets t WHERE t.status != 'closed'")
    found = []
    for row in rows:
        last_in, last_reply = row["last_in"], row["last_reply"]
        waiting = bool(last_in) and (not last_reply or last_in > last_reply)
        phone = bool(row["phone_confirmation_required"]) and not row["phone_confirmed"]
        if waiting or phone:
            found.append(Attention(TicketRow.from_row(row), waiting, phone,
                                   last_in if waiting else row["created_at"]))
    found.sort(key=lambda a: (a.since, a.ticket.number))
    return found


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def find_tickets(conn: aiosqlite.Connection, status: str | None,
                       query: str) -> list[TicketRow]:
    """Tickets by status and by a text found in the number, the device ids, the
    reporter, the subject, the description or the thread; the newest first."""
    sql, params = "SELECT * FROM tickets t WHERE 1 = 1", []
    if status:
        sql += " AND t.status = ?"
        params.append(status)
    text = query.strip().lstrip("#")
    if text:
        pattern = _like(text)
        columns = ("serial_number", "commcell_id", "reporter_email", "reporter_name",
                   "subject", "description", "install_address", "reporter_phone")
        sql += (" AND (printf('%06d', t.number) = ? OR "
                + " OR ".join(f"t.{c} LIKE ? ESCAPE '\\'" for c in columns)
                + " OR EXISTS (SELECT 1 FROM ticket_messages m WHERE m.ticket = t.number"
                  " AND m.body LIKE ? ESCAPE '\\'))")
        params += [text, *([pattern] * len(columns)), pattern]
    sql += " ORDER BY t.created_at DESC, t.number LIMIT 500"
    return [TicketRow.from_row(r) for r in await conn.execute_fetchall(sql, params)]


async def ticket_attachment(conn: aiosqlite.Connection, number: int,
                            sha256: str) -> aiosqlite.Row | None:
    """One attachment of this ticket (never another ticket's, whatever the hash)."""
    rows = await conn.execute_fetchall(
        "SELECT * FROM attachments WHERE ticket = ? AND sha256 = ? ORDER BY rowid LIMIT 1",
        (number, sha256))
    return rows[0] if rows else None


async def held_for_inbound(conn: aiosqlite.Connection, inbound_id: int) -> aiosqlite.Row | None:
    rows = await conn.execute_fetchall("SELECT * FROM held WHERE inbound_id = ?", (inbound_id,))
    return rows[0] if rows else None
