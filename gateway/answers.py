"""The mail a decision causes, rendered, composed and queued in the outbox (inside
the caller's transaction): automatic answers to the sender, notices in a ticket's
thread (with the dispatcher's copy), staff copies of customer mail."""

from __future__ import annotations


import dataclasses
import logging
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import aiosqlite

from gateway import msgid, store, texts
from gateway.model import (FIELD_NAMES, TICKET_REF, Attachment, Fields, MessageKind, OutAttachment,
                           Outgoing, Report, Status, Verdict)
from gateway.compose import clean_header_text, compose_message, reply_subject
from gateway.store import InboundRow, TicketRow
from gateway.context import Context

log = logging.getLogger(__name__)

_LEADING_TOKEN = re.compile(r"^\s*\[?\s*#[0-9]{6}(?![0-9])\s*\]?\s*[:\-–]?\s*", re.ASCII)

_REPLY_PREFIX = re.compile(r"^\s*((re|odp|aw|wg|fw|fwd|pd|tr|sv|vs)\s*(\[\d+\])?\s*:\s*)+",
                           re.IGNORECASE)


def answer_address(report: Report, row: InboundRow) -> str:
    """Where an answer about no particular ticket goes: the From address. Never the
    Reply-To: a forged From plus one's own Reply-To must not draw ticket mail."""
    return (report.sender or row.mail_from).lower()


# Answers about no particular ticket go at most once a day per address and kind: a
# customer's own helpdesk robot answering our notice must not make a loop.
DAMPED_EVENTS = frozenset({"held_notice", "unknown_ticket_guidance", "closed_ticket_guidance"})


DAMPING = timedelta(hours=24)


# Logs attached to a staff copy, in all (SPEC §9); bigger ones are listed only.
STAFF_COPY_LOG_LIMIT = 10 * 1024 * 1024


def staff_recipients(ctx: Context, ticket: TicketRow) -> list[str]:
    """The assignee, else every `notify` address."""
    if ticket.assignee:
        return [ticket.assignee]
    return list(ctx.config.addresses.notify)


def logs_to_attach(attachments: tuple[Attachment, ...]) -> set[str]:
    """The sha256 of the logs that fit, in order, in STAFF_COPY_LOG_LIMIT."""
    chosen, total = set(), 0
    for attachment in attachments:
        if attachment.is_log and total + attachment.size <= STAFF_COPY_LOG_LIMIT:
            chosen.add(attachment.sha256)
            total += attachment.size
    return chosen


async def copy_to_staff(conn: aiosqlite.Connection, ctx: Context, ticket: TicketRow,
                        report: Report, saved: list[dict[str, Any]], now: datetime, *,
                        kind: texts.CopyKind, verdict: Verdict) -> None:
    """Every customer message that enters a ticket goes to the desk: the new text, the
    attachments with sizes (logs attached up to 10 MiB), Reply-To crm@ and a Message-ID
    of ours, so that pressing Reply answers the customer in the thread."""
    recipients = staff_recipients(ctx, ticket)
    if not recipients:
        return
    attach = logs_to_attach(report.attachments)
    files = tuple(OutAttachment(a.filename, a.content_type, a.data)
                  for a in report.attachments if a.sha256 in attach)
    listing = tuple(texts.StaffFile(filename=a.filename, size=a.size, is_log=a.is_log,
                                    attached=a.sha256 in attach) for a in report.attachments)
    text = texts.StaffCopy(
        template_context(ctx, ticket),
        fields=ticket_fields(ticket), missing=tuple(ticket.missing), status=Status(ticket.status),
        phone_confirmation_required=ticket.phone_confirmation_required and kind == "new",
        reporter=report.sender or ticket.reporter_email, text=report.text, copy_kind=kind,
        verdict=f"{verdict.result}: {verdict.reason}", files=listing,
        notes=tuple(report.notes), dispatcher=ticket.dispatcher or "",
        contact=ticket.contact_email or "", assignee=ticket.assignee or "",
        linked=ticket.linked_to if kind == "new" else None)
    body = ctx.renderer.render(text)
    name = clean_header_text(report.sender_name or ticket.reporter_name or report.sender)
    for address in recipients:
        out = Outgoing(kind="staff_copy", ticket=ticket.number, to=address,
                       subject=reply_subject(ticket.number, ticket.subject, language=ctx.language),
                       body=body, auto=True, auto_submitted="auto-generated", attachments=files,
                       urgent=ticket.phone_confirmation_required and kind == "new",
                       from_name=f"{name} via S4E" if name else "")
        await queue(conn, ctx, out, now, inbound_id=None, record_ticket=None)


def template_context(ctx: Context, ticket: TicketRow | None) -> texts.Common:
    """The shared part of every text: our addresses and numbers, and the ticket."""
    phones = tuple(ctx.config.tickets.phone_numbers)
    if ticket is None:
        return texts.Common(intake=ctx.intake, crm=ctx.crm, phone_numbers=phones)
    return texts.Common(intake=ctx.intake, crm=ctx.crm, phone_numbers=phones,
                        number=ticket.number, subject=ticket.subject)


