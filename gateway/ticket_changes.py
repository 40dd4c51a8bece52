"""What a decision changes in the tickets (inside the processing transaction): a
new ticket, a follow-up appended, a report completed, a rating, a held message, an
engineer's mail applied or refused."""

from __future__ import annotations


import json
from collections.abc import Awaitable, Callable
import logging
from datetime import datetime
from typing import Any

import aiosqlite

from gateway import store, texts
from gateway.model import (FIELD_NAMES, UNVERIFIED, Fields, MessageKind, OutAttachment,
                           Report, Status, Verdict, missing_fields)
from gateway.compose import clean_header_text
from gateway.staff_mail import parse_staff_mail
from gateway.router import (AppendToTicket, ClosedTicketGuidance, HoldForOperator,
                            NewTicket, Situation, StaffMail, StaffRefused, StoreOnly,
                            UnknownTicketGuidance)
from gateway.store import InboundRow, TicketRow
from gateway.context import Context, domain_of
from gateway.answers import (answer, answer_address, copy_to_staff, notify, template_context,
                             ticket_subject)

log = logging.getLogger(__name__)

# What applying one kind of decision does: (conn, ctx, the inbound row, its report, the
# situation the router saw, the decision, the saved attachments, now) -> the ticket.
Apply = Callable[[aiosqlite.Connection, Context, InboundRow, Report, Situation, Any,
                  list[dict[str, Any]], datetime], Awaitable[int | None]]



async def hold(conn: aiosqlite.Connection, row: InboundRow, report: Report,
               ticket: int | None, reason: str, now: datetime) -> None:
    """Kept for operators (`held list`): the notice we send promises a review."""
    await store.add_held(conn, inbound_id=row.id, ticket=ticket,
                         sender=report.sender or row.mail_from, subject=report.subject,
                         reason=reason, now=now)


def choose_reporter(report: Report, row: InboundRow) -> tuple[str, str | None, str | None]:
    """(reporter, dispatcher, contact) of a new report (SPEC §4).

    The e-mail the body names becomes the reporter only when it is in the sender's own
    domain; the sender, a dispatcher, then gets a copy of every mail. A body address in
    another domain is only a contact for staff: otherwise anyone could make crm@ mail
    any address by naming it in a report."""
    sender = answer_address(report, row)
    named = (report.fields.reporter_email or "").strip().lower()
    if not named or named == sender or not sender:
        return sender or named, None, None
    if domain_of(named) == domain_of(sender):
        return named, sender, None
    return sender, None, named


async def open_ticket(conn: aiosqlite.Connection, ctx: Context, row: InboundRow,
                      report: Report, situation: Situation, decision: NewTicket,
                      saved: list[dict[str, Any]], now: datetime) -> int:
    fields = report.fields
    missing = missing_fields(fields)
    status = Status.AWAITING_INFO if missing else Status.ACCEPTED
    hours = await store.contract_hours(
        conn, [v for v in (fields.serial_number, fields.commcell_id) if v])
    phone_required = hours is not None and hours < 24
    reporter, dispatcher, contact = choose_reporter(report, row)
    values = {name: getattr(fields, name) for name in FIELD_NAMES}
    subject = ticket_subject(report.subject, drop_tokens=decision.linked_to is not None)
    values.update(
        reporter_email=reporter, status=str(status), subject=subject,
        missing=json.dumps(list(missing)), linked_to=decision.linked_to,
        participants=json.dumps(participants(ctx, report, row)),
        phone_confirmation_required=int(phone_required), dispatcher=dispatcher,
        contact_email=contact, last_customer_at=store.iso(now))
    number = await store.create_ticket(conn, values=values, now=now, draw=ctx.draw_number)
    await store.add_history(conn, ticket=number, from_status=None, to_status=status,
                            actor="gateway", note=decision.reason, now=now)
    await record_inbound(conn, number, row, report, saved, now, verdict=situation.verdict)
    ticket = await store.get_ticket(conn, number)
    assert ticket is not None
    event = "missing_fields" if missing else "acknowledgement"
    if decision.answer:
        await answer(conn, ctx, row, report, event, now, ticket=ticket)
    else:
        await suppressed(conn, ticket, event, now)
    await copy_to_staff(conn, ctx, ticket, report, saved, now, kind="new",
                        verdict=situation.verdict)
    return number


