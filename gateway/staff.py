"""What engineers and the dispatcher do to tickets (the CLI's verbs), each change in
one transaction with the notice it sends to the reporter's thread."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import mimetypes
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email import policy as email_policy
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import aiosqlite

from gateway import store, texts
from gateway.config import parse_duration
from gateway.errors import GatewayError, NotFoundError, TransitionError
from gateway.model import (FIELD_NAMES, TRANSITIONS, Attachment, Fields, HeldStatus, InboundState,
                           MessageKind, OutAttachment, Outcome, Report, Status, missing_fields)
from gateway.names import display_filename
from gateway.parse_fields import normalize_phone
from gateway.answers import notify, report_context, template_context
from gateway.attachment_store import AttachmentStore
from gateway.config import Config
from gateway.context import Context, make_context
from gateway.processor import Processed
from gateway.staff_mail import engineer_problem
from gateway.store import (AttachmentRow, ContractRow, HeldRow, InboundRow, MessageRow,
                           TicketRow, Tx)

log = logging.getLogger(__name__)

MAX_STAFF_ATTACHMENT = 20 * 1024 * 1024

# Which template tells the reporter about a new status. Accepting a report by hand
# sends the acknowledgement (with the phone-call request a short contract needs).
NOTICE_FOR = {
    Status.ACCEPTED: "acknowledgement",
    Status.IN_PROGRESS: "status_changed",
    Status.RESOLVED: "resolved",
    Status.CLOSED: "closed",
}


def parse_number(text: str) -> int:
    digits = text.strip().lstrip("#")
    if not (len(digits) == 6 and digits.isascii() and digits.isdigit()):
        raise GatewayError(f"not a ticket number: {text!r} (expected six digits, e.g. 123456)")
    return int(digits)


async def require_ticket(conn: aiosqlite.Connection, number: int) -> TicketRow:
    ticket = await store.get_ticket(conn, number)
    if ticket is None:
        raise NotFoundError(f"ticket #{number:06d} not found")
    return ticket


def parse_status(status_text: str) -> Status:
    try:
        return Status(status_text.strip().lower())
    except ValueError:
        raise GatewayError(f"unknown status {status_text!r} (one of: "
                           f"{', '.join(s.value for s in Status)})") from None


async def change_status(conn: aiosqlite.Connection, ctx: Context, ticket: TicketRow,
                        target: Status, note: str | None, *, actor: str,
                        now: datetime) -> TicketRow:
    """Move `ticket` to `target` inside the caller's transaction, with its history
    entry and the notice to the reporter. Raises TransitionError when not allowed."""
    number, current = ticket.number, Status(ticket.status)
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "none: closed is final"
        raise TransitionError(f"ticket #{number:06d}: cannot go from {current} to {target} "
                              f"(allowed: {allowed})")
    values: dict[str, Any] = {"status": target.value}
    if target is Status.RESOLVED:
        values["resolved_at"] = store.iso(now)
    if target is Status.CLOSED:
        values.update(closed_at=store.iso(now), closed_reason="staff")
    if target is Status.ACCEPTED and ticket.missing:
        values["missing"] = "[]"  # staff accepted it as it is
    await store.update_ticket(conn, number, now, **values)
    await store.add_history(conn, ticket=number, from_status=current, to_status=target,
                            actor=actor, note=note, now=now)
    updated = await require_ticket(conn, number)
    await send_notice(conn, ctx, updated, target, note, now, reason="staff")
    return updated


async def set_status(conn: aiosqlite.Connection, ctx: Context, number: int, status_text: str,
                     note: str | None, *, actor: str = "staff") -> TicketRow:
    target = parse_status(status_text)
    now = ctx.clock()
    async with Tx(conn):
        ticket = await require_ticket(conn, number)
        updated = await change_status(conn, ctx, ticket, target, note, actor=actor, now=now)
    ctx.wake_mailer()
    return updated


async def send_notice(conn: aiosqlite.Connection, ctx: Context, ticket: TicketRow,
                      status: Status, note: str | None, now: datetime, *,
                      reason: texts.CloseReason) -> None:
    event = NOTICE_FOR[status]
    common = template_context(ctx, ticket)
    text: texts.Text
    if event == "acknowledgement":
        fields, files, logs = await report_context(conn, ticket)
        text = texts.Acknowledgement(
            common, fields=fields, attachments=files, log_attachments=logs,
            accepted_by_staff=True, phone_confirmation_required=ticket.phone_confirmation_required)
    elif event == "status_changed":
        text = texts.StatusChanged(common, status=status, note=note)
    elif event == "resolved":
        window = parse_duration(ctx.config.tickets.rating_window)
        text = texts.Resolved(common, note=note,
                              rating_window_days=window // 86400 if window >= 86400 else None)
    else:
        text = texts.Closed(common, note=note, rating=ticket.rating, reason=reason)
    await notify(conn, ctx, ticket, text, now)


def check_engineer(ctx: Context, engineer: str) -> str:
    """An assignee is a staff e-mail address (one of the staff domains)."""
    problem = engineer_problem(engineer, ctx.config.addresses.staff_domains)
    if problem:
        raise GatewayError(problem)
    return engineer.strip().lower()


async def change_assignee(conn: aiosqlite.Connection, ctx: Context, ticket: TicketRow,
                          engineer: str, *, actor: str, now: datetime) -> TicketRow:
    """Assign `ticket` to a staff address inside the caller's transaction."""
    address = check_engineer(ctx, engineer)
    await store.update_ticket(conn, ticket.number, now, assignee=address)
    await store.add_history(conn, ticket=ticket.number, from_status=ticket.status,
                            to_status=ticket.status, actor=actor,
                            note=f"assigned to {address}", now=now)
    return await require_ticket(conn, ticket.number)