def ticket_fields(ticket: TicketRow) -> Fields:
    return Fields(**{name: getattr(ticket, name) for name in FIELD_NAMES})


async def report_context(conn: aiosqlite.Connection,
                         ticket: TicketRow) -> tuple[Fields, int, int | None]:
    """What the acknowledgement and the missing-fields request show: (the fields, how
    many attachments arrived, how many of them logs); never their names: free text."""
    attachments = await store.ticket_attachments(conn, ticket.number)
    return (ticket_fields(ticket), *texts.attachment_counts(attachments))


# Events that answer about a ticket and go to its reporter (and the dispatcher in Cc).
_TICKET_ANSWERS = frozenset({"acknowledgement", "missing_fields", "rating_request"})


# Answers whose text needs nothing but the shared part.
_PLAIN_ANSWERS: dict[str, Callable[[texts.Common], texts.Text]] = {
    cls.event: cls for cls in (texts.RatingRequest, texts.HeldNotice,
                               texts.UnknownTicketGuidance, texts.ClosedTicketGuidance)}


async def answer(conn: aiosqlite.Connection, ctx: Context, row: InboundRow, report: Report,
                 event: str, now: datetime, *, ticket: TicketRow | None = None,
                 record: bool = True, again: bool = False,
                 staff_notice: tuple[str, str] | None = None,
                 notice_ticket: int | None = None) -> None:
    """An automatic answer to the message in hand, in its thread (once per message and
    kind, also when the message is processed again). About a ticket it goes to the
    ticket's reporter; otherwise to the From address."""
    if await store.answered(conn, row.id, event):
        return
    if ticket is not None and event in _TICKET_ANSWERS:
        to = ticket.reporter_email
    else:
        to = answer_address(report, row)
    if not to or to in (ctx.intake, ctx.crm):
        log.warning("%s: no address to answer (%r)", report.message_id, to)
        return
    topic = str(report.ticket_refs[0]) if report.ticket_refs else ""
    if event in DAMPED_EVENTS and await store.sent_since(conn, to, event, topic,
                                                         now - DAMPING):
        log.info("%s: %s to %s already sent within a day: not again",
                 report.message_id or "<no-id>", event, to)
        return
    common = template_context(ctx, ticket)
    if ticket is None and staff_notice is None and event != "closed_ticket_guidance":
        common = dataclasses.replace(common, subject=report.subject)
    text: texts.Text
    if ticket is not None and event in ("acknowledgement", "missing_fields"):
        fields, files, logs = await report_context(conn, ticket)
        if event == "missing_fields":
            text = texts.MissingFields(common, fields=fields, attachments=files,
                                       log_attachments=logs, missing=tuple(ticket.missing),
                                       again=again)
        else:
            text = texts.Acknowledgement(
                common, fields=fields, attachments=files, log_attachments=logs,
                phone_confirmation_required=ticket.phone_confirmation_required)
    elif staff_notice is not None:
        notice = await store.get_ticket(conn, notice_ticket) if notice_ticket else None
        common = template_context(ctx, notice)
        if notice is None and notice_ticket is not None:
            common = dataclasses.replace(common, number=notice_ticket)
        text = texts.StaffNotice(common, problem=staff_notice[0], detail=staff_notice[1],
                                 status=Status(notice.status) if notice else None)
    else:
        text = _PLAIN_ANSWERS[event](common)
    body = ctx.renderer.render(text)
    number = ticket.number if ticket is not None else None
    subject_source = ticket.subject if ticket is not None else ticket_subject(report.subject)
    if staff_notice is not None:
        number = None  # about a ticket, but not in the customer's thread
        subject_source = report.subject
    out = Outgoing(kind=event, ticket=number, to=to,
                   subject=reply_subject(number, subject_source, language=ctx.language),
                   body=body, in_reply_to=report.message_id,
                   references=tuple(report.references), auto=True)
    if ticket is not None and record and event in _TICKET_ANSWERS:
        await queue_ticket_mail(conn, ctx, ticket, out, now, inbound_id=row.id, topic=topic)
    else:
        await queue(conn, ctx, out, now, inbound_id=row.id,
                    record_ticket=number if record else None, topic=topic)


