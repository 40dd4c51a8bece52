"""The values that flow between the stages. Imports nothing from `gateway`.

intake (smtp_edge) -> Inbound -> store -> parser -> Report -> router -> Decision
-> processor applies it (store) -> texts -> Outgoing -> compose -> outbox (store) -> mailer
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class Status(StrEnum):
    AWAITING_INFO = "awaiting_info"
    ACCEPTED = "accepted"
    IN_PROGRESS = "in_progress"
    RESOLVED = "resolved"
    CLOSED = "closed"


OPEN_STATUSES = frozenset(s for s in Status if s is not Status.CLOSED)

# Legal staff transitions (SPEC §3). Staff may also close any open ticket.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.AWAITING_INFO: frozenset({Status.ACCEPTED, Status.CLOSED}),
    Status.ACCEPTED: frozenset({Status.IN_PROGRESS, Status.CLOSED}),
    Status.IN_PROGRESS: frozenset({Status.RESOLVED, Status.CLOSED}),
    Status.RESOLVED: frozenset({Status.IN_PROGRESS, Status.CLOSED}),
    Status.CLOSED: frozenset(),
}


class Outcome(StrEnum):
    NEW = "new"
    FOLLOW_UP = "follow_up"
    CLOSED_NEW = "closed_new"
    CLOSED_GUIDANCE = "closed_guidance"
    CLOSED_REJECTED = "closed_rejected"
    UNKNOWN_GUIDANCE = "unknown_guidance"
    HELD = "held"
    IGNORED_AUTO = "ignored_auto"
    DUPLICATE = "duplicate"
    STAFF_REPLY = "staff_reply"
    STAFF_NOTE = "staff_note"
    FAILED = "failed"


class MessageKind(StrEnum):
    """What one entry of a ticket's thread is (`tickets show --json` messages[].kind)."""

    CUSTOMER = "customer"
    STAFF_REPLY = "staff_reply"
    STAFF_NOTE = "staff_note"
    NOTICE = "notice"


class InboundState(StrEnum):
    """Where a received message is in the processing queue (inbound.state)."""

    QUEUED = "queued"  # committed and acknowledged, waiting for the processor
    PROCESSING = "processing"  # claimed; back to queued if the process dies
    DONE = "done"  # routed (its outcome says how)
    FAILED = "failed"  # broke the processor; left for operators (`inbox reprocess`)


class OutboxStatus(StrEnum):
    """Where a composed mail is on its way to the relay (outbox.status)."""

    PENDING = "pending"  # due at next_attempt_at
    SENDING = "sending"  # handed to a relay session; back to pending after a crash
    SENT = "sent"
    FAILED = "failed"  # given up after give_up_after (`outbox retry`)
    BOUNCED = "bounced"  # sent, then a DSN reported it undelivered


class HeldStatus(StrEnum):
    """An operator's decision on a message held for them (held.status)."""

    HELD = "held"  # waiting for a decision
    RELEASED = "released"
    DROPPED = "dropped"


