"""One stored message through the stages: parse -> look up -> decide -> apply.

`process_message` is the processor's `Stages`: it reads the raw message, parses it,
gives it its sender verdict, looks up the ticket a token or the thread names
(`look_up` -> `Situation`), lets the router decide (pure), and applies the decision
in ONE transaction with the outbound mail it causes and the inbound row's outcome
(`APPLY`: one table from decision to what it changes and answers). Reprocessing a
message is idempotent: a message already routed into a ticket is not applied twice.
"""

from __future__ import annotations


import asyncio
import dataclasses
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiosqlite

from gateway import msgid, store
from gateway.attachments import attachment_rows, cut_attachments, spans_to_json
from gateway.attachment_store import AttachmentStore
from gateway.errors import StoreError
from gateway.intake_signal import IntakeSignal, hold_back
from gateway.model import (UNVERIFIED, AuthResult,
                           InboundState, Outcome, Report, Status, Verdict)
from gateway.parser import parse_report
from gateway.processor import BatchResult, Processed, is_environmental
from gateway.router import (AppendToTicket, ClosedTicketGuidance, Decision,
                            HoldForOperator, NewTicket, Situation, StaffMail,
                            StaffRefused, StoreOnly, TicketView, UnknownTicketGuidance, decide,
                            is_authorised)
from gateway.store import InboundRow, TicketRow, Tx
from gateway.context import Context, domain_of
from gateway.ticket_changes import (Apply, append_to_ticket, apply_staff_mail, guide_closed,
                                    guide_unknown, hold_for_operator, open_ticket, refuse_staff,
                                    store_only)
