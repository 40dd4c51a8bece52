"""Texts: one typed context per event -> the plain-text body of its mail (jinja2).

Pure: the templates are read once, when a `Renderer` is built; after that nothing here
touches the disk, the clock or the configuration (the caller passes the addresses and
the phone numbers in `Common`). How the body becomes a mail is `gateway.compose`.

Templates live in ``templates/<language>/<event>.txt.j2`` (``pl`` is the default, ``en``
the alternative); files whose names start with ``_`` are partials included by them.
Each event has one frozen dataclass here (`Acknowledgement`, `MissingFields`, ...,
listed in `TEXTS`), whose ``event`` names its template; `Renderer.render(text)` picks the
template from the type. Every context carries the shared part, `Common` (intake, crm,
phone numbers, the ticket number and subject), plus the fields its template uses. A
missing or misspelled field fails where the context is built (TypeError, and mypy); a
bad value (a rating of 6, an unknown missing-field name) raises `RenderError` there too.
Templates are rendered with ``StrictUndefined``: a template can only use what its
context hands it, and a typo fails loudly (at start-up: `Renderer` renders every event
once) instead of printing nothing.

What each template gets, besides the common ``number`` ("123456" or None), ``ticket``
("#123456" or None), ``subject`` (one line, at most 200 characters), ``intake``, ``crm``
and ``phone_numbers`` (a list), is what its class's `variables` returns. Content-free
texts (held_notice, unknown_ticket_guidance) never get a number or a subject, whatever
`Common` holds; held_digest gets intake, crm and phone_numbers only.

Customer-facing templates (every one but staff_copy, staff_reply, staff_notice and
held_digest) never print attachment names, and print customer values only through the
``value`` filter (one line, controls removed; a value with a URL-ish token, an IBAN- or
account-number-like run of digits, or more than 80 characters prints as "(podano)" /
"(provided)"), serial numbers and CommCell IDs only through ``device_id`` (also
"(podano)" unless they look like an identifier), phone numbers through ``phone`` (E.164
shown as "+48 601 234 567") and then ``value``. The acknowledgement and the
missing-fields request never get the description. An automatic answer must not carry
the customer's free text (SPEC §6), or anyone could make crm@ send any text (a bank
account to pay into, a link) to a forged address. ``short`` (cut to a length) remains
for the staff copy.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import jinja2
import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat

from gateway.compose import (
    SUBJECT_LIMIT,
    body_text,
    check_number,
    clean_filename,
    clean_header_text,
    cut_text,
)
from gateway.errors import GatewayError
from gateway.model import FIELD_NAMES, REQUIRED_FIELDS, Fields, Status, format_ticket

__all__ = [
    "CLOSE_REASONS",
    "COPY_KINDS",
    "EVENTS",
    "LANGUAGES",
    "MISSING_LABELS",
    "NOTICE_PROBLEMS",
    "STAFF_EVENTS",
    "STATUS_LABELS",
    "TEXTS",
    "Acknowledgement",
    "CloseReason",
    "Closed",
    "ClosedTicketGuidance",
    "Common",
    "CopyKind",
    "HeldDigest",
    "HeldItem",
    "HeldNotice",
    "MissingFields",
    "NoticeProblem",
    "RatingRequest",
    "RenderError",
    "Renderer",
    "Resolved",
    "StaffCopy",
    "StaffFile",
    "StaffNotice",
    "StaffReply",
    "StatusChanged",
    "Text",
    "UnknownTicketGuidance",
    "attachment_counts",
    "customer_value",
    "device_id_value",
    "format_phone",
    "sample_texts",
    "short_text",
]

LANGUAGES: tuple[str, ...] = ("pl", "en")

STATUS_LABELS: dict[str, dict[Status, str]] = {
    "pl": {
        Status.AWAITING_INFO: "Oczekuje na uzupełnienie",
        Status.ACCEPTED: "Przyjęte",
        Status.IN_PROGRESS: "W realizacji",
        Status.RESOLVED: "Rozwiązane",
        Status.CLOSED: "Zamknięte",
    },
    "en": {
        Status.AWAITING_INFO: "Awaiting information",
        Status.ACCEPTED: "Accepted",
        Status.IN_PROGRESS: "In progress",
        Status.RESOLVED: "Resolved",
        Status.CLOSED: "Closed",
    },
}

# The names of the required items as the procedure (SEED.md) words them.
MISSING_LABELS: dict[str, dict[str, str]] = {
    "pl": {
        "reporter_name": "Imię i nazwisko osoby zgłaszającej problem",
        "reporter_phone": "Dane kontaktowe osoby zgłaszającej (telefon)",
        "install_address": "Adres instalacji sprzętu – realizacji naprawy",
        "description": "Opis problemu",
        "device_id": "Numer seryjny urządzenia / numer Commcell ID",
    },
    # The English labels are ones the parser reads back ("Label: value"), since the
    # missing-fields mail asks for the answer in that form.
    "en": {
        "reporter_name": "Full name (of the person reporting the problem)",
        "reporter_phone": "Contact details (phone)",
        "install_address": "Installation address (where the repair takes place)",
        "description": "Description of the problem",
        "device_id": "Serial number / CommCell ID",
    },
}

DEFAULT_INTAKE = "serwis@s4e.pl"
DEFAULT_CRM = "crm@s4e.pl"
DEFAULT_PHONE_NUMBERS = ("(0-12) 444-65-00", "801 090 101")
NO_FIELDS = Fields()
CloseReason = Literal["rating", "staff", "rating_window"]
CopyKind = Literal["new", "follow_up", "reply_unrated"]
NoticeProblem = Literal["empty", "closed", "bad_command", "not_sent"]
CLOSE_REASONS: tuple[str, ...] = get_args(CloseReason)
COPY_KINDS: tuple[str, ...] = get_args(CopyKind)
NOTICE_PROBLEMS: tuple[str, ...] = get_args(NoticeProblem)

SHORT_LIMIT = 80  # `short` filter default
VALUE_LIMIT = 80  # `value` filter: a longer customer value is not printed
# What a customer-facing template prints instead of a value it must not repeat.
WITHHELD = {"pl": "(podano)", "en": "(provided)"}


class RenderError(GatewayError, ValueError):
    """A template set that cannot be used (missing file, syntax error) or a bad context.

    A GatewayError, so a broken template folder stops start-up with one clear line."""


# --------------------------------------------------------------------------- filters

def short_text(value: object, limit: int = SHORT_LIMIT) -> str:
    """The `short` filter: one line, controls removed, at most `limit` characters."""
    return cut_text(clean_header_text(value), limit)


# Format characters (zero-width space/joiner, soft hyphen, bidi marks...) can hide a
# token from a check ("h\u200bttp://") and show nothing to the reader: dropped from values.
_FORMAT_TABLE = dict.fromkeys(
    cp for cp in (0xAD, 0x180E, *range(0x200B, 0x2010), *range(0x2060, 0x2070), 0xFEFF)
)
# Checked on the NFKC-normalised, case-folded text (fullwidth "ｗｗｗ．" is "www.").
_URL_LIKE = re.compile(
    r"://|www\.|http"
    r"|[a-z0-9-]\.[a-z]{2,}/",  # a host with a path without a scheme: "bit.ly/x"
    re.ASCII,
)
_ACCOUNT_LIKE = re.compile(
    r"[a-z]{2}[0-9 ]{14,}"  # "PL61 1090 1014 0000 0712 1981 2874"
    r"|[a-z]{2}[ .-]?[0-9]{2}(?:[ .-]?[a-z]){0,4}(?:[ .-]?[0-9]){10,}"  # other IBANs
    r"|(?:[0-9][ .-]?){20,}",  # a Polish account number without "PL" (26 digits)
    re.ASCII,
)
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._/-]{0,39}", re.ASCII)
_E164 = re.compile(r"\+[1-9][0-9]{6,14}", re.ASCII)


def _value_text(value: object, joiner: str = " ") -> str:
    """One line; the lines of a multi-line value joined with `joiner` (", " for an
    address written over several lines)."""
    if value is None:
        return ""
    if joiner == " ":
        return clean_header_text(value).translate(_FORMAT_TABLE).strip()
    lines = [clean_header_text(line).translate(_FORMAT_TABLE).strip().rstrip(",;")
             for line in str(value).splitlines()]
    return joiner.join(line for line in lines if line)


def plural_pl(count: object, one: str, few: str, many: str) -> str:
    """The Polish form for `count`: 1 plik, 2-4 (22-24...) pliki, 5+ (12-14) plików."""
    n = abs(int(count)) if isinstance(count, int) else 0
    if n == 1:
        return one
    if n % 10 in (2, 3, 4) and n % 100 not in (12, 13, 14):
        return few
    return many


def plural_en(count: object, one: str, other: str) -> str:
    return one if count == 1 else other


def format_size(size: object) -> str:
    """A size as people read it: 512 B, 14 KB, 3.2 MB."""
    n = int(size) if isinstance(size, int) else 0
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n / 1024 / 1024:.1f} MB"


def _repeatable(text: str, limit: int) -> bool:
    """Whether a customer value may be repeated to whoever the mail claims to be from."""
    if len(text) > limit:
        return False
    folded = unicodedata.normalize("NFKC", text).casefold()
    folded = " ".join(clean_header_text(folded).translate(_FORMAT_TABLE).split())
    return not (_URL_LIKE.search(folded) or _ACCOUNT_LIKE.search(folded))


def customer_value(value: object, placeholder: str = WITHHELD["pl"],
                   limit: int = VALUE_LIMIT, joiner: str = " ") -> str:
    """The `value` filter: a short structured customer value, or `placeholder`.

    One line, controls and invisible format characters removed. A value containing a
    URL-ish token ("://", "www.", "http", "host.tld/path"), an IBAN- or account-number-like
    run, or longer than `limit` characters is not repeated: `placeholder` is returned
    instead. None or an empty value gives "".
    """
    text = _value_text(value, joiner)
    if not text:
        return ""
    return text if _repeatable(text, limit) else placeholder


def device_id_value(value: object, placeholder: str = WITHHELD["pl"]) -> str:
    """The `device_id` filter: a serial number or CommCell ID when it looks like one
    (``^[A-Za-z0-9][A-Za-z0-9 ._/-]{0,39}$`` and nothing `customer_value` withholds),
    else `placeholder`; "" for None."""
    text = _value_text(value)
    if not text:
        return ""
    if _DEVICE_ID.fullmatch(text) and _repeatable(text, VALUE_LIMIT):
        return text
    return placeholder


def format_phone(value: object) -> str:
    """The `phone` filter: an E.164 number ("+48601234567") as people write it
    ("+48 601 234 567"); anything else comes back as it is (one line)."""
    text = _value_text(value)
    if not _E164.fullmatch(text):
        return text
    try:
        number = phonenumbers.parse(text, None)
    except NumberParseException:
        return text
    if not phonenumbers.is_possible_number(number):
        return text
    return phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)



def _join_alternatives(items: Iterable[str], word: str) -> str:
    items = [str(i) for i in items]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {word} " + items[-1]



# --------------------------------------------------------------------------- contexts

_COMMON_KEYS = ("number", "ticket", "subject", "intake", "crm", "phone_numbers")
_CONTENT_FREE_KEYS = ("number", "ticket", "intake", "crm", "phone_numbers")


@dataclass(frozen=True, slots=True, kw_only=True)
class Common:
    """The shared part of every text: who we are, and the ticket it is about."""

    intake: str = DEFAULT_INTAKE
    crm: str = DEFAULT_CRM
    phone_numbers: tuple[str, ...] = DEFAULT_PHONE_NUMBERS
    number: int | None = None  # the ticket, printed "#123456"
    subject: str = ""  # the ticket's subject (or the message's, about no ticket)

    def __post_init__(self) -> None:
        if self.number is not None:
            if isinstance(self.number, bool) or not isinstance(self.number, int):
                raise RenderError(f"ticket number must be an int, got {self.number!r}")
            _number(self.number)


@dataclass(frozen=True, slots=True)
class Text:
    """One event's context; `event` names its template (templates/<lang>/<event>.txt.j2).

    Subclasses validate their values in `check` and say what their template gets in
    `variables`; `Renderer` adds the common part."""

    event: ClassVar[str] = ""
    needs_number: ClassVar[bool] = True
    # Content-free texts never name a ticket, whatever `common` holds.
    content_free: ClassVar[bool] = False
    common_keys: ClassVar[tuple[str, ...]] = _COMMON_KEYS
    common: Common

    def __post_init__(self) -> None:
        if not isinstance(self.common, Common):
            raise RenderError(f"{self.event}: common must be a Common, got {self.common!r}")
        if self.needs_number and self.common.number is None:
            raise RenderError(f"{self.event}: a ticket number is required")
        self.check()

    def check(self) -> None:
        """Raise RenderError for a value the template cannot print."""

    def variables(self, language: str) -> dict[str, Any]:
        """The event's own template variables (the common ones come from `Renderer`)."""
        return {}