async def suppressed(conn: aiosqlite.Connection, ticket: TicketRow, event: str,
                     now: datetime) -> None:
    """Past the automatic-answer cap the ticket still opens; say so where staff look."""
    log.warning("#%06d: %s not sent: automatic answer limit reached for %s",
                ticket.number, event, ticket.reporter_email)
    await store.add_history(conn, ticket=ticket.number, from_status=ticket.status,
                            to_status=ticket.status, actor="gateway", now=now,
                            note=f"{event} not sent: automatic answer limit per hour reached")


async def append_to_ticket(conn: aiosqlite.Connection, ctx: Context, row: InboundRow,
                           report: Report, situation: Situation, decision: AppendToTicket,
                           saved: list[dict[str, Any]], now: datetime) -> int:
    number = decision.number
    ticket = await store.get_ticket(conn, number)
    assert ticket is not None
    if await already_recorded(conn, number, row.id):
        return number  # reprocessing: never append the same message twice
    await record_inbound(conn, number, row, report, saved, now, verdict=situation.verdict)
    await store.update_ticket(conn, number, now, last_customer_at=store.iso(now))
    kind: texts.CopyKind = "follow_up"
    # reply_policy admits mail into the thread; only the ticket's own people may change
    # its fields or rate it (a From header is easy to forge).
    if situation.is_participant:
        if ticket.status == Status.AWAITING_INFO:
            await complete_report(conn, ctx, row, report, ticket, decision.answer, now)
        elif ticket.status == Status.RESOLVED and report.rating is not None:
            await store.update_ticket(conn, number, now, rating=report.rating,
                                      status=str(Status.CLOSED), closed_at=store.iso(now),
                                      closed_reason="rating")
            await store.add_history(conn, ticket=number, from_status=ticket.status,
                                    to_status=Status.CLOSED, actor="customer",
                                    note=f"rating {report.rating}", now=now)
            closed = await store.get_ticket(conn, number)
            assert closed is not None
            await notify(conn, ctx, closed,
                         texts.Closed(template_context(ctx, closed), rating=report.rating,
                                      reason="rating"), now, in_reply_to=report)
        elif ticket.status == Status.RESOLVED:
            kind = "reply_unrated"
            await ask_for_rating(conn, ctx, row, report, ticket, decision.answer, now)
    current = await store.get_ticket(conn, number)
    assert current is not None
    await copy_to_staff(conn, ctx, current, report, saved, now, kind=kind,
                        verdict=situation.verdict)
    return number


async def ask_for_rating(conn: aiosqlite.Connection, ctx: Context, row: InboundRow,
                         report: Report, ticket: TicketRow, may_answer: bool,
                         now: datetime) -> None:
    """A reply on a resolved ticket without a readable rating ("Dziękuję, działa",
    "Ocena: 4,5"): the ticket stays resolved and its rating window keeps running; the
    customer is asked once per ticket for a rating 1-5."""
    await store.add_history(conn, ticket=ticket.number, from_status=ticket.status,
                            to_status=ticket.status, actor="customer", now=now,
                            note="reply without a rating: for staff")
    if ticket.rating_requested or not may_answer:
        return
    await store.update_ticket(conn, ticket.number, now, rating_requested=1)
    await answer(conn, ctx, row, report, "rating_request", now, ticket=ticket)


async def complete_report(conn: aiosqlite.Connection, ctx: Context, row: InboundRow,
                          report: Report, ticket: TicketRow, may_answer: bool,
                          now: datetime) -> None:
    """A follow-up on awaiting_info: the new text may complete the report."""
    merged = merge_fields(ticket, report)
    missing = missing_fields(merged)
    values: dict[str, Any] = {name: getattr(merged, name) for name in FIELD_NAMES}
    values["reporter_email"] = ticket.reporter_email  # the ticket's reporter stays
    values["missing"] = json.dumps(list(missing))
    hours = await store.contract_hours(
        conn, [v for v in (merged.serial_number, merged.commcell_id) if v])
    values["phone_confirmation_required"] = int(
        ticket.phone_confirmation_required or (hours is not None and hours < 24))
    if not missing:
        values["status"] = str(Status.ACCEPTED)
    await store.update_ticket(conn, ticket.number, now, **values)
    updated = await store.get_ticket(conn, ticket.number)
    assert updated is not None
    if not missing:
        await store.add_history(conn, ticket=ticket.number, from_status=ticket.status,
                                to_status=Status.ACCEPTED, actor="customer",
                                note="report completed", now=now)
    event = "missing_fields" if missing else "acknowledgement"
    if may_answer:
        await answer(conn, ctx, row, report, event, now, ticket=updated, again=bool(missing))
    else:
        await suppressed(conn, updated, event, now)


