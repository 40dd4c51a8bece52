"""The outbox: composed mails queued in the transaction of the change that caused
them, claimed by the mailer, marked sent, retried or failed; the automatic-answer caps
and bounces read and mark it."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiosqlite

from gateway.errors import StoreError
from gateway.model import OutboxStatus
from gateway.store.connection import gated, iso
from gateway.store.dialect import is_postgres
from gateway.store.paging import walk


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    ticket: int | None
    inbound_id: int | None
    kind: str
    message_id: str
    mail_from: str
    rcpt_to: str
    subject: str
    auto: bool
    status: OutboxStatus
    attempts: int
    next_attempt_at: str
    last_error: str | None
    queued_at: str
    created_at: str
    sent_at: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> OutboxRow:
        return cls(row["id"], row["ticket"], row["inbound_id"], row["kind"], row["message_id"],
                   row["mail_from"], row["rcpt_to"], row["subject"], bool(row["auto"]),
                   OutboxStatus(row["status"]), row["attempts"], row["next_attempt_at"], row["last_error"],
                   row["queued_at"], row["created_at"], row["sent_at"])

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "ticket": None if self.ticket is None else f"{self.ticket:06d}",
                "kind": self.kind, "from": self.mail_from, "to": self.rcpt_to,
                "subject": self.subject, "message_id": self.message_id, "status": self.status,
                "attempts": self.attempts, "next_attempt_at": self.next_attempt_at,
                "last_error": self.last_error, "created_at": self.created_at,
                "sent_at": self.sent_at}


_OUTBOX_COLUMNS = ("id, ticket, inbound_id, kind, message_id, mail_from, rcpt_to, subject, auto,"
                   " status, attempts, next_attempt_at, last_error, queued_at, created_at, sent_at")


async def enqueue_outbox(conn: aiosqlite.Connection, *, ticket: int | None,
                         inbound_id: int | None, kind: str, message_id: str, mail_from: str,
                         rcpt_to: str, subject: str, auto: bool, raw: bytes,
                         now: datetime, topic: str = "") -> int:
    """Queue one composed mail; call inside the transaction of the change causing it."""
    rows = list(await conn.execute_fetchall(
        "INSERT INTO outbox (ticket, inbound_id, kind, message_id, mail_from, rcpt_to, subject,"
        " auto, next_attempt_at, queued_at, created_at, topic, rcpt_key)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (ticket, inbound_id, kind, message_id, mail_from, rcpt_to, subject, int(auto),
         iso(now), iso(now), iso(now), topic, address_key(rcpt_to))))
    outbox_id = rows[0][0]
    await conn.execute("INSERT INTO outbox_raw (id, raw) VALUES (?, ?)", (outbox_id, raw))
    return outbox_id


async def recover_outbox(conn: aiosqlite.Connection, node: str | None = None) -> int:
    """Rows a crash left "sending" go back to due. The relay may have taken the mail
    already: it goes again with the same Message-ID, the same mail, never another.
    With PostgreSQL only this `node`'s (another node's end with their lease)."""
    where, params = f"status = '{OutboxStatus.SENDING}'", []
    if node is not None and is_postgres(conn):
        where += " AND claimed_node = ?"
        params.append(node)
    cursor = await conn.execute(
        f"UPDATE outbox SET status = '{OutboxStatus.PENDING}', claimed_node = NULL,"
        f" lease_until = NULL WHERE {where}", params)
    return cursor.rowcount


async def release_expired_outbox(conn: aiosqlite.Connection, now: datetime) -> int:
    """Mails a node stopped sending (it died mid-send) are due again, for any node."""
    cursor = await conn.execute(
        f"UPDATE outbox SET status = '{OutboxStatus.PENDING}', claimed_node = NULL,"
        f" lease_until = NULL WHERE status = '{OutboxStatus.SENDING}' AND lease_until < ?",
        (iso(now),))
    return cursor.rowcount


async def renew_outbox_lease(conn: aiosqlite.Connection, outbox_id: int, node: str,
                             lease_until: datetime) -> bool:
    """Keep this node's claim on a mail it is still sending (a slow relay)."""
    cursor = await conn.execute(
        "UPDATE outbox SET lease_until = ? WHERE id = ? AND claimed_node = ?"
        f" AND status = '{OutboxStatus.SENDING}'", (iso(lease_until), outbox_id, node))
    return cursor.rowcount == 1