from gateway.answers import answer_address

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A message read, parsed and given its sender verdict: all that needs no
    transaction, done before one is opened."""

    row: InboundRow
    report: Report
    raw: bytes
    verdict: Verdict
    saved: list[dict[str, Any]]  # the attachment rows to record
    cut_raw: bytes  # the raw without the attachment bytes (stored once elsewhere)
    spans: list[Any]
    release: bool = False
    new_ticket: bool = False


@dataclass(frozen=True, slots=True)
class Recorded:
    processed: Processed
    reason: str  # the router's, for the log line


async def process_message(conn: aiosqlite.Connection, ctx: Context, row: InboundRow, *,
                          release: bool = False, new_ticket: bool = False) -> Processed:
    """`release`: an operator vouches for the sender (held release); with `new_ticket`
    the message is taken as a new report, whatever it names (sent to crm@ by mistake)."""
    prepared = await prepare(conn, ctx, row, release=release, new_ticket=new_ticket)
    if isinstance(prepared, Processed):
        return prepared
    async with Tx(conn):
        recorded = await record(conn, ctx, prepared)
    log_recorded(prepared, recorded)
    ctx.wake_mailer()
    return recorded.processed


# The longest a batch's transaction stays open for more reports: SQLite has one write
# lock, and intake's 250 waits behind it. With processing workers (SQLite: the intake
# signal says when intake writes) 2 ms while intake is writing: against 8 ms it gave
# intake 1.18x the messages/s at 20 sessions and 1.15x for a lone sender
# (bench_intake --compare-path). While intake is quiet, up to 50 ms, ended the moment
# intake asks for the lock: each commit costs ~3 ms (WAL pages and fsync) and each
# transaction first re-reads the pages other connections changed, so a backlog goes
# fastest in few, long transactions. Without the signal (inline processing behind the
# in-process write gate, PostgreSQL) 8 ms throughout.
BATCH_HOLD_SECONDS = 0.008
BATCH_HOLD_INTAKE_SECONDS = 0.002
BATCH_HOLD_QUIET_SECONDS = 0.05
# The most stored bytes prepared at once (each message parsed, its attachments decoded,
# waits in memory for its transaction): a burst of reports with large log archives is
# taken in chunks.
BATCH_BYTES = 16 * 1024 * 1024


def _hold(intake: IntakeSignal | None, mark: int) -> float:
    """How long the next transaction may stay open: short while intake is writing
    (it wrote since `mark`, the count of its writes when we last looked, or waits now),
    long while it is quiet."""
    if intake is None:
        return BATCH_HOLD_SECONDS
    if intake.waiting() or intake.writes_done() != mark:
        return BATCH_HOLD_INTAKE_SECONDS
    return BATCH_HOLD_QUIET_SECONDS


def _room(intake: IntakeSignal | None, hold: float, held: float) -> bool:
    """Whether a transaction open for `held` seconds takes one more report. A long one
    (intake was quiet) ends as soon as intake wants the lock."""
    if held >= hold:
        return False
    return not (hold > BATCH_HOLD_INTAKE_SECONDS and intake is not None and intake.waiting())


async def process_batch(conn: aiosqlite.Connection, ctx: Context, rows: list[InboundRow],
                        *, intake: IntakeSignal | None = None) -> list[BatchResult]:
    """Several messages, in arrival order, in as few transactions as BATCH_HOLD_SECONDS
    allows: one commit (one fsync) for many reports under load. Each message is
    recorded under a savepoint, so one that fails leaves the others; each sees what
    the ones before it wrote (a reply to the ticket the report just before opened).
    An environmental failure (disk full, database locked) stops the batch there: that
    message's result is the error, the ones after it are None, and nothing of the open
    transaction is kept (what earlier transactions committed stands).

    `intake` (a worker on SQLite): a transaction does not begin while the SMTP process
    is committing or waiting to (intake_signal.hold_back)."""
    results: list[BatchResult] = [None] * len(rows)
    start = 0
    while start < len(rows):
        end, size = start + 1, rows[start].size
        while end < len(rows) and size + rows[end].size <= BATCH_BYTES:
            size, end = size + rows[end].size, end + 1
        if not await _prepare_and_record(conn, ctx, rows, range(start, end), results, intake):
            break  # an environmental failure: the rest stays in hand
        start = end
    return results


async def _prepare_and_record(conn: aiosqlite.Connection, ctx: Context,
                              rows: list[InboundRow], chunk: range, results: list[BatchResult],
                              intake: IntakeSignal | None) -> bool:
    """One chunk of process_batch; False when an environmental failure stopped it."""
    intake_mark = intake.writes_done() if intake is not None else 0
    ready: list[tuple[int, Prepared]] = []
    for i in chunk:
        try:
            prepared = await prepare(conn, ctx, rows[i])
        except Exception as err:  # noqa: BLE001 - the processor decides what it means
            results[i] = err
            if is_environmental(err):
                return False
            continue
        if isinstance(prepared, Processed):
            results[i] = prepared
        else:
            ready.append((i, prepared))
    loop = asyncio.get_running_loop()
    pos = 0
    while pos < len(ready):
        first, recorded = pos, []
        await hold_back(intake)
        try:
            async with Tx(conn):
                opened = loop.time()
                # Chosen once the lock is ours: a BEGIN that waited behind intake
                # makes this transaction a short one.
                hold = _hold(intake, intake_mark)
                intake_mark = intake.writes_done() if intake is not None else 0
                while pos < len(ready) and (
                        pos == first or _room(intake, hold, loop.time() - opened)):
                    i, prepared = ready[pos]
                    pos += 1
                    try:
                        async with store.savepoint(conn):
                            recorded.append((i, prepared, await record(conn, ctx, prepared)))
                    except Exception as err:  # noqa: BLE001
                        if is_environmental(err) or not conn.in_transaction:
                            raise
                        results[i] = err
        except Exception as err:  # noqa: BLE001 - nothing of this transaction is kept
            for i, _ in ready[first:]:
                results[i] = None  # still in hand
            # The message in hand when it failed; this transaction's first when its
            # BEGIN failed (never one an earlier transaction committed).
            results[ready[max(pos - 1, first)][0]] = err
            return False
        for i, prepared, outcome in recorded:
            results[i] = outcome.processed
            log_recorded(prepared, outcome)
        ctx.wake_mailer()
    return True


async def prepare(conn: aiosqlite.Connection, ctx: Context, row: InboundRow, *,
                  release: bool = False, new_ticket: bool = False) -> Prepared | Processed:
    """Everything before the transaction; a Processed when there is nothing to record."""
    recorded = await store.ticket_of_inbound(conn, row.id)
    if recorded is not None and row.outcome and not release:
        # Reprocessing a message already in a ticket changes nothing (idempotent).
        await store.mark_inbound(conn, row.id, state=InboundState.DONE, outcome=row.outcome,
                                 ticket=recorded)
        return Processed(Outcome(row.outcome), recorded)
    raw = await store.read_raw(conn, row.id, ctx.attachments)
    report = await ctx.offload(parse_report, raw)
    if release:
        verdict = Verdict(AuthResult.PASS, "released by an operator", domain_of(report.sender))
    else:
        # The DNS checks wait on the network: a thread of their own even in a worker.
        run = asyncio.to_thread if ctx.config.auth.verify == "dns" else ctx.offload
        verdict = await run(ctx.verdict_for, raw, row.peer, row.mail_from)
    await ctx.attachments.save(conn, report.attachments)
    # The bytes are safe now: the stored raw need not carry them again.
    cut_raw, spans = await ctx.offload(cut_attachments, raw, report.attachments)
    return Prepared(row, report, raw, verdict, attachment_rows(report.attachments), cut_raw,
                    spans, release, new_ticket)


async def record(conn: aiosqlite.Connection, ctx: Context, prepared: Prepared) -> Recorded:
    """Inside the caller's transaction: look up, decide, apply, mark the row done."""
    row, report, verdict = prepared.row, prepared.report, prepared.verdict
    await store.confirm_claim(conn, row)
    situation = await look_up(conn, ctx, row, report, prepared.raw, verdict)
    if prepared.release:
        situation = dataclasses.replace(situation, authorised=True, duplicate_of=None,
                                        to_intake=prepared.new_ticket,
                                        to_crm=not prepared.new_ticket,
                                        auto_replies_last_hour=0)
        if prepared.new_ticket:
            situation = dataclasses.replace(situation, ticket=None, named_ref=None,
                                            staff_sender=False)
    decision = decide(situation)
    ticket = await apply(conn, ctx, row, report, situation, decision, prepared.saved,
                         ctx.clock())
    await store.mark_inbound(conn, row.id, state=InboundState.DONE, outcome=decision.outcome,
                             ticket=ticket, report=report_json(report),
                             auth=verdict.result, auth_reason=verdict.reason)
    if prepared.spans:
        await store.store_cut_raw(conn, row.id, prepared.cut_raw,
                                  spans_to_json(prepared.spans))
    return Recorded(Processed(decision.outcome, ticket), getattr(decision, "reason", ""))