def merge_fields(ticket: TicketRow, report: Report) -> Fields:
    """What the customer wrote under a label corrects the ticket; guesses (signature,
    From name, free text) only fill what the ticket still lacks."""
    merged = {}
    for name in FIELD_NAMES:
        new, old = getattr(report.fields, name), getattr(ticket, name)
        merged[name] = new if new and (name in report.labelled or not old) else old
    return Fields(**merged)


async def already_recorded(conn: aiosqlite.Connection, ticket: int, inbound_id: int) -> bool:
    rows = await conn.execute_fetchall(
        "SELECT 1 FROM ticket_messages WHERE ticket = ? AND inbound_id = ?", (ticket, inbound_id))
    return bool(rows)


async def record_inbound(conn: aiosqlite.Connection, ticket: int, row: InboundRow,
                         report: Report, saved: list[dict[str, Any]], now: datetime, *,
                         verdict: Verdict = UNVERIFIED,
                         kind: str = MessageKind.CUSTOMER, author: str | None = None,
                         body: str | None = None) -> None:
    await store.add_ticket_message(
        conn, ticket=ticket, direction="in", inbound_id=row.id,
        from_addr=report.sender or row.mail_from, to_addrs=[*report.to, *report.cc],
        subject=report.subject, message_id=report.message_id or f"<inbound.{row.id}@local>",
        date=report.date or now, body=report.text if body is None else body, kind=kind,
        auth=str(verdict.result), author=author)
    await store.replace_attachments(conn, inbound_id=row.id, ticket=ticket, items=saved)


def participants(ctx: Context, report: Report, row: InboundRow) -> list[str]:
    """From/To/Cc of the first message (SPEC §4), without our own addresses."""
    ours = {ctx.intake, ctx.crm}
    seen: list[str] = []
    for address in (report.sender, row.mail_from, *report.to, *report.cc):
        address = (address or "").lower()
        if address and address not in ours and address not in seen:
            seen.append(address)
    return seen



async def apply_staff_mail(conn: aiosqlite.Connection, ctx: Context, row: InboundRow,
                           report: Report, situation: Situation, decision: StaffMail,
                           saved: list[dict[str, Any]], now: datetime) -> int:
    """A verified engineer's mail on an open ticket: commands applied as the CLI would,
    then the text relayed to the reporter in the thread, or kept as an internal note."""
    from gateway import staff  # staff builds on this module's notify/queue

    number = decision.number
    ticket = await store.get_ticket(conn, number)
    assert ticket is not None
    if await already_recorded(conn, number, row.id):
        return number
    engineer = answer_address(report, row)
    mail = parse_staff_mail(report.text)
    if decision.internal:
        await staff.record_note(conn, ctx, ticket, mail.text or "(no text)", author=engineer,
                                now=now, inbound_id=row.id, message_id=report.message_id,
                                subject=report.subject)
        await store.replace_attachments(conn, inbound_id=row.id, ticket=number, items=saved)
    elif mail.text:
        files = tuple(OutAttachment(a.filename, a.content_type, a.data)
                      for a in report.attachments)
        await staff.queue_staff_reply(conn, ctx, ticket, mail.text, files, author=engineer,
                                      now=now, inbound_id=row.id,
                                      from_name=_engineer_name(report))
        await store.replace_attachments(conn, inbound_id=row.id, ticket=number, items=saved)
    else:
        await record_inbound(conn, number, row, report, saved, now, verdict=situation.verdict,
                             kind=MessageKind.STAFF_NOTE, author=engineer,
                             body="commands: " + "; ".join(c.line for c in mail.commands))
    for command in mail.commands:
        current = await store.get_ticket(conn, number)
        assert current is not None
        if command.name == "status":
            await staff.change_status(conn, ctx, current, staff.parse_status(command.value),
                                      None, actor=engineer, now=now)
        else:
            await staff.change_assignee(conn, ctx, current, command.value, actor=engineer,
                                        now=now)
    return number