async def notify(conn: aiosqlite.Connection, ctx: Context, ticket: TicketRow | None,
                 text: texts.Text, now: datetime, *, in_reply_to: Report | None = None,
                 auto: bool = True, files: tuple[Any, ...] = (),
                 kind: str = MessageKind.NOTICE, author: str | None = None,
                 inbound_id: int | None = None, from_name: str = "") -> None:
    """A notice to the ticket's reporter in the ticket's thread (status changes, staff
    replies, closing), with a copy to the ticket's dispatcher. `text` is built with
    `template_context(ctx, ticket)` as its shared part."""
    assert ticket is not None
    if in_reply_to is not None:
        parent, refs = in_reply_to.message_id, tuple(in_reply_to.references)
    else:
        parent, refs = await thread_tail(conn, ticket.number)
    out = Outgoing(kind=text.event, ticket=ticket.number, to=ticket.reporter_email,
                   subject=reply_subject(ticket.number, ticket.subject, language=ctx.language),
                   body=ctx.renderer.render(text), in_reply_to=parent,
                   references=refs, auto=auto, attachments=files, from_name=from_name)
    await queue_ticket_mail(conn, ctx, ticket, out, now, inbound_id=inbound_id,
                            record_kind=kind, author=author, counted=False)


async def queue_ticket_mail(conn: aiosqlite.Connection, ctx: Context, ticket: TicketRow,
                            out: Outgoing, now: datetime, *, inbound_id: int | None,
                            record_kind: str = MessageKind.NOTICE, author: str | None = None,
                            topic: str = "", counted: bool = True) -> None:
    """One mail of the ticket's thread: to the reporter, and the same mail to the
    dispatcher, who is shown in Cc (SPEC §4). `counted`: it answers the inbound message
    (the automatic-answer cap counts it)."""
    dispatcher = ticket.dispatcher if ticket.dispatcher not in (None, "", out.to) else None
    if dispatcher:
        out = dataclasses.replace(out, cc=(dispatcher,))
    await queue(conn, ctx, out, now, inbound_id=inbound_id if counted else None,
                record_ticket=ticket.number, topic=topic, record_kind=record_kind,
                author=author, record_inbound=inbound_id)
    if dispatcher:
        await queue(conn, ctx, out, now, inbound_id=inbound_id if counted else None,
                    record_ticket=None, topic=topic, rcpt=dispatcher)


async def thread_tail(conn: aiosqlite.Connection, ticket: int) -> tuple[str, tuple[str, ...]]:
    """In-Reply-To and References for a notice that answers no particular message: the
    thread's first message and its latest ones."""
    ids = [r.message_id for r in await store.ticket_messages(conn, ticket)
           if not r.message_id.endswith("@local>")]
    if not ids:
        return "", ()
    refs = tuple(dict.fromkeys([ids[0], *ids[-8:]]))
    return ids[-1], refs


async def queue(conn: aiosqlite.Connection, ctx: Context, out: Outgoing, now: datetime, *,
                inbound_id: int | None, record_ticket: int | None,
                topic: str = "", record_kind: str = MessageKind.NOTICE,
                author: str | None = None, rcpt: str | None = None,
                record_inbound: int | None = None) -> int | None:
    """Compose and put one mail in the outbox (inside the caller's transaction).
    `rcpt`: the envelope recipient when it is not the To (a copy to the dispatcher)."""
    message_id = msgid.make_message_id(ctx.hmac_key, ctx.domain, out.ticket)
    rcpt_to = rcpt or out.to
    try:
        raw = compose_message(out, from_addr=ctx.crm, message_id=message_id, date=now)
    except ValueError as err:
        log.warning("%s: not sending %s to %r: %s", message_id, out.kind, rcpt_to, err)
        if out.ticket is not None:  # where staff look: the customer got nothing
            current = await store.get_ticket(conn, out.ticket)
            if current is not None:
                await store.add_history(conn, ticket=out.ticket, from_status=None,
                                        to_status=current.status, actor="gateway", now=now,
                                        note=f"{out.kind} to {rcpt_to!r} not sent: {err}")
        return None
    outbox_id = await store.enqueue_outbox(
        conn, ticket=out.ticket, inbound_id=inbound_id, kind=out.kind, message_id=message_id,
        mail_from=ctx.crm, rcpt_to=rcpt_to, subject=out.subject, auto=out.auto, raw=raw,
        now=now, topic=topic)
    if record_ticket is not None:
        await store.add_ticket_message(
            conn, ticket=record_ticket, direction="out", outbox_id=outbox_id,
            from_addr=ctx.crm, to_addrs=[out.to, *out.cc], subject=out.subject,
            message_id=message_id, date=now, body=out.body, kind=record_kind,
            author=author, inbound_id=record_inbound)
    return outbox_id


def ticket_subject(subject: str, *, drop_tokens: bool = False) -> str:
    """The customer's subject without leading reply prefixes and ticket tokens, so the
    subject of every later mail is "[#NNNNNN] <this>". A token inside the text
    ("Ponowna awaria (dot. #610190)") is the customer's words and stays, except for a
    new ticket linked to a closed one (`drop_tokens`): there the old number loses its
    "#", so neither the customer nor the router takes it for this ticket's."""
    text, previous = subject.strip(), None
    while previous != text:
        previous = text
        text = _REPLY_PREFIX.sub("", text)
        text = _LEADING_TOKEN.sub("", text)
    if drop_tokens:
        text = TICKET_REF.sub(lambda m: m.group(1), text)
    return re.sub(r"\s+", " ", text).strip()[:200]