async def record_note(conn: aiosqlite.Connection, ctx: Context, ticket: TicketRow, text: str,
                      *, author: str, now: datetime, inbound_id: int | None = None,
                      message_id: str = "", subject: str = "") -> None:
    """An internal note on the thread: recorded for staff, never sent to anyone."""
    await store.add_ticket_message(
        conn, ticket=ticket.number, direction="in", inbound_id=inbound_id,
        from_addr=author, to_addrs=[], subject=subject or ticket.subject,
        message_id=message_id or f"<note.{ticket.number}.{store.iso(now)}@local>",
        date=now, body=text, kind=MessageKind.STAFF_NOTE, author=author)
    await store.add_history(conn, ticket=ticket.number, from_status=ticket.status,
                            to_status=ticket.status, actor=author, note="internal note",
                            now=now)


async def queue_staff_reply(conn: aiosqlite.Connection, ctx: Context, ticket: TicketRow,
                            text: str, files: Sequence[OutAttachment], *, author: str,
                            now: datetime, in_reply_to: Report | None = None,
                            inbound_id: int | None = None, from_name: str = "") -> None:
    """An engineer's answer to the reporter, in the thread, inside the caller's
    transaction. Refused on a closed ticket (the customer could not answer it)."""
    if not text.strip():
        raise GatewayError("the message is empty")
    if ticket.status == Status.CLOSED:
        raise TransitionError(f"ticket #{ticket.number:06d} is closed: replies go nowhere "
                              "(the customer must report anew at the intake address)")
    await notify(conn, ctx, ticket,
                 texts.StaffReply(template_context(ctx, ticket), message=text,
                                  status=Status(ticket.status)),
                 now, auto=False, files=tuple(files), in_reply_to=in_reply_to,
                 kind=MessageKind.STAFF_REPLY, author=author, inbound_id=inbound_id,
                 from_name=from_name)
    await store.update_ticket(conn, ticket.number, now, last_staff_at=store.iso(now))
    await store.add_history(conn, ticket=ticket.number, from_status=ticket.status,
                            to_status=ticket.status, actor=author,
                            note=f"reply sent ({len(files)} attachment(s))", now=now)


