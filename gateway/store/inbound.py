"""The inbound queue: received messages, claimed by the processor, marked with their
outcome; and what the desk reads about them (details, the stored report, the raw)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiosqlite

from gateway.errors import ClaimLost, StoreError
from gateway.model import InboundState, Outcome
from gateway.store.connection import gated, iso, utcnow
from gateway.store.dialect import is_postgres
from gateway.store.paging import walk

if TYPE_CHECKING:
    from gateway.attachment_store import AttachmentStore


@dataclass(frozen=True, slots=True)
class InboundRow:
    id: int
    message_id: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    received_at: str
    size: int
    state: InboundState
    attempts: int
    outcome: str | None
    ticket: int | None
    error: str | None
    peer: str = ""
    auth: str | None = None  # the sender verdict, once processed
    auth_reason: str | None = None
    claimed_node: str | None = None  # PostgreSQL: the node whose claim it is in

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> InboundRow:
        return cls(row["id"], row["message_id"], row["mail_from"],
                   tuple(json.loads(row["rcpt_tos"])), row["received_at"], row["size"],
                   InboundState(row["state"]), row["attempts"], row["outcome"], row["ticket"], row["error"],
                   row["peer"], row["auth"], row["auth_reason"], row["claimed_node"])

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "message_id": self.message_id, "mail_from": self.mail_from,
                "rcpt_tos": list(self.rcpt_tos), "received_at": self.received_at,
                "size": self.size, "outcome": self.outcome,
                "ticket": None if self.ticket is None else f"{self.ticket:06d}"}


_INBOUND_COLUMNS = ("id, message_id, mail_from, rcpt_tos, received_at, size, state,"
                    " attempts, outcome, ticket, error, peer, auth, auth_reason, claimed_node")


async def recover_inbound(conn: aiosqlite.Connection, slot: int | None = None, *,
                          node: str | None = None) -> int:
    """Rows a crash left mid-way go back to the queue: all of them (no worker is
    running), or those of one worker slot (that worker died and is starting again).
    With PostgreSQL only this `node`'s: another node's claims are its own (or end
    with their lease, `release_expired_inbound`)."""
    where = f"state = '{InboundState.PROCESSING}'"
    params: list[Any] = []
    if node is not None and is_postgres(conn):
        where += " AND claimed_node = ?"
        params.append(node)
    if slot is not None:
        where += " AND claimed_by = ?"
        params.append(slot)
    cursor = await conn.execute(
        f"UPDATE inbound SET state = '{InboundState.QUEUED}', claimed_by = NULL,"
        f" claimed_node = NULL, lease_until = NULL WHERE {where}", params)
    return cursor.rowcount


async def claim_inbound(conn: aiosqlite.Connection, slot: int | None = None, *,
                        node: str | None = None,
                        lease_until: datetime | None = None) -> InboundRow | None:
    """Take the oldest queued message (in arrival order) for processing, for worker
    `slot` (None: this process): `claim_inbound_batch` of one."""
    rows = await claim_inbound_batch(conn, slot, limit=1, node=node, lease_until=lease_until)
    return rows[0] if rows else None


async def claim_inbound_batch(conn: aiosqlite.Connection, slot: int | None = None, *,
                              limit: int, node: str | None = None,
                              lease_until: datetime | None = None) -> list[InboundRow]:
    """Take up to `limit` of the oldest queued messages at once, in arrival order (one
    statement): several reports then share one transaction (stages.process_batch).
    With PostgreSQL the claim names `node` and lasts until `lease_until`; rows another
    node's transaction is claiming are skipped, never waited for and never claimed
    twice.

    A message an earlier claim left unfinished (attempts > 0: a crash, kill -9) is
    claimed alone, so a message that kills the process is never in a batch again and
    the crash-loop count (processor.MAX_CLAIMS) stays its own; the fresh ones after
    it wait for the next claim."""
    skip = " FOR UPDATE SKIP LOCKED" if is_postgres(conn) else ""
    queued = f"'{InboundState.QUEUED}'"
    async with gated(conn):
        rows = list(await conn.execute_fetchall(
            f"WITH oldest AS (SELECT id, attempts FROM inbound WHERE state = {queued}"
            f" ORDER BY id LIMIT ?{skip}),"
            " head AS (SELECT id, attempts FROM oldest ORDER BY id LIMIT 1),"
            " retried AS (SELECT min(id) AS id FROM oldest WHERE attempts > 0"
            "  AND id > (SELECT id FROM head))"
            f" UPDATE inbound SET state = '{InboundState.PROCESSING}', attempts = attempts + 1,"
            " claimed_by = ?, claimed_node = ?, lease_until = ?"
            f" WHERE state = {queued} AND id IN ("
            "  SELECT id FROM head WHERE attempts > 0"
            "  UNION ALL SELECT id FROM oldest WHERE (SELECT attempts FROM head) = 0"
            "   AND id < coalesce((SELECT id FROM retried), 9223372036854775807))"
            f" RETURNING {_INBOUND_COLUMNS}",
            (limit, slot, node, iso(lease_until) if lease_until else None)))
    return sorted((InboundRow.from_row(r) for r in rows), key=lambda row: row.id)


async def queued_span(conn: aiosqlite.Connection) -> int:
    """About how many messages are queued (the id span of the queue: two index
    lookups, never a count over a long backlog)."""
    q = f"SELECT id FROM inbound WHERE state = '{InboundState.QUEUED}' ORDER BY id"
    rows = list(await conn.execute_fetchall(
        f"SELECT ({q} DESC LIMIT 1) - ({q} LIMIT 1) + 1"))
    return int(rows[0][0] or 0) if rows else 0


async def renew_inbound_leases(conn: aiosqlite.Connection, inbound_ids: list[int],
                               node: str, lease_until: datetime) -> int:
    """Keep this node's claims on messages it is still working on: how many are
    still its own."""
    marks = ", ".join("?" * len(inbound_ids))
    cursor = await conn.execute(
        f"UPDATE inbound SET lease_until = ? WHERE id IN ({marks}) AND claimed_node = ?"
        f" AND state = '{InboundState.PROCESSING}'", (iso(lease_until), *inbound_ids, node))
    return cursor.rowcount


async def release_expired_inbound(conn: aiosqlite.Connection, now: datetime) -> list[int]:
    """Messages whose node stopped renewing its claim go back to the queue (their
    attempt count stays: a message that kills every node is quarantined as usual)."""
    rows = await conn.execute_fetchall(
        f"UPDATE inbound SET state = '{InboundState.QUEUED}', claimed_by = NULL,"
        " claimed_node = NULL, lease_until = NULL"
        f" WHERE state = '{InboundState.PROCESSING}' AND lease_until < ? RETURNING id",
        (iso(now),))
    return [r[0] for r in rows]


async def confirm_claim(conn: aiosqlite.Connection, row: InboundRow) -> None:
    """Inside the transaction that records a message's outcome: the claim must still
    be the one this worker made (same attempt; with PostgreSQL the same node: a node
    that stalled past its lease lost the message to another). A claim recorded
    already, or taken back and claimed again, raises ClaimLost: its work is rolled
    back, never recorded twice. Locks the row until the commit (PostgreSQL)."""
    if row.state != InboundState.PROCESSING:
        return  # not a claim (an operator's reprocess or release)
    sql = ("SELECT 1 FROM inbound WHERE id = ? AND attempts = ?"
           f" AND state = '{InboundState.PROCESSING}'")
    params: list[Any] = [row.id, row.attempts]
    other_node = is_postgres(conn) and bool(row.claimed_node)
    if other_node:
        sql, params = sql + " AND claimed_node = ?", [*params, row.claimed_node]
    if is_postgres(conn):
        sql += " FOR UPDATE"
    if not list(await conn.execute_fetchall(sql, params)):
        why = ("the claim passed to another node (this node's lease ran out)" if other_node
               else "no longer this claim's (recorded already, or taken back and claimed "
                    "again)")
        raise ClaimLost(f"inbound {row.id}: {why}; its work here is dropped")


async def read_raw(conn: aiosqlite.Connection, inbound_id: int,
                   attachments: AttachmentStore | None = None) -> bytes:
    """The message exactly as received. Its attachment bytes live in `attachments`
    (files or the database: gateway/attachment_store.py) and are put back (SPEC §12:
    stored once)."""
    rows = list(await conn.execute_fetchall(
        "SELECT r.raw, r.spans, i.raw_dropped_at FROM inbound i"
        " LEFT JOIN inbound_raw r ON r.id = i.id WHERE i.id = ?", (inbound_id,)))
    if not rows or rows[0][0] is None:
        if rows and rows[0][2]:
            raise StoreError(f"inbound message {inbound_id}: raw mail dropped on "
                             f"{rows[0][2][:10]} (storage.keep_raw); text and attachments kept")
        raise StoreError(f"inbound message {inbound_id}: raw bytes missing")
    raw, spans = bytes(rows[0][0]), rows[0][1]
    if not spans:
        return raw
    from gateway import attachments as cut

    if attachments is None:
        raise StoreError(f"inbound message {inbound_id}: its attachments are stored apart;"
                         " read_raw needs the attachment store")
    cuts = cut.spans_from_json(spans)
    try:
        data = {sha: await attachments.load(conn, sha) for sha in {s.sha256 for s in cuts}}
    except cut.AttachmentMissing as err:
        raise StoreError(f"inbound message {inbound_id}: {err}") from None
    return cut.restore_raw(raw, cuts, data.__getitem__)


async def store_cut_raw(conn: aiosqlite.Connection, inbound_id: int, raw: bytes,
                        spans: str) -> None:
    """Keep the raw without its attachment bytes (already safe in the attachment store)."""
    await conn.execute("UPDATE inbound_raw SET raw = ?, spans = ? WHERE id = ?",
                       (raw, spans, inbound_id))


async def mark_inbound(conn: aiosqlite.Connection, inbound_id: int, *, state: InboundState,
                       outcome: str | None, ticket: int | None = None,
                       error: str | None = None, report: str | None = None,
                       auth: str | None = None, auth_reason: str | None = None) -> None:
    await conn.execute(
        "UPDATE inbound SET state = ?, outcome = ?, ticket = ?, error = ?,"
        " report = coalesce(?, report), auth = coalesce(?, auth),"
        " auth_reason = coalesce(?, auth_reason), processed_at = ? WHERE id = ?",
        (state, outcome, ticket, error, report, auth, auth_reason, iso(utcnow()), inbound_id))


async def list_inbound(conn: aiosqlite.Connection, outcome: str | None = None,
                       limit: int | None = None, *, after: int | None = None,
                       address: str | None = None) -> list[InboundRow]:
    """One page of received messages, oldest first: those after id `after`, at most
    `limit`; only `outcome`, only those from or to `address` (see `_ADDRESS`)."""
    where, params = ["id > ?"], list[Any]([after or 0])
    if outcome:
        where.append("outcome = ?")
        params.append(outcome)
    if address is not None:
        where.append(_ADDRESS_PG if is_postgres(conn) else _ADDRESS)
        params += [address.strip().lower()] * 3
    sql = f"SELECT {_INBOUND_COLUMNS} FROM inbound WHERE {' AND '.join(where)} ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [InboundRow.from_row(r) for r in await conn.execute_fetchall(sql, params)]


# The envelope sender, an envelope recipient or the From header (case-insensitive).
# No index serves it: a page of a rare address reads on by id until it is full.
_ADDRESS = ("(lower(mail_from) = ? OR lower(json_extract(report, '$.sender')) = ?"
            " OR EXISTS (SELECT 1 FROM json_each(inbound.rcpt_tos) WHERE lower(value) = ?))")
_ADDRESS_PG = ("(lower(mail_from) = ? OR lower(report::jsonb ->> 'sender') = ?"
               " OR EXISTS (SELECT 1 FROM jsonb_array_elements_text(inbound.rcpt_tos::jsonb)"
               " AS r(value) WHERE lower(r.value) = ?))")


def iter_inbound(conn: aiosqlite.Connection, *, outcome: str | None = None,
                 address: str | None = None, after: int | None = None,
                 limit: int | None = None) -> AsyncIterator[InboundRow]:
    """`list_inbound` walked page by page (each page its own short read)."""
    async def fetch(cursor: int | None, size: int) -> list[InboundRow]:
        return await list_inbound(conn, outcome, size, after=cursor, address=address)

    return walk(fetch, lambda row: row.id, after=after, limit=limit)


async def get_inbound(conn: aiosqlite.Connection, inbound_id: int) -> InboundRow | None:
    rows = list(await conn.execute_fetchall(
        f"SELECT {_INBOUND_COLUMNS} FROM inbound WHERE id = ?", (inbound_id,)))
    return InboundRow.from_row(rows[0]) if rows else None


@dataclass(frozen=True, slots=True)
class InboundDetails:
    """Everything stored about one inbound message except its raw bytes (`inbox show`)."""

    id: int
    message_id: str
    sha256: str
    size: int
    peer: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    received_at: str
    state: InboundState
    attempts: int
    outcome: str | None
    ticket: int | None
    error: str | None
    report: str | None  # the parsed report as JSON (see StoredReport)
    processed_at: str | None
    auth: str | None
    auth_reason: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> InboundDetails:
        return cls(row["id"], row["message_id"], row["sha256"], row["size"], row["peer"],
                   row["mail_from"], tuple(json.loads(row["rcpt_tos"])), row["received_at"],
                   InboundState(row["state"]), row["attempts"], row["outcome"], row["ticket"],
                   row["error"], row["report"], row["processed_at"], row["auth"],
                   row["auth_reason"])


async def inbound_details(conn: aiosqlite.Connection, inbound_id: int) -> InboundDetails | None:
    """Everything stored about one inbound message except its raw bytes."""
    rows = list(await conn.execute_fetchall(
        "SELECT id, message_id, sha256, size, peer, mail_from, rcpt_tos, received_at, state,"
        " attempts, outcome, ticket, error, report, processed_at, auth, auth_reason"
        " FROM inbound WHERE id = ?", (inbound_id,)))
    return InboundDetails.from_row(rows[0]) if rows else None


@dataclass(frozen=True, slots=True)
class StoredReport:
    """What is read back of the parsed report stored with a processed message (the
    duplicate check compares them); None where the stored report lacks the key."""

    sender: str | None = None
    subject: str | None = None


async def inbound_report(conn: aiosqlite.Connection, inbound_id: int) -> StoredReport:
    """The parsed report stored with a processed inbound message (all None when none)."""
    rows = list(await conn.execute_fetchall("SELECT report FROM inbound WHERE id = ?", (inbound_id,)))
    if not rows or not rows[0][0]:
        return StoredReport()
    try:
        value = json.loads(rows[0][0])
    except ValueError:
        return StoredReport()
    if not isinstance(value, dict):
        return StoredReport()
    return StoredReport(value.get("sender"), value.get("subject"))


async def requeue_inbound(conn: aiosqlite.Connection, inbound_id: int) -> bool:
    cursor = await conn.execute(
        f"UPDATE inbound SET state = '{InboundState.QUEUED}', attempts = 0 WHERE id = ?"
        f" AND state != '{InboundState.PROCESSING}'", (inbound_id,))
    return cursor.rowcount == 1


async def count_inbound_by_state(conn: aiosqlite.Connection) -> dict[InboundState, int]:
    rows = await conn.execute_fetchall("SELECT state, count(*) FROM inbound GROUP BY state")
    return {InboundState(r[0]): r[1] for r in rows}


async def processed_with_message_id(conn: aiosqlite.Connection, message_id: str,
                                    exclude_id: int) -> list[InboundRow]:
    """Other inbound messages with this Message-ID that were already routed. Any other,
    not only earlier ones: with several workers a later copy may be recorded first, and
    whichever is recorded second is the duplicate."""
    rows = await conn.execute_fetchall(
        f"SELECT {_INBOUND_COLUMNS} FROM inbound WHERE message_id = ? AND id != ?"
        f" AND state = '{InboundState.DONE}' AND outcome IS NOT NULL"
        f" AND outcome NOT IN ('{Outcome.DUPLICATE}', '{Outcome.FAILED}',"
        f" '{Outcome.CLOSED_REJECTED}')"
        " ORDER BY id LIMIT 20", (message_id, exclude_id))
    return [InboundRow.from_row(r) for r in rows]
