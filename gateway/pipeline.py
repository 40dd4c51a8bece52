"""The stages one stored message goes through: parse -> look up -> decide -> apply.

`process_message` is the processor's `Stages`: it reads the raw message, parses it
(in a thread: a 25 MB message must not stall the SMTP sessions), looks up the
ticket a token or the thread names, lets the router decide, and applies the
decision in ONE transaction with the outbound mail it causes and the inbound row's
outcome. Reprocessing a message is idempotent: a message already routed into a
ticket is not applied twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from gateway import msgid, store, texts
from gateway.attachments import cut_attachments, save_attachments, spans_to_json
from gateway.config import Config
from gateway.errors import StoreError
from gateway.model import (FIELD_NAMES, TICKET_REF, UNVERIFIED, Attachment, AuthResult,
                           Fields, HeldStatus, InboundState, MessageKind, OutAttachment,
                           Outcome, Outgoing, Report, Status, Verdict, missing_fields)
from gateway.parser import parse_report
from gateway.processor import Processed
from gateway.errors import GatewayError
from gateway.compose import clean_header_text, compose_message, reply_subject
from gateway.sender_auth import verify_sender
from gateway.staff_mail import parse_staff_mail
from gateway.router import (AppendToTicket, ClosedTicketGuidance, Decision,
                            HoldForOperator, NewTicket, Policy, Situation, StaffMail,
                            StaffRefused, StoreOnly, TicketView, UnknownTicketGuidance, decide,
                            is_authorised)
from gateway.store import InboundRow, TicketRow, Tx

log = logging.getLogger(__name__)

HMAC_SETTING = "message_id_hmac_key"
_REPLY_PREFIX = re.compile(r"^\s*((re|odp|aw|wg|fw|fwd|pd|tr|sv|vs)\s*(\[\d+\])?\s*:\s*)+",
                           re.IGNORECASE)


@dataclass
class Context:
    """What the stages need besides the database; built once by the daemon/CLI."""

    config: Config
    renderer: texts.Renderer
    hmac_key: str
    clock: Callable[[], datetime] = store.utcnow
    wake_mailer: Callable[[], None] = lambda: None
    draw_number: Callable[[], int] = field(
        default=lambda: store.TICKET_MIN + secrets.randbelow(store.TICKET_MAX - store.TICKET_MIN + 1))
    # Who really sent a message (SPEC §10): (raw, peer, envelope sender) -> Verdict.
    # Blocking (DNS): called in a thread.
    verify: Callable[[bytes, str, str], Verdict] | None = None
    # How CPU-bound steps (parsing, hashing attachments) run: in a thread in the SMTP
    # process, so a 25 MB message never stalls a session; inline in a worker process,
    # which has no sessions to protect.
    offload: Callable[..., Awaitable[Any]] = asyncio.to_thread

    def verdict_for(self, raw: bytes, peer: str, mail_from: str) -> Verdict:
        if self.verify is not None:
            return self.verify(raw, peer, mail_from)
        return check_sender(self.config, raw, peer, mail_from)

    @property
    def crm(self) -> str:
        return self.config.addresses.crm

    @property
    def intake(self) -> str:
        return self.config.addresses.intake

    @property
    def language(self) -> str:
        return self.config.tickets.language

    @property
    def domain(self) -> str:
        return self.crm.rpartition("@")[2]

    def policy(self) -> Policy:
        return Policy(max_auto_replies_per_hour=self.config.tickets.max_auto_replies_per_hour,
                      staff_domains=self.config.addresses.staff_domains)


def load_renderer(config: Config) -> texts.Renderer:
    """The templates shipped with the package, in the configured language, under the
    operator's `[tickets] templates` folder (its files win by name)."""
    from importlib import resources

    templates = Path(str(resources.files("gateway.templates")))
    return texts.Renderer(templates, config.tickets.language,
                          override_dir=config.tickets.templates)