async def reply(conn: aiosqlite.Connection, ctx: Context, number: int, message: str,
                files: Sequence[OutAttachment], *, actor: str = "staff") -> TicketRow:
    """An engineer's reply; refused (nothing queued) when the composed mail would be
    larger than the relay path takes (`[smtp] max_message_size`)."""
    now = ctx.clock()
    limit = ctx.config.smtp.max_message_size
    async with Tx(conn):
        ticket = await require_ticket(conn, number)
        before = await store.last_outbox_id(conn)
        await queue_staff_reply(conn, ctx, ticket, message, files, author=actor, now=now)
        for _, size in await store.outbox_sizes_since(conn, before):
            if size > limit:
                raise GatewayError(
                    f"ticket #{number:06d}: the reply with its attachments would be "
                    f"{_mib(size)} as mail, over the limit of {_mib(limit)} "
                    "([smtp] max_message_size): nothing sent; attach less or smaller files")
    ctx.wake_mailer()
    return ticket


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def read_user_file(path: Path, what: str) -> bytes:
    """A file named on the command line; `what` names it in the one-line errors."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise GatewayError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise GatewayError(f"{path}: is a directory, not a file") from None
    except PermissionError:
        raise GatewayError(f"{path}: {what} not readable (permission denied)") from None


def read_attachment(path: Path) -> OutAttachment:
    data = read_user_file(path, "attachment")
    if len(data) > MAX_STAFF_ATTACHMENT:
        raise GatewayError(f"{path}: larger than {MAX_STAFF_ATTACHMENT // 2**20} MiB")
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return OutAttachment(path.name, content_type, data)


async def confirm_phone(conn: aiosqlite.Connection, ctx: Context, number: int, *,
                        actor: str = "staff") -> TicketRow:
    now = ctx.clock()
    async with Tx(conn):
        ticket = await require_ticket(conn, number)
        if ticket.status == Status.CLOSED:
            raise TransitionError(f"ticket #{number:06d} is closed")
        if ticket.phone_confirmed:
            raise GatewayError(f"ticket #{number:06d}: the phone call is already recorded")
        await store.update_ticket(conn, number, now, phone_confirmed=1,
                                  phone_confirmed_at=store.iso(now))
        await store.add_history(conn, ticket=number, from_status=ticket.status,
                                to_status=ticket.status, actor=actor,
                                note="phone confirmation recorded", now=now)
        return await require_ticket(conn, number)


async def add_note(conn: aiosqlite.Connection, ctx: Context, number: int, text: str, *,
                   actor: str) -> TicketRow:
    """An internal note on the ticket (also a closed one): for staff, never sent."""
    if not text.strip():
        raise GatewayError("the note is empty")
    now = ctx.clock()
    async with Tx(conn):
        ticket = await require_ticket(conn, number)
        await record_note(conn, ctx, ticket, text.strip(), author=actor, now=now)
    return ticket


async def assign(conn: aiosqlite.Connection, ctx: Context, number: int, engineer: str, *,
                 actor: str) -> TicketRow:
    check_engineer(ctx, engineer)
    now = ctx.clock()
    async with Tx(conn):
        ticket = await require_ticket(conn, number)
        if ticket.status == Status.CLOSED:
            raise TransitionError(f"ticket #{number:06d} is closed")
        return await change_assignee(conn, ctx, ticket, engineer, actor=actor, now=now)


PHONE_REGION = "PL"  # as the parser reads numbers without a country code
MULTILINE_FIELDS = frozenset({"install_address", "description"})
_ADDRESS = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")


def parse_field_value(field: str, value: str) -> tuple[str, str | None]:
    """The field's stored name and value (None clears it), checked and normalised as
    the parser would store it; GatewayError naming the fields for an unknown one."""
    name = field.strip().lower().replace("-", "_")
    if name not in FIELD_NAMES:
        raise GatewayError(f"unknown field {field!r} (one of: {', '.join(FIELD_NAMES)})")
    text = value.strip().replace("\r\n", "\n")
    if name not in MULTILINE_FIELDS and ("\n" in text or "\r" in text):
        raise GatewayError(f"{name}: one line only")
    if name == "reporter_email":
        if not _ADDRESS.match(text):
            raise GatewayError(f"reporter_email: not an e-mail address: {value!r}")
        return name, text.lower()
    if name == "reporter_phone" and text:
        text = normalize_phone(text, PHONE_REGION)
    return name, text or None


async def set_field(conn: aiosqlite.Connection, ctx: Context, number: int, field: str,
                    value: str, *, actor: str) -> TicketRow:
    """Correct one report field (e.g. a serial number given by phone): `missing` and
    the phone-call requirement are worked out again; recorded in the history. An
    empty value clears the field. Nothing is sent."""
    name, new = parse_field_value(field, value)
    now = ctx.clock()
    async with Tx(conn):
        ticket = await require_ticket(conn, number)
        if ticket.status == Status.CLOSED:
            raise TransitionError(f"ticket #{number:06d} is closed")
        fields = Fields(**{**{n: getattr(ticket, n) for n in FIELD_NAMES}, name: new})
        values: dict[str, Any] = {name: new,
                                  "missing": json.dumps(list(missing_fields(fields)))}
        if name in ("serial_number", "commcell_id"):
            hours = await store.contract_hours(
                conn, [v for v in (fields.serial_number, fields.commcell_id) if v])
            values["phone_confirmation_required"] = int(
                ticket.phone_confirmation_required or (hours is not None and hours < 24))
        await store.update_ticket(conn, number, now, **values)
        await store.add_history(conn, ticket=number, from_status=ticket.status,
                                to_status=ticket.status, actor=actor, now=now,
                                note=f"{name}: {_short(getattr(ticket, name))} -> {_short(new)}")
        return await require_ticket(conn, number)


def _short(value: str | None, limit: int = 60) -> str:
    if value is None:
        return "(empty)"
    text = " ".join(value.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "\u2026")


async def close_expired_ratings(conn: aiosqlite.Connection, ctx: Context) -> list[int]:
    """Resolved tickets nobody rated within `rating_window` close by themselves."""
    window = parse_duration(ctx.config.tickets.rating_window)
    if not window:
        return []
    now = ctx.clock()
    cutoff = store.iso(now - timedelta(seconds=window))
    rows = await conn.execute_fetchall(
        "SELECT number FROM tickets WHERE status = 'resolved' AND resolved_at <= ?", (cutoff,))
    closed = []
    for (number,) in rows:
        async with Tx(conn):
            ticket = await require_ticket(conn, number)
            if ticket.status != Status.RESOLVED:
                continue  # rated meanwhile
            await store.update_ticket(conn, number, now, status=Status.CLOSED.value,
                                      closed_at=store.iso(now), closed_reason="rating_window")
            await store.add_history(conn, ticket=number, from_status=Status.RESOLVED,
                                    to_status=Status.CLOSED, actor="rating_window",
                                    note=f"no rating within {ctx.config.tickets.rating_window}",
                                    now=now)
            updated = await require_ticket(conn, number)
            await send_notice(conn, ctx, updated, Status.CLOSED, None, now,
                              reason="rating_window")
        closed.append(number)
        log.info("#%06d closed: no rating within %s", number, ctx.config.tickets.rating_window)
    if closed:
        ctx.wake_mailer()
    return closed


# --- contracts ------------------------------------------------------------------------

CONTRACT_HEADER = ["device_id", "customer", "repair_hours"]


@dataclass(frozen=True, slots=True)
class Contract:
    device_id: str
    customer: str
    repair_hours: int


def parse_contracts(text: str, source: str) -> list[Contract]:
    """The whole file or nothing: a bad row is reported with its line number."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise GatewayError(f"{source}: empty file (expected the header "
                           f"{','.join(CONTRACT_HEADER)})") from None
    if [h.strip().lstrip("\ufeff").lower() for h in header] != CONTRACT_HEADER:
        raise GatewayError(f"{source}:1: expected the header {','.join(CONTRACT_HEADER)}, "
                           f"got {','.join(header)}")
    contracts: dict[str, Contract] = {}
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 3:
            raise GatewayError(f"{source}:{line}: expected 3 columns, got {len(row)}")
        device_id, customer, hours = (cell.strip() for cell in row)
        if not device_id:
            raise GatewayError(f"{source}:{line}: device_id is empty")
        if not hours.isdigit():
            raise GatewayError(f"{source}:{line}: repair_hours must be a whole number of "
                               f"hours, got {hours!r}")
        key = device_id.lower()
        if key in contracts:
            raise GatewayError(f"{source}:{line}: device_id {device_id!r} appears twice")
        contracts[key] = Contract(device_id, customer, int(hours))
    return list(contracts.values())