async def claim_due_outbox(conn: aiosqlite.Connection, now: datetime, *,
                           node: str | None = None,
                           lease_until: datetime | None = None) -> OutboxRow | None:
    """The next due mail, marked sending. With PostgreSQL the claim names `node`
    until `lease_until` and skips rows another node is claiming (each mail is sent by
    one node; a node that died leaves it to the others when the lease ends)."""
    skip = " FOR UPDATE SKIP LOCKED" if is_postgres(conn) else ""
    async with gated(conn):
        rows = list(await conn.execute_fetchall(
            f"UPDATE outbox SET status = '{OutboxStatus.SENDING}', attempts = attempts + 1,"
            " claimed_node = ?, lease_until = ?"
            f" WHERE id = (SELECT id FROM outbox WHERE status = '{OutboxStatus.PENDING}'"
            " AND next_attempt_at <= ?"
            # Parallel sessions keep one ticket's mails in order: none while another
            # of that ticket is being sent.
            "             AND (ticket IS NULL OR ticket NOT IN (SELECT ticket FROM outbox"
            f"                  WHERE status = '{OutboxStatus.SENDING}' AND ticket IS NOT NULL))"
            f"             ORDER BY next_attempt_at, id LIMIT 1{skip})"
            f" AND status = '{OutboxStatus.PENDING}' RETURNING {_OUTBOX_COLUMNS}",
            (node, iso(lease_until) if lease_until else None, iso(now))))
    return OutboxRow.from_row(rows[0]) if rows else None


async def next_outbox_due(conn: aiosqlite.Connection) -> datetime | None:
    rows = list(await conn.execute_fetchall(
        f"SELECT min(next_attempt_at) FROM outbox WHERE status = '{OutboxStatus.PENDING}'"))
    return datetime.fromisoformat(rows[0][0]) if rows and rows[0][0] else None


async def read_outbox_raw(conn: aiosqlite.Connection, outbox_id: int) -> bytes:
    rows = list(await conn.execute_fetchall("SELECT raw FROM outbox_raw WHERE id = ?", (outbox_id,)))
    if not rows:
        raise StoreError(f"outbox {outbox_id}: raw bytes missing")
    return bytes(rows[0][0])


async def mark_outbox_sent(conn: aiosqlite.Connection, outbox_ids: list[int],
                           now: datetime) -> None:
    """Sends' marks, several in one statement (one turn at the write lock)."""
    if not outbox_ids:
        return
    marks = ", ".join("?" * len(outbox_ids))
    async with gated(conn):
        await conn.execute(
            f"UPDATE outbox SET status = '{OutboxStatus.SENT}', sent_at = ?, last_error = NULL"
            f" WHERE id IN ({marks})",
            (iso(now), *outbox_ids))


async def mark_outbox_retry(conn: aiosqlite.Connection, outbox_id: int, next_at: datetime,
                            error: str) -> None:
    await conn.execute(
        f"UPDATE outbox SET status = '{OutboxStatus.PENDING}', next_attempt_at = ?,"
        " last_error = ? WHERE id = ?",
        (iso(next_at), error[:1000], outbox_id))


async def mark_outbox_failed(conn: aiosqlite.Connection, outbox_id: int, error: str) -> None:
    await conn.execute(
        f"UPDATE outbox SET status = '{OutboxStatus.FAILED}', last_error = ? WHERE id = ?",
        (error[:1000], outbox_id))


async def retry_outbox(conn: aiosqlite.Connection, outbox_id: int, now: datetime) -> bool:
    """An operator's `outbox retry`: a failed (or bounced) row is due again now, with a
    fresh give_up_after window."""
    cursor = await conn.execute(
        f"UPDATE outbox SET status = '{OutboxStatus.PENDING}', next_attempt_at = ?,"
        " queued_at = ?, attempts = 0"
        f" WHERE id = ? AND status IN ('{OutboxStatus.FAILED}', '{OutboxStatus.BOUNCED}')",
        (iso(now), iso(now), outbox_id))
    return cursor.rowcount == 1