async def make_context(conn: aiosqlite.Connection, config: Config,
                       wake_mailer: Callable[[], None] = lambda: None) -> Context:
    key = await store.setting(conn, HMAC_SETTING, msgid.new_key)
    return Context(config, load_renderer(config), key, wake_mailer=wake_mailer)


def check_sender(config: Config, raw: bytes, peer: str, mail_from: str) -> Verdict:
    """The sender verdict (SPEC §10): trusted relays, trusted Authentication-Results,
    and with `[auth] verify = "dns"` the gateway's own DKIM/SPF/DMARC checks."""
    return verify_sender(raw, peer=peer, mail_from=mail_from, config=config.auth)


# --- the stages ----------------------------------------------------------------------

async def process_message(conn: aiosqlite.Connection, ctx: Context, row: InboundRow, *,
                          release: bool = False, new_ticket: bool = False) -> Processed:
    """`release`: an operator vouches for the sender (held release); with `new_ticket`
    the message is taken as a new report, whatever it names (sent to crm@ by mistake)."""
    recorded = await store.ticket_of_inbound(conn, row.id)
    if recorded is not None and row.outcome and not release:
        # Reprocessing a message already in a ticket changes nothing (idempotent).
        await store.mark_inbound(conn, row.id, state=InboundState.DONE, outcome=row.outcome,
                                 ticket=recorded)
        return Processed(Outcome(row.outcome), recorded)
    folder = ctx.config.storage.attachments
    raw = await store.read_raw(conn, row.id, folder)
    report = await ctx.offload(parse_report, raw)
    if release:
        verdict = Verdict(AuthResult.PASS, "released by an operator", _domain(report.sender))
    else:
        # The DNS checks wait on the network: a thread of their own even in a worker.
        run = asyncio.to_thread if ctx.config.auth.verify == "dns" else ctx.offload
        verdict = await run(ctx.verdict_for, raw, row.peer, row.mail_from)
    saved = await ctx.offload(save_attachments, folder, report.attachments)
    # The files are safe now: the stored raw need not carry the same bytes again.
    cut_raw, spans = await ctx.offload(cut_attachments, raw, report.attachments)
    situation = await look_up(conn, ctx, row, report, raw, verdict)
    if release:
        situation = dataclasses.replace(situation, authorised=True, duplicate_of=None,
                                        to_intake=new_ticket, to_crm=not new_ticket,
                                        auto_replies_last_hour=0)
        if new_ticket:
            situation = dataclasses.replace(situation, ticket=None, named_ref=None,
                                            staff_sender=False)
    decision = decide(situation)
    now = ctx.clock()
    async with Tx(conn):
        ticket = await apply(conn, ctx, row, report, situation, decision, saved, now)
        await store.mark_inbound(conn, row.id, state=InboundState.DONE, outcome=decision.outcome,
                                 ticket=ticket, report=report_json(report),
                                 auth=verdict.result, auth_reason=verdict.reason)
        if spans:
            await store.store_cut_raw(conn, row.id, cut_raw, spans_to_json(spans))
    log.info("%s inbound %d: outcome=%s ticket=%s (%s)", report.message_id or "<no-id>",
             row.id, decision.outcome, f"#{ticket:06d}" if ticket else "-",
             getattr(decision, "reason", ""))
    ctx.wake_mailer()
    return Processed(decision.outcome, ticket)


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
    staff_sender = _domain(sender) in cfg.addresses.staff_domains
    # Staff domains admit mail only from a verified sender (SPEC §10).
    authorised = view is not None and is_authorised(
        sender, view, staff_domains=cfg.addresses.staff_domains if verdict.passed else (),
        reply_policy=cfg.tickets.reply_policy)
    participant = view is not None and (sender == view.reporter_email or sender in view.participants)
    own = is_own_mail(ctx, report)
    duplicate = await earlier_copy(conn, row, report, raw, ctx.config.storage.attachments)
    since = ctx.clock() - timedelta(hours=1)
    # The cap counts answers per sender and per recipient: this From and the e-mail
    # its report names, each without a +tag.
    replies = await store.auto_replies_since(
        conn, {answer_address(report, row), (report.fields.reporter_email or "").lower()}, since)
    return Situation(report=report, mail_from=row.mail_from, to_intake=ctx.intake in rcpts,
                     to_crm=ctx.crm in rcpts, named_ref=named_ref, ticket=view,
                     authorised=authorised, own_mail=own, duplicate_of=duplicate,
                     auto_replies_last_hour=replies, policy=ctx.policy(),
                     is_participant=participant, verdict=verdict, staff_sender=staff_sender)