def read_contracts(path: Path) -> list[Contract]:
    try:
        text = path.read_text("utf-8-sig")
    except FileNotFoundError:
        raise GatewayError(f"{path}: contracts file not found") from None
    except UnicodeDecodeError:
        raise GatewayError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise GatewayError(f"{path}: cannot read: {err.strerror}") from None
    return parse_contracts(text, str(path))


async def import_contracts(conn: aiosqlite.Connection, contracts: list[Contract],
                           now: datetime) -> int:
    """Replace the contract list with `contracts` (the file is the source of truth)."""
    async with Tx(conn):
        await conn.execute("DELETE FROM contracts")
        for contract in contracts:
            await conn.execute(
                "INSERT INTO contracts (device_id, customer, repair_hours, imported_at)"
                " VALUES (?, ?, ?, ?)",
                (contract.device_id, contract.customer, contract.repair_hours, store.iso(now)))
    return len(contracts)


# --- views for the CLI (and the web desk) ---------------------------------------------

def attachment_json(a: AttachmentRow | Attachment) -> dict[str, Any]:
    """An attachment as staff see it: `filename` safe to show, `original_filename`
    as the sender wrote it (for a download name, never for a terminal)."""
    return {"filename": display_filename(a.filename), "content_type": a.content_type,
            "size": a.size, "sha256": a.sha256, "is_log": bool(a.is_log),
            "original_filename": a.filename}