def log_recorded(prepared: Prepared, recorded: Recorded) -> None:
    ticket = recorded.processed.ticket
    log.info("%s inbound %d: outcome=%s ticket=%s (%s)",
             prepared.report.message_id or "<no-id>", prepared.row.id,
             recorded.processed.outcome, f"#{ticket:06d}" if ticket else "-", recorded.reason)


async def look_up(conn: aiosqlite.Connection, ctx: Context, row: InboundRow,
                  report: Report, raw: bytes, verdict: Verdict = UNVERIFIED) -> Situation:
    cfg = ctx.config
    rcpts = {r.lower() for r in row.rcpt_tos}
    sender = report.sender or row.mail_from.lower()
    named_ref = None
    ticket: TicketRow | None = None
    for number in report.ticket_refs:
        named_ref = named_ref if named_ref is not None else number
        ticket = await store.get_ticket(conn, number)
        if ticket is not None:
            break
    if ticket is None:
        threaded = await thread_ticket(conn, ctx, report)
        if threaded is not None:
            ticket = await store.get_ticket(conn, threaded)
    view = ticket_view(ticket) if ticket else None
    staff_sender = domain_of(sender) in cfg.addresses.staff_domains
    # Staff domains admit mail only from a verified sender (SPEC §10).
    authorised = view is not None and is_authorised(
        sender, view, staff_domains=cfg.addresses.staff_domains if verdict.passed else (),
        reply_policy=cfg.tickets.reply_policy)
    participant = view is not None and (sender == view.reporter_email or sender in view.participants)
    own = is_own_mail(ctx, report)
    duplicate = await earlier_copy(conn, row, report, raw, ctx.attachments)
    since = ctx.clock() - timedelta(hours=1)
    # The cap counts answers per sender and per recipient: this From and the e-mail
    # its report names, each without a +tag.
    policy = ctx.policy()
    replies = await store.auto_replies_since(
        conn, {answer_address(report, row), (report.fields.reporter_email or "").lower()}, since,
        at_most=policy.max_auto_replies_per_hour)
    return Situation(report=report, mail_from=row.mail_from, to_intake=ctx.intake in rcpts,
                     to_crm=ctx.crm in rcpts, named_ref=named_ref, ticket=view,
                     authorised=authorised, own_mail=own, duplicate_of=duplicate,
                     auto_replies_last_hour=replies, policy=policy,
                     is_participant=participant, verdict=verdict, staff_sender=staff_sender)


