"""What operations watch: the queue gauges and /healthz's write probe."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import aiosqlite

from gateway.model import HeldStatus, InboundState, OutboxStatus
from gateway.store.connection import Tx, iso
from gateway.store.inbound import count_inbound_by_state


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


_WAITING = f"('{OutboxStatus.PENDING}', '{OutboxStatus.SENDING}')"  # not sent yet


async def queue_counts(conn: aiosqlite.Connection) -> QueueCounts:
    inbound = await count_inbound_by_state(conn)
    (held,) = list(await conn.execute_fetchall(
        f"SELECT count(*) FROM held WHERE status = '{HeldStatus.HELD}'"))[0]
    waiting, oldest, due, failed = list(await conn.execute_fetchall(
        f"SELECT count(*) FILTER (WHERE status IN {_WAITING}),"
        f" min(queued_at) FILTER (WHERE status IN {_WAITING}),"
        f" min(next_attempt_at) FILTER (WHERE status IN {_WAITING}),"
        f" count(*) FILTER (WHERE status = '{OutboxStatus.FAILED}') FROM outbox"))[0]
    return QueueCounts(
        inbound.get(InboundState.QUEUED, 0) + inbound.get(InboundState.PROCESSING, 0),
        inbound.get(InboundState.FAILED, 0), held, waiting, failed, oldest, due)


async def probe_write(conn: aiosqlite.Connection, now: datetime) -> None:
    """A real write, committed: raises when the database cannot be written (read-only,
    disk full, locked for longer than the connection's busy timeout)."""
    async with Tx(conn):
        await conn.execute("INSERT INTO settings (key, value) VALUES ('healthz_at', ?)"
                           " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                           (iso(now),))