async def earlier_copy(conn: aiosqlite.Connection, row: InboundRow, report: Report,
                       raw: bytes, attachments: Path) -> int | None:
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


def answer_address(report: Report, row: InboundRow) -> str:
    """Where an answer about no particular ticket goes: the From address. Never the
    Reply-To: a forged From plus one's own Reply-To must not draw ticket mail."""
    return (report.sender or row.mail_from).lower()


# --- applying a decision (inside the transaction) -------------------------------------

# Answers about no particular ticket go at most once a day per address and kind: a
# customer's own helpdesk robot answering our notice must not make a loop.
DAMPED_EVENTS = frozenset({"held_notice", "unknown_ticket_guidance", "closed_ticket_guidance"})
DAMPING = timedelta(hours=24)
# Logs attached to a staff copy, in all (SPEC §9); bigger ones are listed only.
STAFF_COPY_LOG_LIMIT = 10 * 1024 * 1024


async def apply(conn: aiosqlite.Connection, ctx: Context, row: InboundRow, report: Report,
                situation: Situation, decision: Decision, saved: list[dict[str, Any]],
                now: datetime) -> int | None:
    match decision:
        case NewTicket():
            return await open_ticket(conn, ctx, row, report, situation, decision, saved, now)
        case AppendToTicket():
            return await append_to_ticket(conn, ctx, row, report, situation, decision,
                                          saved, now)
        case StaffMail():
            return await apply_staff_mail(conn, ctx, row, report, situation, decision,
                                          saved, now)
        case StaffRefused():
            ticket = await store.get_ticket(conn, decision.number)
            assert ticket is not None
            await refuse_staff_mail(conn, ctx, row, report, ticket, saved, now,
                                    problem=decision.problem, detail=decision.detail,
                                    verdict=situation.verdict)
            return decision.number
        case ClosedTicketGuidance():
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
        case UnknownTicketGuidance():
            await store.replace_attachments(conn, inbound_id=row.id, ticket=None, items=saved)
            if decision.content_free:
                await hold(conn, row, report, situation.named_ref, decision.reason, now)
            if decision.answer:
                event = "held_notice" if decision.content_free else "unknown_ticket_guidance"
                await answer(conn, ctx, row, report, event, now)
            return None
        case HoldForOperator():
            await store.replace_attachments(conn, inbound_id=row.id, ticket=None, items=saved)
            await hold(conn, row, report, decision.ticket, decision.reason, now)
            if decision.answer and situation.staff_sender and decision.ticket is not None:
                # An engineer whose mail could not be verified learns why; never the
                # customer (a forger must not make crm@ write to anyone).
                await answer(conn, ctx, row, report, "staff_notice", now,
                             staff_notice=("not_sent", f"held for an operator: "
                                           f"{decision.reason}"), notice_ticket=decision.ticket)
            elif decision.answer:
                await answer(conn, ctx, row, report, "held_notice", now)
            return decision.ticket
        case StoreOnly():
            await store.replace_attachments(conn, inbound_id=row.id, ticket=None, items=saved)
            if decision.bounced_ids:
                for number in await store.mark_bounced(
                        conn, decision.bounced_ids,
                        f"bounced: delivery status notification, inbound {row.id}"):
                    log.warning("#%06d: a message to the reporter bounced", number)
            return None
    raise AssertionError(f"unhandled decision {decision!r}")  # pragma: no cover