async def get_outbox(conn: aiosqlite.Connection, outbox_id: int) -> OutboxRow | None:
    rows = list(await conn.execute_fetchall(
        f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id = ?", (outbox_id,)))
    return OutboxRow.from_row(rows[0]) if rows else None


async def list_outbox(conn: aiosqlite.Connection, status: OutboxStatus | None = None, *,
                      after: int | None = None, limit: int | None = None,
                      statuses: tuple[OutboxStatus, ...] = ()) -> list[OutboxRow]:
    """One page of queued mail, oldest first: after id `after`, at most `limit`, only
    `status` (or only those in `statuses`)."""
    sql = f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id > ?"
    params: list[Any] = [after or 0]
    if status:
        statuses = (status,)
    if statuses:
        sql += f" AND status IN ({', '.join('?' * len(statuses))})"
        params += statuses
    sql += " ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [OutboxRow.from_row(r) for r in await conn.execute_fetchall(sql, params)]


def iter_outbox(conn: aiosqlite.Connection, status: OutboxStatus | None = None, *,
                after: int | None = None, limit: int | None = None) -> AsyncIterator[OutboxRow]:
    """`list_outbox` walked page by page (each page its own short read)."""
    async def fetch(cursor: int | None, size: int) -> list[OutboxRow]:
        return await list_outbox(conn, status, after=cursor, limit=size)

    return walk(fetch, lambda row: row.id, after=after, limit=limit)


async def outbox_for_inbound(conn: aiosqlite.Connection, inbound_id: int) -> list[OutboxRow]:
    """The answers a received message caused."""
    rows = await conn.execute_fetchall(
        f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE inbound_id = ? ORDER BY id", (inbound_id,))
    return [OutboxRow.from_row(r) for r in rows]


async def outbox_sizes_since(conn: aiosqlite.Connection, after_id: int) -> list[tuple[int, int]]:
    """(id, size of the composed mail) of the outbox rows after `after_id`."""
    rows = await conn.execute_fetchall(
        "SELECT id, length(raw) FROM outbox_raw WHERE id > ? ORDER BY id", (after_id,))
    return [(r[0], r[1]) for r in rows]


async def last_outbox_id(conn: aiosqlite.Connection) -> int:
    rows = list(await conn.execute_fetchall("SELECT coalesce(max(id), 0) FROM outbox"))
    return rows[0][0]


async def outbox_depth(conn: aiosqlite.Connection) -> tuple[int, str | None]:
    """How many mails wait to be sent, and since when the oldest waits."""
    rows = list(await conn.execute_fetchall(
        "SELECT count(*), min(queued_at) FROM outbox"
        f" WHERE status IN ('{OutboxStatus.PENDING}', '{OutboxStatus.SENDING}')"))
    return rows[0][0], rows[0][1]


async def sent_since(conn: aiosqlite.Connection, address: str, kind: str, topic: str,
                     since: datetime) -> bool:
    rows = await conn.execute_fetchall(
        "SELECT 1 FROM outbox WHERE rcpt_to = ? AND kind = ? AND topic = ? AND created_at >= ?"
        " LIMIT 1", (address, kind, topic, iso(since)))
    return bool(rows)


async def answered(conn: aiosqlite.Connection, inbound_id: int, kind: str) -> bool:
    rows = await conn.execute_fetchall(
        "SELECT 1 FROM outbox WHERE inbound_id = ? AND kind = ? LIMIT 1", (inbound_id, kind))
    return bool(rows)


def address_key(address: str) -> str:
    """An address as the automatic-answer cap counts it: lower-case, without a +tag."""
    local, at, domain = address.strip().lower().rpartition("@")
    if not at:
        return address.strip().lower()
    return f"{local.split('+', 1)[0]}@{domain}"


async def auto_replies_since(conn: aiosqlite.Connection, addresses: Iterable[str],
                             since: datetime, at_most: int) -> int:
    """The most automatic answers any one of these addresses (a sender, a recipient)
    got for inbound mail since `since` (not the notices staff caused), counted up to
    `at_most` (the cap): a storm from one address costs each of its messages `at_most`
    index entries, not all of that address's answers of the last hour."""
    wanted = sorted({address_key(a) for a in addresses if a})
    if not wanted or at_most <= 0:
        return 0
    one = ("SELECT count(*) AS n FROM (SELECT 1 FROM outbox WHERE rcpt_key = ? AND auto = 1"
           " AND created_at >= ? AND inbound_id IS NOT NULL LIMIT ?) AS answered")
    rows = list(await conn.execute_fetchall(
        f"SELECT max(n) FROM ({' UNION ALL '.join([one] * len(wanted))}) AS counts",
        tuple(v for key in wanted for v in (key, iso(since), at_most))))
    return int(rows[0][0] or 0) if rows else 0


async def mark_bounced(conn: aiosqlite.Connection, message_ids: Iterable[str],
                       reason: str = "bounced") -> list[int]:
    """A DSN reports on mail we sent: mark it bounced and flag the ticket's reporter
    address. Only rows already sent: a DSN never cancels mail not yet sent (a forged one
    could otherwise stop an acknowledgement for good). Returns the tickets concerned."""
    tickets = []
    for message_id in message_ids:
        rows = await conn.execute_fetchall(
            f"UPDATE outbox SET status = '{OutboxStatus.BOUNCED}', last_error = ?"
            " WHERE message_id = ?"
            f" AND status = '{OutboxStatus.SENT}' RETURNING ticket", (reason[:1000], message_id))
        for (ticket,) in rows:
            if ticket is not None:
                await conn.execute(
                    "UPDATE tickets SET reporter_bounced = 1 WHERE number = ?", (ticket,))
                tickets.append(ticket)
    return tickets