def message_json(m: MessageRow) -> dict[str, Any]:
    return {"direction": m.direction, "from": m.from_addr, "to": list(m.to_addrs),
            "subject": m.subject, "message_id": m.message_id, "date": m.date,
            "kind": m.kind, "auth": m.verdict, "author": m.author}


async def ticket_json(conn: aiosqlite.Connection, ticket: TicketRow) -> dict[str, Any]:
    attachments = [attachment_json(a)
                   for a in await store.ticket_attachments(conn, ticket.number)]
    messages = [message_json(m) for m in await store.ticket_thread(conn, ticket.number)]
    history = [
        {"from": h.from_status, "to": h.to_status, "actor": h.actor, "note": h.note,
         "at": h.at} for h in await store.ticket_history(conn, ticket.number)]
    return {
        "number": f"{ticket.number:06d}", "status": ticket.status, "subject": ticket.subject,
        "reporter_name": ticket.reporter_name, "reporter_email": ticket.reporter_email,
        "reporter_phone": ticket.reporter_phone, "install_address": ticket.install_address,
        "description": ticket.description, "serial_number": ticket.serial_number,
        "commcell_id": ticket.commcell_id, "missing": list(ticket.missing),
        "phone_confirmation_required": ticket.phone_confirmation_required,
        "phone_confirmed": ticket.phone_confirmed, "rating": ticket.rating,
        "created_at": ticket.created_at, "updated_at": ticket.updated_at,
        "assignee": ticket.assignee, "dispatcher": ticket.dispatcher,
        "contact_email": ticket.contact_email,
        "attachments": attachments, "messages": messages,
        "linked_to": None if ticket.linked_to is None else f"{ticket.linked_to:06d}",
        "reporter_bounced": ticket.reporter_bounced, "closed_reason": ticket.closed_reason,
        "history": history,
    }