@dataclass(frozen=True, slots=True, kw_only=True)
class Acknowledgement(Text):
    """The report is registered and accepted (or staff accepted it by hand)."""

    event: ClassVar[str] = "acknowledgement"
    fields: Fields = NO_FIELDS  # the description is never shown
    attachments: int = 0  # how many files arrived (never their names)
    log_attachments: int | None = None  # how many of them are logs
    phone_confirmation_required: bool = False
    # Staff accepted an incomplete report by hand: the text confirms the acceptance of
    # an already registered ticket.
    accepted_by_staff: bool = False

    def check(self) -> None:
        _check_attachments(self.event, self.attachments, self.log_attachments)
        _check_fields(self.event, self.fields)

    def variables(self, language: str) -> dict[str, Any]:
        return {"fields": _customer_fields(self.fields), "attachments": self.attachments,
                "log_attachments": self.log_attachments,
                "phone_confirmation_required": bool(self.phone_confirmation_required),
                "accepted_by_staff": bool(self.accepted_by_staff)}


@dataclass(frozen=True, slots=True, kw_only=True)
class MissingFields(Text):
    """The report is registered but lacks required items (`model.REQUIRED_FIELDS`)."""

    event: ClassVar[str] = "missing_fields"
    missing: tuple[str, ...]  # names from model.REQUIRED_FIELDS, at least one
    fields: Fields = NO_FIELDS  # the description is never shown
    attachments: int = 0
    log_attachments: int | None = None
    again: bool = False  # a follow-up still lacks something: not "registered" again

    def check(self) -> None:
        _check_missing(self.event, self.missing)
        if not self.missing:
            raise RenderError("missing_fields: `missing` must name at least one field")
        _check_attachments(self.event, self.attachments, self.log_attachments)
        _check_fields(self.event, self.fields)

    def variables(self, language: str) -> dict[str, Any]:
        return {"fields": _customer_fields(self.fields), "missing": list(self.missing),
                "missing_labels": [MISSING_LABELS[language][m] for m in self.missing],
                "again": bool(self.again), "attachments": self.attachments,
                "log_attachments": self.log_attachments}


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusChanged(Text):
    """A new status (in practice accepted or in_progress; any status renders)."""

    event: ClassVar[str] = "status_changed"
    status: Status
    note: str | None = None  # staff text, printed as is

    def check(self) -> None:
        _check_status(self.event, self.status)

    def variables(self, language: str) -> dict[str, Any]:
        return {**_status_variables(self.status, language), "note": _note(self.note)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolved(Text):
    """The ticket is resolved: the customer is asked for a rating."""

    event: ClassVar[str] = "resolved"
    note: str | None = None
    # When given, the text says the ticket closes by itself after that many days.
    rating_window_days: int | None = None

    def check(self) -> None:
        window = self.rating_window_days
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise RenderError(f"{self.event}: rating_window_days must be an int >= 1 or "
                              f"None, got {window!r}")

    def variables(self, language: str) -> dict[str, Any]:
        return {"note": _note(self.note), "rating_window_days": self.rating_window_days}


@dataclass(frozen=True, slots=True, kw_only=True)
class Closed(Text):
    """The ticket is closed: by the customer's rating, by staff or by the rating window."""

    event: ClassVar[str] = "closed"
    rating: int | None = None  # 1-5
    reason: CloseReason | None = None
    note: str | None = None

    def check(self) -> None:
        rating = self.rating
        if rating is not None and (
            isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5
        ):
            raise RenderError(f"{self.event}: rating must be 1-5 or None, got {rating!r}")
        if self.reason is not None and self.reason not in CLOSE_REASONS:
            raise RenderError(f"{self.event}: unknown close reason {self.reason!r}")

    def variables(self, language: str) -> dict[str, Any]:
        return {"rating": self.rating, "reason": self.reason, "note": _note(self.note)}


@dataclass(frozen=True, slots=True)
class ClosedTicketGuidance(Text):
    """Mail on a closed ticket: report anew at the intake address. Without a number it
    still says *a* ticket is closed, so a sender not authorised for the ticket gets
    `HeldNotice` instead (SPEC §4: nobody can probe numbers)."""

    event: ClassVar[str] = "closed_ticket_guidance"
    needs_number: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class UnknownTicketGuidance(Text):
    """Mail that names no open ticket: how to report. Never names a ticket."""

    event: ClassVar[str] = "unknown_ticket_guidance"
    needs_number: ClassVar[bool] = False
    content_free: ClassVar[bool] = True
    common_keys: ClassVar[tuple[str, ...]] = _CONTENT_FREE_KEYS


@dataclass(frozen=True, slots=True)
class HeldNotice(Text):
    """Content-free: the same text whether a ticket exists, is closed or not."""

    event: ClassVar[str] = "held_notice"
    needs_number: ClassVar[bool] = False
    content_free: ClassVar[bool] = True
    common_keys: ClassVar[tuple[str, ...]] = _CONTENT_FREE_KEYS


@dataclass(frozen=True, slots=True, kw_only=True)
class StaffReply(Text):
    """An engineer's answer to the customer, in the thread."""

    event: ClassVar[str] = "staff_reply"
    message: str  # the engineer's text, rendered as is
    status: Status | None = None

    def check(self) -> None:
        if not body_text(self.message).strip():
            raise RenderError("staff_reply: `message` is required")
        if self.status is not None:
            _check_status(self.event, self.status)

    def variables(self, language: str) -> dict[str, Any]:
        return {"message": body_text(self.message).strip("\n"),
                **_status_variables(self.status, language)}


@dataclass(frozen=True, slots=True, kw_only=True)
class StaffFile:
    """One attachment as the staff copy lists it."""

    filename: str
    size: int
    is_log: bool = False
    attached: bool = False  # the file itself is attached to the copy


@dataclass(frozen=True, slots=True, kw_only=True)
class StaffCopy(Text):
    """The desk's copy of a customer message that entered a ticket: may show everything."""

    event: ClassVar[str] = "staff_copy"
    copy_kind: CopyKind
    fields: Fields = NO_FIELDS  # in full, with the description
    missing: tuple[str, ...] = ()
    phone_confirmation_required: bool = False
    reporter: str = ""  # the sender's address
    status: Status | None = None  # default: awaiting_info if anything is missing, else accepted
    text: str = ""  # the customer's new text
    verdict: str = ""  # the sender verification, one line
    files: tuple[StaffFile, ...] = ()
    notes: tuple[str, ...] = ()  # the parser's notes for staff
    dispatcher: str = ""
    contact: str = ""
    assignee: str = ""
    linked: int | None = None  # the closed ticket a new report is about

    def check(self) -> None:
        if self.copy_kind not in COPY_KINDS:
            raise RenderError(f"{self.event}: copy_kind must be one of "
                              f"{', '.join(COPY_KINDS)}, got {self.copy_kind!r}")
        _check_missing(self.event, self.missing)
        _check_fields(self.event, self.fields)
        if self.status is not None:
            _check_status(self.event, self.status)
        if self.linked is not None:
            _number(self.linked)

    def variables(self, language: str) -> dict[str, Any]:
        status = self.status
        if status is None:
            status = Status.AWAITING_INFO if self.missing else Status.ACCEPTED
        files = [{"name": clean_filename(f.filename),
                  "size": f.size if _is_count(f.size) else 0,
                  "is_log": bool(f.is_log), "attached": bool(f.attached)} for f in self.files]
        return {
            "fields": _all_fields(self.fields), "missing": list(self.missing),
            "missing_labels": [MISSING_LABELS[language][m] for m in self.missing],
            "phone_confirmation_required": bool(self.phone_confirmation_required),
            "reporter": clean_header_text(self.reporter),
            "attachments": len(files),
            "log_attachments": sum(1 for f in files if f["is_log"]),
            "attachment_names": [f["name"] for f in files],
            **_status_variables(status, language),
            "text": body_text(self.text).strip("\n"),
            "copy_kind": self.copy_kind,
            "verdict": clean_header_text(self.verdict),
            "files": files,
            "notes": [clean_header_text(n) for n in self.notes if n],
            "dispatcher": clean_header_text(self.dispatcher),
            "contact": clean_header_text(self.contact),
            "assignee": clean_header_text(self.assignee),
            "linked": None if self.linked is None else format_ticket(self.linked),
        }


@dataclass(frozen=True, slots=True)
class RatingRequest(Text):
    """A reply on a resolved ticket without a readable rating: please rate 1-5."""

    event: ClassVar[str] = "rating_request"


@dataclass(frozen=True, slots=True, kw_only=True)
class StaffNotice(Text):
    """To an engineer whose mail to crm@ was not relayed: why, and what to do."""

    event: ClassVar[str] = "staff_notice"
    problem: str  # one of NOTICE_PROBLEMS (the router's StaffRefused.problem)
    detail: str = ""
    status: Status | None = None  # the ticket's current status

    def check(self) -> None:
        if self.problem not in NOTICE_PROBLEMS:
            raise RenderError(f"{self.event}: problem must be one of "
                              f"{', '.join(NOTICE_PROBLEMS)}, got {self.problem!r}")
        if self.status is not None:
            _check_status(self.event, self.status)

    def variables(self, language: str) -> dict[str, Any]:
        return {"problem": self.problem, "detail": body_text(self.detail).strip("\n"),
                **_status_variables(self.status, language)}


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldItem:
    """One held message in the digest."""

    id: int
    sender: str
    subject: str
    reason: str
    received: str  # as the operator reads it, in the configured time zone
    ticket: int | None = None  # the ticket it names


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldDigest(Text):
    """The hourly digest of held mail to the `notify` addresses."""

    event: ClassVar[str] = "held_digest"
    needs_number: ClassVar[bool] = False
    common_keys: ClassVar[tuple[str, ...]] = ("intake", "crm", "phone_numbers")
    held: tuple[HeldItem, ...] = ()

    def variables(self, language: str) -> dict[str, Any]:
        return {"held": [{"id": clean_header_text(h.id), "sender": clean_header_text(h.sender),
                          "subject": clean_header_text(h.subject),
                          "reason": clean_header_text(h.reason),
                          "received": clean_header_text(h.received),
                          "ticket": "" if h.ticket is None else format_ticket(h.ticket)}
                         for h in self.held]}


# Every event, in the order the templates are loaded; one template file each.
TEXTS: dict[str, type[Text]] = {cls.event: cls for cls in (
    Acknowledgement, MissingFields, StatusChanged, Resolved, Closed, ClosedTicketGuidance,
    UnknownTicketGuidance, StaffReply, HeldNotice, StaffCopy, RatingRequest, StaffNotice,
    HeldDigest)}
EVENTS: tuple[str, ...] = tuple(TEXTS)
# Staff copies, staff notices and the held digest go to staff only.
STAFF_EVENTS = frozenset({StaffCopy.event, StaffNotice.event, HeldDigest.event})


def attachment_counts(items: Iterable[object]) -> tuple[int, int | None]:
    """(how many, how many of them logs) of a list of attachments: `model.Attachment`
    objects, store rows or dicts with ``is_log``. The log count is None when no item
    says whether it is a log (a list of names)."""
    flags = [_item_attr(item, "is_log") for item in items]
    if not any(flag is not None for flag in flags):
        return len(flags), None
    return len(flags), sum(1 for flag in flags if flag)


def _item_attr(item: object, name: str) -> Any:
    """`item.name`, `item[name]` (a dict or sqlite3.Row) or None."""
    if isinstance(item, str | bytes):
        return None
    if isinstance(item, Mapping):
        return item.get(name)
    if hasattr(item, name):
        return getattr(item, name)
    try:
        return item[name]  # type: ignore[index]
    except (TypeError, KeyError, IndexError):
        return None


def _number(value: int) -> int:
    try:
        return check_number(value)
    except ValueError as exc:
        raise RenderError(str(exc)) from None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_attachments(event: str, count: int, logs: int | None) -> None:
    if not _is_count(count):
        raise RenderError(f"{event}: attachments must be a count, got {count!r}")
    if logs is not None and (not _is_count(logs) or logs > count):
        raise RenderError(f"{event}: log_attachments must be a count from 0 to "
                          f"attachments ({count}), got {logs!r}")


def _check_fields(event: str, fields: object) -> None:
    if not isinstance(fields, Fields):
        raise RenderError(f"{event}: fields must be model.Fields, got {type(fields).__name__}")


def _check_missing(event: str, missing: Iterable[str]) -> None:
    for name in missing:
        if name not in REQUIRED_FIELDS:
            raise RenderError(f"{event}: unknown missing field {name!r}")


def _check_status(event: str, status: Status | str) -> None:
    try:
        Status(status)
    except ValueError:
        raise RenderError(f"{event}: unknown status {status!r}") from None


def _status_variables(status: Status | None, language: str) -> dict[str, Any]:
    if status is None:
        return {"status": None, "status_label": None}
    status = Status(status)
    return {"status": status.value, "status_label": STATUS_LABELS[language][status]}


def _note(value: str | None) -> str | None:
    """Staff text as is (newlines normalised); None when blank."""
    note = body_text(value).strip("\n")
    return note if note.strip() else None


def _all_fields(fields: Fields) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in FIELD_NAMES:
        raw = getattr(fields, name)
        text = body_text(raw).strip() if raw is not None else ""
        out[name] = text or None
    return out


def _customer_fields(fields: Fields) -> dict[str, str | None]:
    """The fields an automatic answer may show: never the description (free text)."""
    out = _all_fields(fields)
    del out["description"]
    return out


# --------------------------------------------------------------------------- renderer


class Renderer:
    """The templates of one language, loaded and checked once."""

    def __init__(self, templates_dir: Path, language: str = "pl",
                 override_dir: Path | None = None) -> None:
        """`override_dir` (`[tickets] templates`): its `<language>/<name>` files, or
        files directly in it, win over the packaged ones of the same name."""
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, "
                             f"got {language!r}")
        self.language = language
        folder = Path(templates_dir) / language
        folders = [folder]
        if override_dir is not None:
            override = Path(override_dir)
            folders[:0] = [override / language, override]
        missing = [f"{folder / (e + '.txt.j2')}" for e in EVENTS
                   if not any((f / f"{e}.txt.j2").is_file() for f in folders)]
        if missing:
            raise RenderError(f"missing template(s): {', '.join(missing)}")
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader([str(f) for f in folders if f.is_dir()]),
            undefined=jinja2.StrictUndefined,
            # Only plain text today; any future HTML template is escaped. Names end in
            # ".j2", so list the double extensions too (select_autoescape matches the end).
            autoescape=jinja2.select_autoescape(
                ["html", "htm", "xml", "html.j2", "htm.j2", "xml.j2"], default=False,
            ),
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,  # compiled once here: rendering never stats the files
            cache_size=-1,
            finalize=lambda v: "" if v is None else v,
        )
        word = "lub" if language == "pl" else "or"
        withheld = WITHHELD[language]
        self._env.filters["short"] = short_text
        self._env.filters["oneline"] = clean_header_text
        self._env.filters["value"] = (
            lambda v, limit=VALUE_LIMIT: customer_value(v, withheld, limit))
        self._env.filters["address"] = (
            lambda v, limit=VALUE_LIMIT: customer_value(v, withheld, limit, joiner=", "))
        self._env.filters["device_id"] = lambda v: device_id_value(v, withheld)
        self._env.filters["phone"] = format_phone
        self._env.filters["alternatives"] = lambda items: _join_alternatives(items, word)
        self._env.filters["plural"] = plural_pl if language == "pl" else plural_en
        self._env.filters["size"] = format_size
        self._templates: dict[str, jinja2.Template] = {}
        for event in EVENTS:
            name = f"{event}.txt.j2"
            try:
                self._templates[event] = self._env.get_template(name)
            except jinja2.TemplateSyntaxError as exc:
                where = exc.filename or str(folder / name)
                raise RenderError(f"{where}:{exc.lineno}: {exc.message}") from exc
        self._self_check(folder)

    def _self_check(self, folder: Path) -> None:
        """Render every event once, so a broken template fails at start-up, not at 3 am."""
        for text in sample_texts():
            try:
                self.render(text)
            except RenderError:
                raise
            except Exception as exc:  # a template calling a filter wrongly, etc.
                path = folder / f"{text.event}.txt.j2"
                raise RenderError(f"{path}: {type(exc).__name__}: {exc}") from exc

    def render(self, text: Text) -> str:
        """The plain-text body of `text`'s event, ending in one newline."""
        if not isinstance(text, Text) or text.event not in self._templates:
            raise RenderError(f"not a text to render: {text!r}")
        template = self._templates[text.event]
        common = _common_variables(text.common, named=not text.content_free)
        variables = {key: value for key, value in common.items() if key in text.common_keys}
        variables.update(text.variables(self.language))
        try:
            body = template.render(variables)
        except jinja2.TemplateError as exc:
            raise RenderError(f"{template.filename}: {type(exc).__name__}: {exc}") from exc
        return body.rstrip() + "\n"