async def earlier_copy(conn: aiosqlite.Connection, row: InboundRow, report: Report,
                       raw: bytes, attachments: AttachmentStore) -> int | None:
    """An earlier routed message with the same Message-ID and the same content: body,
    From and Subject (other headers may differ: another path, another forwarder). The
    same Message-ID on a different body, sender or subject is another message: devices
    and scripts reuse ids, and one alarm script may report for several customers."""
    if not report.message_id:
        return None
    digest = store.body_digest(raw)
    for earlier in await store.processed_with_message_id(conn, report.message_id, row.id):
        try:
            earlier_raw = await store.read_raw(conn, earlier.id, attachments)
        except StoreError:  # dropped by keep_raw: nothing to compare, not the same
            continue
        if store.body_digest(earlier_raw) != digest:
            continue
        seen = await store.inbound_report(conn, earlier.id)
        if (report.sender if seen.sender is None else seen.sender,
                report.subject if seen.subject is None else seen.subject) == (
                report.sender, report.subject):
            return earlier.id
    return None


async def thread_ticket(conn: aiosqlite.Connection, ctx: Context, report: Report) -> int | None:
    """The ticket the thread names: a Message-ID of ours verified by its HMAC, else one
    we received for a ticket. A forged reference to one of ours is not trusted."""
    ids = [*reversed(report.references), *report.in_reply_to]
    for message_id in ids:
        ours, number = msgid.verify_message_id(ctx.hmac_key, message_id)
        if ours and number is not None:
            return number
    candidates = [m for m in ids if not m.lower().endswith(f"@{ctx.domain}>")]
    return await store.ticket_for_message_ids(conn, candidates)


def is_own_mail(ctx: Context, report: Report) -> bool:
    ours, _ = msgid.verify_message_id(ctx.hmac_key, report.message_id)
    return ours


def ticket_view(ticket: TicketRow) -> TicketView:
    return TicketView(ticket.number, Status(ticket.status), ticket.reporter_email,
                      ticket.participants)


# One table from the router's decision to what it changes and answers (each entry in
# ticket_changes): every Decision type has exactly one row (tests/test_stages_table.py).
APPLY: dict[type, Apply] = {
    NewTicket: open_ticket,
    AppendToTicket: append_to_ticket,
    StaffMail: apply_staff_mail,
    StaffRefused: refuse_staff,
    ClosedTicketGuidance: guide_closed,
    UnknownTicketGuidance: guide_unknown,
    HoldForOperator: hold_for_operator,
    StoreOnly: store_only,
}


async def apply(conn: aiosqlite.Connection, ctx: Context, row: InboundRow, report: Report,
                situation: Situation, decision: Decision, saved: list[dict[str, Any]],
                now: datetime) -> int | None:
    """Apply `decision` inside the caller's transaction; the ticket it concerns."""
    return await APPLY[type(decision)](conn, ctx, row, report, situation, decision, saved, now)


def report_json(report: Report) -> str:
    data = {
        "message_id": report.message_id, "sender": report.sender,
        "sender_name": report.sender_name, "subject": report.subject,
        "fields": report.fields.as_dict(), "missing": list(report.missing),
        "ticket_refs": list(report.ticket_refs), "auto_reasons": list(report.auto_reasons),
        "bounced_ids": list(report.bounced_ids), "rating": report.rating,
        "notes": list(report.notes),
        "attachments": [{"filename": a.filename, "content_type": a.content_type,
                         "size": a.size, "sha256": a.sha256, "is_log": a.is_log}
                        for a in report.attachments],
    }
    return json.dumps(data, ensure_ascii=False)
