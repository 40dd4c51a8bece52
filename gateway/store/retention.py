"""[storage] keep_raw: the raw mail of long-closed tickets is dropped; tickets,
threads, attachment rows and files stay."""

from __future__ import annotations

from datetime import datetime

import aiosqlite

from gateway.model import InboundState, OutboxStatus
from gateway.store.connection import Tx, iso


async def drop_old_raw(conn: aiosqlite.Connection, closed_before: datetime, now: datetime,
                       limit: int = 200) -> int:
    """[storage] keep_raw: the raw mail (inbound, and outbound already sent) of tickets
    closed before `closed_before` is dropped; tickets, threads, attachment rows and
    files stay. At most `limit` inbound messages per call (short transactions)."""
    async with Tx(conn):
        rows = await conn.execute_fetchall(
            "SELECT i.id FROM inbound i JOIN tickets t ON t.number = i.ticket"
            " WHERE t.status = 'closed' AND t.closed_at < ? AND i.raw_dropped_at IS NULL"
            f" AND i.state = '{InboundState.DONE}' LIMIT ?", (iso(closed_before), limit))
        ids = [r[0] for r in rows]
        for inbound_id in ids:
            await conn.execute("DELETE FROM inbound_raw WHERE id = ?", (inbound_id,))
            await conn.execute("UPDATE inbound SET raw_dropped_at = ? WHERE id = ?",
                               (iso(now), inbound_id))
        sent = list(await conn.execute_fetchall(
            "SELECT o.id FROM outbox o JOIN tickets t ON t.number = o.ticket"
            " WHERE t.status = 'closed' AND t.closed_at < ?"
            f" AND o.status = '{OutboxStatus.SENT}'"
            " AND o.raw_dropped_at IS NULL LIMIT ?", (iso(closed_before), limit)))
        for (outbox_id,) in sent:
            await conn.execute("DELETE FROM outbox_raw WHERE id = ?", (outbox_id,))
            await conn.execute("UPDATE outbox SET raw_dropped_at = ? WHERE id = ?",
                               (iso(now), outbox_id))
    return len(ids) + len(sent)