def ticket_summary(ticket: TicketRow, waiting_since: str | None = None) -> dict[str, Any]:
    return {"number": f"{ticket.number:06d}", "status": ticket.status, "subject": ticket.subject,
            "reporter_email": ticket.reporter_email, "created_at": ticket.created_at,
            "assignee": ticket.assignee, "waiting_since": waiting_since}


async def find_tickets(conn: aiosqlite.Connection, *, search: str | None = None,
                       status: str | None = None, assignee: str | None = None,
                       waiting: bool = False, after: store.TicketCursor | None = None,
                       limit: int | None = None) -> list[store.ListedTicket]:
    """`tickets list` (and the web desk's lists): user text for `search` is quoted, so
    it can never break the full-text query. One page: see `store.find_tickets`."""
    expression, status = ticket_filter(search, status)
    return await store.find_tickets(conn, search=expression, status=status,
                                    assignee=assignee, waiting=waiting, after=after,
                                    limit=limit)


def ticket_filter(search: str | None, status: str | None) -> tuple[str | None, str | None]:
    """User text for `search` and `status` as `store.find_tickets` takes them
    (expression, status); a GatewayError when there is nothing to search for or no
    such status."""
    if status:
        status = parse_status(status).value
    expression = None
    if search is not None:
        expression = store.search_expression(search)
        if not expression:
            raise GatewayError(f"nothing to search for in {search!r} (give a word, a "
                               "serial number or a \"phrase\")")
    return expression, status


def held_json(row: HeldRow) -> dict[str, Any]:
    return {"id": row.id, "inbound_id": row.inbound_id,
            "ticket": None if row.ticket is None else f"{row.ticket:06d}",
            "from": row.sender, "subject": row.subject, "reason": row.reason,
            "status": row.status, "created_at": row.created_at,
            "decided_at": row.decided_at, "decided_by": row.decided_by}


async def require_held(conn: aiosqlite.Connection, held_id: int) -> HeldRow:
    held = await store.get_held(conn, held_id)
    if held is None:
        raise NotFoundError(f"held message {held_id} not found")
    return held


_SHOWN_HEADERS = ("From", "Sender", "Reply-To", "To", "Cc", "Subject", "Date", "Message-ID",
                  "In-Reply-To", "Auto-Submitted")


def header_lines(raw: bytes) -> list[tuple[str, str]]:
    """The headers a person asks about, decoded, in the message's own order; a header
    that cannot be decoded is shown as it came."""
    head = store.header_block(raw)[:256 * 1024]
    message = BytesHeaderParser(policy=email_policy.default).parsebytes(head)
    wanted = {h.lower() for h in _SHOWN_HEADERS}
    shown = []
    for name, value in message.raw_items():
        if name.lower() not in wanted:
            continue
        try:
            text = str(email_policy.default.header_factory(name, value))
        except Exception:  # noqa: BLE001 - a broken header is shown raw, never a crash
            text = str(value)
        shown.append((name, " ".join(text.split())))
    return shown