def _common_variables(common: Common, *, named: bool) -> dict[str, Any]:
    number = common.number if named else None
    return {
        "number": None if number is None else f"{number:06d}",
        "ticket": None if number is None else format_ticket(number),
        "subject": cut_text(clean_header_text(common.subject), SUBJECT_LIMIT),
        "intake": clean_header_text(common.intake or DEFAULT_INTAKE),
        "crm": clean_header_text(common.crm or DEFAULT_CRM),
        "phone_numbers": [p for p in (clean_header_text(p) for p in common.phone_numbers) if p],
    }


def sample_texts() -> Iterator[Text]:
    """Every event at least once, both sides of every flag: what `Renderer` renders at
    start-up so a typo in a rarely taken branch fails there."""
    common = Common(number=123456, subject="Awaria")
    one_phone = Common(number=123456, subject="Awaria", phone_numbers=("801 090 101",))
    fields = Fields(reporter_name="Jan Kowalski", reporter_phone="+48601234567",
                    serial_number="SN-1", description="x")
    yield Acknowledgement(common, fields=fields, attachments=3, log_attachments=1,
                          phone_confirmation_required=True)
    yield Acknowledgement(one_phone, accepted_by_staff=True, attachments=1)
    yield MissingFields(common, missing=("device_id",), fields=fields, attachments=3,
                        log_attachments=1)
    yield MissingFields(one_phone, missing=("device_id", "description"), again=True,
                        attachments=1)
    yield StatusChanged(common, status=Status.IN_PROGRESS, note="x")
    yield StatusChanged(one_phone, status=Status.ACCEPTED)
    yield Resolved(common, note="x", rating_window_days=14)
    yield Resolved(one_phone, rating_window_days=1)
    yield Closed(common, rating=5, reason="rating", note="x")
    yield Closed(one_phone, reason="staff")
    yield ClosedTicketGuidance(common)
    yield ClosedTicketGuidance(Common(phone_numbers=("801 090 101",)))
    yield UnknownTicketGuidance(common)
    yield UnknownTicketGuidance(one_phone)
    yield StaffReply(common, message="x", status=Status.IN_PROGRESS)
    yield StaffReply(one_phone, message="x")
    yield HeldNotice(common)
    yield StaffCopy(common, copy_kind="new", fields=fields, missing=("device_id",),
                    phone_confirmation_required=True, reporter="jan@example.com",
                    status=Status.IN_PROGRESS, text="Serwer nie działa.\nPozdrawiam",
                    verdict="pass (dmarc=pass)",
                    files=(StaffFile(filename="a.log", size=2048, is_log=True, attached=True),),
                    notes=("x",), dispatcher="anna@example.com", contact="jan@example.org",
                    assignee="inz@s4e.pl", linked=654321)
    yield StaffCopy(one_phone, copy_kind="reply_unrated")
    yield StaffCopy(common, copy_kind="follow_up", status=Status.RESOLVED)
    yield RatingRequest(common)
    for problem in NOTICE_PROBLEMS:
        yield StaffNotice(common, problem=problem, detail="x", status=Status.IN_PROGRESS)
    yield StaffNotice(one_phone, problem="empty")
    yield HeldDigest(common, held=(HeldItem(id=1, sender="x@example.com", subject="x",
                                            reason="x", received="2026-12-01 10:00",
                                            ticket=123456),
                                   HeldItem(id=2, sender="", subject="", reason="x",
                                            received="2026-12-01 10:05")))
    yield HeldDigest(common)