def _engineer_name(report: Report) -> str:
    name = clean_header_text(report.sender_name)
    return f"{name} – Serwis S4E" if name else ""


async def refuse_staff_mail(conn: aiosqlite.Connection, ctx: Context, row: InboundRow,
                            report: Report, ticket: TicketRow, saved: list[dict[str, Any]],
                            now: datetime, *, problem: str, detail: str,
                            verdict: Verdict) -> None:
    """Not sent to the customer: kept on the thread as a note for staff, and the engineer
    is told why in a short notice."""
    engineer = answer_address(report, row)
    await record_inbound(conn, ticket.number, row, report, saved, now, verdict=verdict,
                         kind=MessageKind.STAFF_NOTE, author=engineer,
                         body=f"[not sent: {problem}{': ' + detail if detail else ''}]\n"
                              f"{report.text}")
    await answer(conn, ctx, row, report, "staff_notice", now,
                 staff_notice=(problem, detail), notice_ticket=ticket.number)


# --- the decisions that open or change no ticket ---------------------------------------

async def refuse_staff(conn: aiosqlite.Connection, ctx: Context, row: InboundRow,
                       report: Report, situation: Situation, decision: StaffRefused,
                       saved: list[dict[str, Any]], now: datetime) -> int | None:
    ticket = await store.get_ticket(conn, decision.number)
    assert ticket is not None  # the router refuses only for a ticket it was shown
    await refuse_staff_mail(conn, ctx, row, report, ticket, saved, now,
                            problem=decision.problem, detail=decision.detail,
                            verdict=situation.verdict)
    return decision.number


async def guide_closed(conn: aiosqlite.Connection, ctx: Context, row: InboundRow,
                       report: Report, situation: Situation, decision: ClosedTicketGuidance,
                       saved: list[dict[str, Any]], now: datetime) -> int | None:
    await store.replace_attachments(conn, inbound_id=row.id, ticket=None, items=saved)
    if not decision.name_ticket:
        await hold(conn, row, report, decision.number,
                   "sender not authorised for the (closed) ticket", now)
    if decision.answer:
        if decision.name_ticket:
            ticket = await store.get_ticket(conn, decision.number)
            await answer(conn, ctx, row, report, "closed_ticket_guidance", now,
                         ticket=ticket, record=False)
        else:
            await answer(conn, ctx, row, report, "held_notice", now)
    return decision.number


async def guide_unknown(conn: aiosqlite.Connection, ctx: Context, row: InboundRow,
                        report: Report, situation: Situation, decision: UnknownTicketGuidance,
                        saved: list[dict[str, Any]], now: datetime) -> int | None:
    await store.replace_attachments(conn, inbound_id=row.id, ticket=None, items=saved)
    if decision.content_free:
        await hold(conn, row, report, situation.named_ref, decision.reason, now)
    if decision.answer:
        event = "held_notice" if decision.content_free else "unknown_ticket_guidance"
        await answer(conn, ctx, row, report, event, now)
    return None


async def hold_for_operator(conn: aiosqlite.Connection, ctx: Context, row: InboundRow,
                            report: Report, situation: Situation, decision: HoldForOperator,
                            saved: list[dict[str, Any]], now: datetime) -> int | None:
    await store.replace_attachments(conn, inbound_id=row.id, ticket=None, items=saved)
    await hold(conn, row, report, decision.ticket, decision.reason, now)
    if decision.answer and situation.staff_sender and decision.ticket is not None:
        # An engineer whose mail could not be verified learns why; never the
        # customer (a forger must not make crm@ write to anyone).
        await answer(conn, ctx, row, report, "staff_notice", now,
                     staff_notice=("not_sent", f"held for an operator: {decision.reason}"),
                     notice_ticket=decision.ticket)
    elif decision.answer:
        await answer(conn, ctx, row, report, "held_notice", now)
    return decision.ticket


async def store_only(conn: aiosqlite.Connection, ctx: Context, row: InboundRow,
                     report: Report, situation: Situation, decision: StoreOnly,
                     saved: list[dict[str, Any]], now: datetime) -> int | None:
    await store.replace_attachments(conn, inbound_id=row.id, ticket=None, items=saved)
    if decision.bounced_ids:
        for number in await store.mark_bounced(
                conn, decision.bounced_ids,
                f"bounced: delivery status notification, inbound {row.id}"):
            log.warning("#%06d: a message to the reporter bounced", number)
    return None