async def inbound_json(conn: aiosqlite.Connection, inbound_id: int,
                       attachments: AttachmentStore | None = None) -> dict[str, Any]:
    """`inbox show`: what arrived, what the gateway made of it and what it answered.
    `attachments`: the attachment store, where the raw's attachment bytes are."""
    row = await store.inbound_details(conn, inbound_id)
    if row is None:
        raise NotFoundError(f"inbound message {inbound_id} not found")
    from gateway.errors import StoreError
    from gateway.parser import parse_report

    try:
        raw = await store.read_raw(conn, inbound_id, attachments)
    except StoreError:
        raw = b""  # dropped (keep_raw): the stored metadata still tells the story
    report = await asyncio.to_thread(parse_report, raw)
    held = await store.held_of_inbound(conn, inbound_id)
    answers = await store.outbox_for_inbound(conn, inbound_id)
    return {
        "id": row.id, "message_id": row.message_id, "mail_from": row.mail_from,
        "rcpt_tos": list(row.rcpt_tos), "peer": row.peer,
        "received_at": row.received_at, "size": row.size, "sha256": row.sha256,
        "state": row.state, "attempts": row.attempts, "outcome": row.outcome,
        "ticket": None if row.ticket is None else f"{row.ticket:06d}",
        "error": row.error, "processed_at": row.processed_at,
        "auth": row.auth, "auth_reason": row.auth_reason,
        "headers": [{"name": n, "value": v} for n, v in header_lines(raw)],
        "text": report.text,
        "notes": list(report.notes) if raw else ["the raw message is no longer stored"],
        "attachments": [attachment_json(a) for a in report.attachments],
        "held": None if held is None else held_json(held),
        "answers": [{"id": o.id, "kind": o.kind, "to": o.rcpt_to, "status": o.status,
                     "created_at": o.created_at, "sent_at": o.sent_at,
                     "last_error": o.last_error} for o in answers],
    }


def contract_json(row: ContractRow) -> dict[str, Any]:
    return {"device_id": row.device_id, "customer": row.customer,
            "repair_hours": row.repair_hours, "imported_at": row.imported_at}


# --- operators' queue decisions (CLI and web desk) ----------------------------------

async def drop_held(conn: aiosqlite.Connection, held_id: int, now: datetime, *,
                    actor: str) -> None:
    """`held drop ID`: leave a held message out for good (it stays in the inbox)."""
    held = await require_held(conn, held_id)
    if not await store.decide_held(conn, held_id, HeldStatus.DROPPED, now, actor=actor):
        raise GatewayError(f"held message {held_id} was already {held.status}")


async def retry_mail(conn: aiosqlite.Connection, outbox_id: int, now: datetime) -> None:
    """`outbox retry ID`: a failed or bounced mail is due again now."""
    row = await store.get_outbox(conn, outbox_id)
    if row is None:
        raise NotFoundError(f"outbox message {outbox_id} not found")
    if not await store.retry_outbox(conn, outbox_id, now):
        raise GatewayError(f"outbox message {outbox_id} is {row.status}: only failed or "
                           "bounced mail can be retried")


# --- operator commands on stored mail ---------------------------------------------

async def release_held(conn: aiosqlite.Connection, ctx: Context, held_id: int, *,
                       new_ticket: bool = False, actor: str = "staff") -> Processed:
    """`held release ID`: the operator vouches for the sender; the message goes into the
    ticket it named, as a follow-up, never into a closed one. `new_ticket`: a report
    sent to crm@ by mistake is processed as a new report to the intake address, never
    appended to the ticket it names."""
    from gateway.stages import process_message  # the stages build on this module

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


async def reprocess(conn: aiosqlite.Connection, config: Config, row: InboundRow, *,
                    attachments: AttachmentStore | None = None) -> Processed:
    """`inbox reprocess ID`: run a stored message through the stages again, now.
    `attachments`: another attachment store than the configuration's (tests)."""
    from gateway.stages import process_message  # the stages build on this module

    if row.state is InboundState.PROCESSING:
        raise GatewayError(f"inbound message {row.id} is being processed right now")
    ctx = await make_context(conn, config, attachments=attachments)
    claimed = await conn.execute_fetchall(
        f"UPDATE inbound SET state = '{InboundState.PROCESSING}', attempts = attempts + 1"
        f" WHERE id = ? AND state != '{InboundState.PROCESSING}' RETURNING id", (row.id,))
    if not claimed:  # the daemon took it meanwhile
        raise GatewayError(f"inbound message {row.id} is being processed right now")
    try:
        return await process_message(conn, ctx, row)
    except Exception as err:
        await store.mark_inbound(conn, row.id, state=InboundState.FAILED, outcome=Outcome.FAILED,
                                 error=f"{type(err).__name__}: {err}"[:2000])
        raise
