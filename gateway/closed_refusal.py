"""The edge's closed-ticket check (closed_action = "reject"): crm@ mail on a closed
ticket is refused with 550 at the end of DATA, the guidance in the reply text.

Nothing of it runs on the event loop: the few headers it needs are read in a thread,
each cut to MAX_HEADER_CHARS first, with the compat32 parser (no structured header
parsing: a From of 48 KiB of `"` costs microseconds, not the 47 s the default
policy's address parser took). Only then one indexed lookup per ticket token.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from email import policy as email_policy
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.utils import parseaddr

import aiosqlite

from gateway import store
from gateway.model import TICKET_REF, Inbound, Status
from gateway.context import Context
from gateway.stages import ticket_view
from gateway.router import is_authorised

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 256 * 1024
MAX_HEADER_CHARS = 2048  # Subject / From / markers: longer values are cut to this
MAX_TOKENS = 5  # ticket numbers looked up per message

# The reply goes to whoever connected, who may have forged the From: it does not
# repeat the ticket number (the sender's own bounce shows their subject anyway).
# With SMTPUTF8 the client can carry UTF-8 replies: Polish with diacritics. Without
# it a reply must be ASCII: Polish transliterated. English follows in both (the
# bounce an MTA builds from this text may reach a reader of either).
REPLY_CLOSED_UTF8 = (
    "550-5.7.1 Zgłoszenie jest zamknięte: wiadomość nie została do niego dołączona.\r\n"
    "550-5.7.1 Kolejne awarie, również związane z tym zgłoszeniem, prosimy zgłaszać na {intake}\r\n"
    "550-5.7.1 This ticket is closed: the message was not added to it.\r\n"
    "550 5.7.1 Report new failures, also related ones, to {intake}")
REPLY_CLOSED_ASCII = (
    "550-5.7.1 Zgloszenie jest zamkniete: wiadomosc nie zostala do niego dolaczona.\r\n"
    "550-5.7.1 Kolejne awarie, rowniez zwiazane z tym zgloszeniem, prosimy zglaszac na {intake}\r\n"
    "550-5.7.1 This ticket is closed: the message was not added to it.\r\n"
    "550 5.7.1 Report new failures, also related ones, to {intake}")


@dataclass(frozen=True, slots=True)
class HeadFacts:
    """What the check reads from the header block."""

    subject: str
    sender: str  # lower-case addr-spec of From, "" when unreadable
    auto: bool  # Auto-Submitted other than "no", List-Id, Precedence bulk/junk/list


def _cut(value: object) -> str:
    return str(value or "")[:MAX_HEADER_CHARS]


def read_head_facts(raw: bytes) -> HeadFacts | None:
    """Pure and bounded: the facts from at most MAX_HEAD_BYTES of header block, each
    value cut to MAX_HEADER_CHARS before it is decoded. None when unreadable."""
    head = store.header_block(raw[:MAX_HEAD_BYTES])
    try:
        headers = BytesHeaderParser(policy=email_policy.compat32).parsebytes(head)
        subject_raw = _cut(headers.get("subject"))
        try:
            subject = str(make_header(decode_header(subject_raw)))
        except Exception:  # noqa: BLE001 - a broken encoded word: the raw text
            subject = subject_raw
        sender = parseaddr(_cut(headers.get("from")))[1].lower()
        auto = (_cut(headers.get("auto-submitted", "no")).strip().lower() != "no"
                or headers.get("list-id") is not None
                or _cut(headers.get("precedence")).strip().lower() in ("bulk", "junk", "list"))
    except Exception:  # noqa: BLE001 - odd headers: accept, the router decides later
        return None
    return HeadFacts(subject=subject, sender=sender if "@" in sender else "", auto=auto)


def closed_reply(intake: str, utf8: bool) -> str:
    return (REPLY_CLOSED_UTF8 if utf8 else REPLY_CLOSED_ASCII).format(intake=intake)


async def closed_ticket_refusal(conn: aiosqlite.Connection, ctx: Context, inbound: Inbound,
                                utf8: bool) -> str | None:
    """With closed_action = "reject": the SMTP reply refusing crm@ mail on a closed
    ticket, decided from the headers alone before the 250; None to accept."""
    rcpts = {r.lower() for r in inbound.rcpt_tos}
    if ctx.config.tickets.closed_action != "reject" or ctx.intake in rcpts or not inbound.mail_from:
        return None
    facts = await asyncio.to_thread(read_head_facts, inbound.raw)
    if facts is None or facts.auto:
        return None
    for match in list(TICKET_REF.finditer(facts.subject))[:MAX_TOKENS]:
        ticket = await store.get_ticket(conn, int(match.group(1)))
        if ticket is None:
            continue
        if ticket.status != Status.CLOSED:
            return None
        if not is_authorised(facts.sender, ticket_view(ticket),
                             staff_domains=ctx.config.addresses.staff_domains,
                             reply_policy=ctx.config.tickets.reply_policy):
            return None  # strangers get the content-free answer, never the number
        return closed_reply(ctx.intake, utf8)
    return None