class AuthResult(StrEnum):
    """The sender verdict of SPEC §10."""

    PASS = "pass"
    FAIL = "fail"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Who really sent a message: the result and why (shown to staff)."""

    result: AuthResult
    reason: str
    domain: str = ""  # the From domain the verdict is about, "" when there is none

    @property
    def passed(self) -> bool:
        return self.result is AuthResult.PASS

    @property
    def failed(self) -> bool:
        return self.result is AuthResult.FAIL


UNVERIFIED = Verdict(AuthResult.NONE, "not checked")


# The report fields in the order of the procedure. `device_id` is the name used in
# `missing` for "serial_number or commcell_id".
FIELD_NAMES: tuple[str, ...] = (
    "reporter_name",
    "reporter_email",
    "reporter_phone",
    "install_address",
    "description",
    "serial_number",
    "commcell_id",
)
REQUIRED_FIELDS: tuple[str, ...] = (
    "reporter_name",
    "reporter_phone",
    "install_address",
    "description",
    "device_id",
)

# `#` + exactly six ASCII digits, not part of a longer number.
TICKET_REF = re.compile(r"(?<![0-9])#([0-9]{6})(?![0-9])", re.ASCII)


def format_ticket(number: int) -> str:
    return f"#{number:06d}"


@dataclass(frozen=True, slots=True)
class Inbound:
    """One SMTP transaction, copied out of aiosmtpd's Envelope."""

    peer: str
    mail_from: str  # "" for the null reverse-path
    rcpt_tos: tuple[str, ...]
    raw: bytes
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Fields:
    """The report fields as read from the mail; None where the mail did not give one."""

    reporter_name: str | None = None
    reporter_email: str | None = None
    reporter_phone: str | None = None  # E.164 when it could be normalised
    install_address: str | None = None
    description: str | None = None
    serial_number: str | None = None
    commcell_id: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in FIELD_NAMES}


def missing_fields(fields: Fields) -> tuple[str, ...]:
    """What the procedure requires and `fields` lacks, in the procedure's order."""
    missing = []
    for name in REQUIRED_FIELDS:
        if name == "device_id":
            if not (fields.serial_number or fields.commcell_id):
                missing.append(name)
        elif not getattr(fields, name):
            missing.append(name)
    return tuple(missing)


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str  # decoded, display data only: never a path on disk
    content_type: str
    size: int
    sha256: str
    is_log: bool
    data: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Report:
    """What the parser read out of one raw message."""

    message_id: str  # "<id@host>" as sent, "" when absent
    in_reply_to: tuple[str, ...]  # "<...>" ids
    references: tuple[str, ...]
    sender: str  # From addr-spec, lower-cased; "" when absent/unparseable
    sender_name: str  # From display name, decoded
    reply_to: str  # Reply-To addr-spec or ""
    to: tuple[str, ...]  # addr-specs, lower-cased
    cc: tuple[str, ...]
    subject: str  # decoded, on one line
    date: datetime | None
    text: str  # the new text of the message (quoted history removed)
    fields: Fields
    missing: tuple[str, ...]
    attachments: tuple[Attachment, ...]
    ticket_refs: tuple[int, ...]  # every #NNNNNN token of the subject, in order
    auto_reasons: tuple[str, ...]  # why it looks machine-generated (header based)
    bounced_ids: tuple[str, ...]  # for a DSN: Message-IDs of the mail it reports on
    rating: int | None  # 1-5 from the new text ("Ocena: 4", a lone digit...), else None
    notes: tuple[str, ...] = ()  # what the parser had to cut or could not read
    # The fields the customer gave under a label (not guessed from the signature, the
    # From name or free text): only these may correct a ticket's values later.
    labelled: frozenset[str] = frozenset()

    @property
    def auto_generated(self) -> bool:
        return bool(self.auto_reasons)


@dataclass(frozen=True, slots=True)
class OutAttachment:
    filename: str
    content_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One rendered mail, ready to be composed into MIME and queued in the outbox."""

    kind: str  # the template event, e.g. "acknowledgement"
    ticket: int | None
    to: str  # one addr-spec
    subject: str  # one line, already "[#NNNNNN] ..." where there is a ticket
    body: str  # plain text
    in_reply_to: str = ""  # "<id>" of the customer's message, "" if none
    references: tuple[str, ...] = ()
    auto: bool = True  # an automatic answer (RFC 3834 headers); False for staff replies
    urgent: bool = False
    attachments: tuple[OutAttachment, ...] = ()
    cc: tuple[str, ...] = ()  # shown as Cc (each copy is its own outbox row)
    from_name: str = ""  # display name of From; "" = the default ("Serwis S4E")
    # RFC 3834: "auto-replied" for answers to a message, "auto-generated" for copies and
    # digests that answer nothing.
    auto_submitted: str = "auto-replied"