async def hold(conn: aiosqlite.Connection, row: InboundRow, report: Report,
               ticket: int | None, reason: str, now: datetime) -> None:
    """Kept for operators (`held list`): the notice we send promises a review."""
    await store.add_held(conn, inbound_id=row.id, ticket=ticket,
                         sender=report.sender or row.mail_from, subject=report.subject,
                         reason=reason, now=now)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


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
    if _domain(named) == _domain(sender):
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


_LEADING_TOKEN = re.compile(r"^\s*\[?\s*#[0-9]{6}(?![0-9])\s*\]?\s*[:\-–]?\s*", re.ASCII)


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



# --- staff mail (SPEC §9) -----------------------------------------------------------------

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


# --- staff copies (SPEC §9) ---------------------------------------------------------------

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


# --- outgoing mail ------------------------------------------------------------------------

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


# --- serialisation --------------------------------------------------------------------

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


async def release_held(conn: aiosqlite.Connection, ctx: Context, held_id: int, *,
                       new_ticket: bool = False, actor: str = "staff") -> Processed:
    """`held release ID`: the operator vouches for the sender; the message goes into the
    ticket it named, as a follow-up, never into a closed one. `new_ticket`: a report
    sent to crm@ by mistake is processed as a new report to the intake address, never
    appended to the ticket it names."""
    from gateway.errors import NotFoundError

    held = await store.get_held(conn, held_id)
    if held is None:
        raise NotFoundError(f"held message {held_id} not found")
    if held.status is not HeldStatus.HELD:
        raise GatewayError(f"held message {held_id} was already {held.status}")
    ticket = await store.get_ticket(conn, held.ticket) if held.ticket else None
    if not new_ticket and (ticket is None or ticket.status == Status.CLOSED):
        state = "closed" if ticket is not None else "gone" if held.ticket else "not named"
        raise GatewayError(f"held message {held_id}: its ticket is {state}; release it "
                           "with --new-ticket to open a ticket from it, or drop it")
    row = await store.get_inbound(conn, held.inbound_id)
    assert row is not None
    result = await process_message(conn, ctx, row, release=True, new_ticket=new_ticket)
    now = ctx.clock()
    async with Tx(conn):
        await store.decide_held(conn, held_id, HeldStatus.RELEASED, now, actor=actor)
        opened = await store.get_ticket(conn, result.ticket) if result.ticket else None
        if new_ticket and opened is not None:
            await store.add_history(conn, ticket=opened.number, from_status=None,
                                    to_status=opened.status, actor=actor,
                                    note=f"opened from held message {held_id}", now=now)
    return result


async def reprocess(conn: aiosqlite.Connection, config: Config, row: InboundRow) -> Processed:
    """`inbox reprocess ID`: run a stored message through the stages again, now."""
    if row.state is InboundState.PROCESSING:
        from gateway.errors import GatewayError
        raise GatewayError(f"inbound message {row.id} is being processed right now")
    ctx = await make_context(conn, config)
    claimed = await conn.execute_fetchall(
        f"UPDATE inbound SET state = '{InboundState.PROCESSING}', attempts = attempts + 1"
        f" WHERE id = ? AND state != '{InboundState.PROCESSING}' RETURNING id", (row.id,))
    if not claimed:  # the daemon took it meanwhile
        from gateway.errors import GatewayError
        raise GatewayError(f"inbound message {row.id} is being processed right now")
    try:
        return await process_message(conn, ctx, row)
    except Exception as err:
        await store.mark_inbound(conn, row.id, state=InboundState.FAILED, outcome=Outcome.FAILED,
                                 error=f"{type(err).__name__}: {err}"[:2000])
        raise
