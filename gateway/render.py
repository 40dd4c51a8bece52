"""Rendering: jinja2 templates -> plain-text bodies, and `Outgoing` -> MIME bytes.

Pure: the templates are read once, when a `Renderer` is built; after that nothing here
touches the disk, the clock or the configuration (the caller passes addresses, the
Message-ID and the date).

Templates live in ``templates/<language>/<event>.txt.j2`` (``pl`` is the default, ``en``
the alternative); files whose names start with ``_`` are partials included by them.
They are rendered with ``StrictUndefined``: a template can only use what `Renderer.render`
hands it, and a typo fails loudly instead of printing nothing.

Template context (what `Renderer.render` accepts; every key is optional unless marked
*required*, the defaults are filled in by `render`, unknown keys are refused)
------------------------------------------------------------------------------------------
common        ``number``  six-digit string "123456" (an int is accepted) or None
              ``ticket``  "#123456" or None (derived from ``number``)
              ``subject`` the ticket subject, one line, at most 200 characters
              ``intake``  "serwis@s4e.pl"      ``crm`` "crm@s4e.pl"
              ``phone_numbers`` list of str, default the procedure's two numbers
acknowledgement   *number*; ``fields`` (dict or `model.Fields`: reporter_name,
              reporter_email, reporter_phone, install_address, serial_number,
              commcell_id -> str | None; the description is removed before rendering),
              ``attachments`` (int, default 0: how many files arrived; a list of names or
              attachment objects is still accepted and counted), ``log_attachments``
              (int or None, default None: how many of them are logs; when a list is
              given it is counted from items that carry ``is_log``),
              ``phone_confirmation_required`` (bool, default False),
              ``accepted_by_staff`` (bool, default False: staff accepted an incomplete
              report by hand; the text then confirms the acceptance of an already
              registered ticket)
missing_fields    *number*, *missing* (names from `model.REQUIRED_FIELDS`, non-empty),
              ``fields``, ``attachments``, ``log_attachments`` as above, ``again`` (bool,
              default False: a follow-up still lacks something, so the ticket is not
              "registered" a second time); derived ``missing_labels`` (the procedure's
              wording)
status_changed    *number*, *status* (`model.Status` or its value; in practice accepted or
              in_progress, any status renders), ``note`` (staff text or None); derived
              ``status_label``
resolved      *number*, ``note``, ``rating_window_days`` (int >= 1 or None, default None:
              when given the text says the ticket closes by itself after that many days)
closed        *number*, ``rating`` (1-5 or None), ``reason`` ("rating" | "staff" |
              "rating_window" | None), ``note``
closed_ticket_guidance   ``number`` (None when the ticket must not be named; it still
              says *a* ticket is closed, so a sender not authorised for the ticket gets
              held_notice instead: SPEC §4, nobody can probe numbers)
unknown_ticket_guidance  nothing ticket-specific (number/ticket are forced to None)
staff_reply   *number*, *message* (the engineer's text, rendered as is), ``status``;
              derived ``status_label``
held_notice   content-free: the template only gets intake, crm, phone_numbers and
              number/ticket = None, whatever the caller passes
staff_copy    *number*, ``fields`` (full, with the description), ``missing``,
              ``phone_confirmation_required``, ``reporter`` (address), ``attachments``
              (names, or a count), ``log_attachments``, ``status`` (default:
              awaiting_info if anything is missing, else accepted); derived
              ``attachment_names`` (the names, when a list was given)

Customer-facing templates (every one but staff_copy and staff_reply) never print
attachment names, and print customer values only through the ``value`` filter (one line,
controls removed; a value with a URL-ish token, an IBAN- or account-number-like run of
digits, or more than 80 characters prints as "(podano)" / "(provided)"), serial numbers
and CommCell IDs only through ``device_id`` (also "(podano)" unless they look like an
identifier), phone numbers through ``phone`` (E.164 shown as "+48 601 234 567") and then
``value``. An automatic answer must not carry the customer's free text (SPEC §6), or
anyone could make crm@ send any text (a bank account to pay into, a link) to a forged
address. ``short`` (cut to a length) remains for the staff copy.
"""

from __future__ import annotations

import email.policy
import re
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from itertools import groupby
from pathlib import Path
from typing import Any

import jinja2
import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat

from gateway.errors import GatewayError
from gateway.model import (
    FIELD_NAMES,
    REQUIRED_FIELDS,
    TICKET_REF,
    Outgoing,
    Status,
    format_ticket,
)

__all__ = [
    "EVENTS",
    "LANGUAGES",
    "MISSING_LABELS",
    "STATUS_LABELS",
    "RenderError",
    "Renderer",
    "clean_filename",
    "clean_header_text",
    "compose_message",
    "customer_value",
    "device_id_value",
    "format_phone",
    "reply_subject",
    "short_text",
]

EVENTS: tuple[str, ...] = (
    "acknowledgement",
    "missing_fields",
    "status_changed",
    "resolved",
    "closed",
    "closed_ticket_guidance",
    "unknown_ticket_guidance",
    "staff_reply",
    "held_notice",
    "staff_copy",
    "rating_request",
    "staff_notice",
    "held_digest",
)

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

DEFAULT_SUBJECT = {"pl": "Zgłoszenie serwisowe", "en": "Service request"}
DEFAULT_PHONE_NUMBERS = ("(0-12) 444-65-00", "801 090 101")
CLOSE_REASONS = ("rating", "staff", "rating_window")

SHORT_LIMIT = 80  # `short` filter default
VALUE_LIMIT = 80  # `value` filter: a longer customer value is not printed
# What a customer-facing template prints instead of a value it must not repeat.
WITHHELD = {"pl": "(podano)", "en": "(provided)"}
SUBJECT_LIMIT = 200  # reply_subject default
HEADER_TEXT_LIMIT = 400  # hard cap for Subject in compose_message
FILENAME_LIMIT = 120
MAX_REFERENCES = 10
MAX_MSGID_LEN = 250

# Events whose answer goes out automatically to whoever the mail claims to come from:
# the description never reaches these templates.
_CUSTOMER_FIELD_EVENTS = frozenset({"acknowledgement", "missing_fields"})
_ATTACHMENT_KEYS = ("attachments", "log_attachments")
_NEEDS_NUMBER = frozenset(
    {"acknowledgement", "missing_fields", "status_changed", "resolved", "closed",
     "staff_reply", "staff_copy", "rating_request", "staff_notice"}
)
_COMMON_KEYS = ("number", "ticket", "subject", "intake", "crm", "phone_numbers")
# What each template gets (besides the common keys, unless it says otherwise).
_EVENT_KEYS: dict[str, tuple[str, ...]] = {
    "acknowledgement": _COMMON_KEYS + ("fields", "phone_confirmation_required",
                                       "accepted_by_staff") + _ATTACHMENT_KEYS,
    "missing_fields": _COMMON_KEYS + ("fields", "missing", "missing_labels", "again")
    + _ATTACHMENT_KEYS,
    "status_changed": _COMMON_KEYS + ("status", "status_label", "note"),
    "resolved": _COMMON_KEYS + ("note", "rating_window_days"),
    "closed": _COMMON_KEYS + ("rating", "reason", "note"),
    "closed_ticket_guidance": _COMMON_KEYS,
    "unknown_ticket_guidance": ("number", "ticket", "intake", "crm", "phone_numbers"),
    "staff_reply": _COMMON_KEYS + ("message", "status", "status_label"),
    "held_notice": ("number", "ticket", "intake", "crm", "phone_numbers"),
    "staff_copy": _COMMON_KEYS
    + ("fields", "missing", "missing_labels", "phone_confirmation_required", "reporter",
       "attachment_names", "status", "status_label", "text", "copy_kind", "verdict",
       "files", "notes", "dispatcher", "contact", "assignee", "linked") + _ATTACHMENT_KEYS,
    "rating_request": _COMMON_KEYS,
    "staff_notice": _COMMON_KEYS + ("problem", "detail", "status", "status_label"),
    "held_digest": ("intake", "crm", "held", "phone_numbers"),
}
# Staff copies, staff notices and the held digest go to staff only.
STAFF_EVENTS = frozenset({"staff_copy", "staff_notice", "held_digest"})
COPY_KINDS = ("new", "follow_up", "reply_unrated")
NOTICE_PROBLEMS = ("empty", "closed", "bad_command", "not_sent")
_ACCEPTED_KEYS = frozenset(
    {"number", "ticket", "subject", "intake", "crm", "phone_numbers", "fields",
     "attachments", "log_attachments", "phone_confirmation_required", "accepted_by_staff",
     "missing", "again", "status", "note", "rating", "rating_window_days", "reason",
     "message", "reporter", "text", "copy_kind", "verdict", "files", "notes", "dispatcher",
     "contact", "assignee", "linked", "problem", "detail", "held"}
)


class RenderError(GatewayError, ValueError):
    """A template set that cannot be used (missing file, syntax error) or a bad context.

    A GatewayError, so a broken template folder stops start-up with one clear line."""


# --------------------------------------------------------------------------- text helpers

# C0, DEL, C1 (incl. U+0085 NEL), the Unicode line/paragraph separators, the bidi
# embedding/override/isolate controls (they can disguise a file name or a subject), and
# lone surrogates (left by surrogateescape decoding; they cannot be encoded).
_CONTROL_CODEPOINTS = (
    list(range(0x00, 0x20))
    + list(range(0x7F, 0xA0))
    + [0x2028, 0x2029, 0x061C, 0x200E, 0x200F]
    + list(range(0x202A, 0x202F))
    + list(range(0x2066, 0x206A))
    + list(range(0xD800, 0xE000))
)
_CONTROL_TABLE = {cp: " " for cp in _CONTROL_CODEPOINTS}


def clean_header_text(value: object) -> str:
    """One line of text: every control character becomes a space, whitespace collapses.

    Removes CR, LF, NUL and all other C0/C1 controls (incl. U+0085), U+2028/U+2029,
    bidi controls and lone surrogates. None gives "".
    """
    if value is None:
        return ""
    return " ".join(str(value).translate(_CONTROL_TABLE).split())


def _cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, ending in "…" when cut."""
    if len(text) <= limit:
        return text
    head = text[: max(limit - 1, 0)]
    # Never separate a base character from its combining marks.
    while head and unicodedata.combining(text[len(head)]):
        head = head[:-1]
    return head.rstrip() + "…"


def short_text(value: object, limit: int = SHORT_LIMIT) -> str:
    """The `short` filter: one line, controls removed, at most `limit` characters."""
    return _cut(clean_header_text(value), limit)


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
    folded = " ".join(folded.translate(_CONTROL_TABLE).translate(_FORMAT_TABLE).split())
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


def _decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded the way the email package's header parser does."""
    if "=?" not in text:
        return text
    try:
        return str(email.policy.default.header_factory("subject", text))
    except Exception:  # a malformed header is not our problem here: keep it literal
        return text


def _header_safe(value: object) -> str:
    """Text that the email package will store and emit exactly as given.

    Decodes encoded words (a subject may still carry them), removes controls, and then
    breaks any remaining "=?": otherwise the header parser of `EmailMessage` decodes an
    encoded word such as "=?UTF-8?Q?=0A?=" into a line break *while composing*, which on
    Python < 3.11.10/3.12.5 ends up as a raw header line (CVE-2024-6923).
    """
    text = clean_header_text(_decode_words(clean_header_text(value)))
    return text.replace("=?", "=_?")


# Path separators and the other characters Windows refuses in file names ("<x>" would
# also lose its brackets in Python's own reader: email.utils.unquote).
_FILENAME_TABLE = str.maketrans({c: "_" for c in '/\\<>:"|?*'})


def clean_filename(value: object) -> str:
    """A display file name safe for a MIME parameter and a disk: one line, no separators."""
    name = _header_safe(value).translate(_FILENAME_TABLE).strip(" .")
    if not name:
        return "attachment"
    if len(name) > FILENAME_LIMIT:
        stem, dot, ext = name.rpartition(".")
        if dot and stem and 0 < len(ext) <= 16 and ext.isalnum():
            name = _cut(stem, FILENAME_LIMIT - len(ext) - 1) + "." + ext
        else:
            name = _cut(name, FILENAME_LIMIT)
    return name


def _body_text(value: object) -> str:
    """Multi-line text: newlines normalised, lone surrogates replaced, NUL removed."""
    if value is None:
        return ""
    text = str(value).replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return text.encode("utf-8", "replace").decode("utf-8")


def _join_alternatives(items: Iterable[str], word: str) -> str:
    items = [str(i) for i in items]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {word} " + items[-1]


# --------------------------------------------------------------------------- subjects


def _check_number(number: object) -> int:
    if isinstance(number, bool) or not isinstance(number, int | str):
        raise ValueError(f"ticket number must be an int, got {number!r}")
    if isinstance(number, str):
        if not re.fullmatch(r"#?[0-9]{6}", number, re.ASCII):
            raise ValueError(f"ticket number must be six digits, got {number!r}")
        number = int(number.lstrip("#"))
    if not 0 <= number <= 999_999:
        raise ValueError(f"ticket number out of range: {number!r}")
    return number


def _check_language(language: str) -> str:
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    return language


def reply_subject(
    number: int | None, original_subject: str, *, max_len: int = SUBJECT_LIMIT,
    language: str = "pl",
) -> str:
    """`[#123456] <original subject>` on one line, safe for a header, at most `max_len`.

    The original is decoded (RFC 2047) and cleaned (`clean_header_text`). When it already
    carries `#123456` it is kept as is; when it is empty the language's default subject
    is used. `number` None gives just the cleaned subject.
    """
    _check_language(language)
    if max_len < 30:
        raise ValueError(f"max_len too small: {max_len}")
    text = _header_safe(original_subject) or DEFAULT_SUBJECT[language]
    if number is None:
        return _cut(text, max_len)
    digits = f"{_check_number(number):06d}"
    kept = _cut(text, max_len)
    if any(m.group(1) == digits for m in TICKET_REF.finditer(kept)):
        return kept
    prefix = f"[#{digits}] "
    return prefix + _cut(text, max_len - len(prefix))


# --------------------------------------------------------------------------- renderer


class Renderer:
    """The templates of one language, loaded and checked once."""

    def __init__(self, templates_dir: Path, language: str = "pl",
                 override_dir: Path | None = None) -> None:
        """`override_dir` (`[tickets] templates`): its `<language>/<name>` files, or
        files directly in it, win over the packaged ones of the same name."""
        self.language = _check_language(language)
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
        sample = {
            "number": "123456",
            "subject": "Awaria",
            "fields": {"reporter_name": "Jan Kowalski", "reporter_phone": "+48601234567",
                       "serial_number": "SN-1", "description": "x"},
            "attachments": 3,
            "log_attachments": 1,
            "phone_confirmation_required": True,
            "missing": ["device_id"],
            "status": Status.IN_PROGRESS,
            "note": "x",
            "rating": 5,
            "reason": "rating",
            "rating_window_days": 14,
            "message": "x",
            "reporter": "jan@example.com",
            "text": "Serwer nie działa.\nPozdrawiam",
            "copy_kind": "new",
            "verdict": "pass (dmarc=pass)",
            "files": [{"filename": "a.log", "size": 2048, "is_log": True, "attached": True}],
            "notes": ["x"],
            "dispatcher": "anna@example.com",
            "contact": "jan@example.org",
            "assignee": "inz@s4e.pl",
            "linked": "654321",
            "problem": "empty",
            "detail": "x",
            "held": [{"id": "1", "sender": "x@example.com", "subject": "x", "reason": "x",
                      "received": "2026-12-01 10:00", "ticket": "#123456"}],
        }
        # Both sides of every flag, so a typo in a rarely taken branch fails here too.
        variants: tuple[dict[str, Any], ...] = (
            {},
            {"again": True, "accepted_by_staff": True, "attachments": ["a.log"],
             "log_attachments": None, "rating": None, "reason": "staff",
             "rating_window_days": 1, "phone_numbers": ["801 090 101"],
             "copy_kind": "reply_unrated", "problem": "bad_command", "files": [],
             "notes": [], "dispatcher": "", "contact": "", "assignee": "", "linked": None,
             "verdict": "", "held": [], "text": ""},
            {"copy_kind": "follow_up", "problem": "closed"},
            {"problem": "not_sent"},
        )
        for event in EVENTS:
            for variant in variants:
                try:
                    self.render(event, **{**sample, **variant})
                except RenderError:
                    raise
                except Exception as exc:  # a template calling a filter wrongly, etc.
                    path = folder / f"{event}.txt.j2"
                    raise RenderError(f"{path}: {type(exc).__name__}: {exc}") from exc

    def render(self, event: str, **context: Any) -> str:
        """The plain-text body for `event` (one of `EVENTS`), ending in one newline."""
        if event not in EVENTS:
            raise RenderError(f"unknown event {event!r}")
        unknown = set(context) - _ACCEPTED_KEYS
        if unknown:
            raise RenderError(f"{event}: unknown context key(s): {', '.join(sorted(unknown))}")
        ctx = self._prepare(event, context)
        template = self._templates[event]
        try:
            body = template.render({k: ctx[k] for k in _EVENT_KEYS[event]})
        except jinja2.TemplateError as exc:
            raise RenderError(f"{template.filename}: {type(exc).__name__}: {exc}") from exc
        return body.rstrip() + "\n"

    def _prepare(self, event: str, context: Mapping[str, Any]) -> dict[str, Any]:
        lang = self.language
        content_free = event in ("held_notice", "unknown_ticket_guidance")

        number = None if content_free else _context_number(context)
        if number is None and event in _NEEDS_NUMBER:
            raise RenderError(f"{event}: a ticket number is required")

        phones = context.get("phone_numbers")
        phones = DEFAULT_PHONE_NUMBERS if phones is None else phones
        if isinstance(phones, str):
            phones = [phones]

        fields = _context_fields(context.get("fields"))
        if event in _CUSTOMER_FIELD_EVENTS:
            del fields["description"]

        missing = tuple(context.get("missing") or ())
        for name in missing:
            if name not in REQUIRED_FIELDS:
                raise RenderError(f"{event}: unknown missing field {name!r}")
        if event == "missing_fields" and not missing:
            raise RenderError("missing_fields: `missing` must name at least one field")

        status = context.get("status")
        if status is None and event == "staff_copy":
            status = Status.AWAITING_INFO if missing else Status.ACCEPTED
        if status is None and event == "status_changed":
            raise RenderError("status_changed: `status` is required")
        if status is not None:
            try:
                status = Status(status)
            except ValueError:
                raise RenderError(f"{event}: unknown status {status!r}") from None

        rating = context.get("rating")
        if rating is not None and (
            isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5
        ):
            raise RenderError(f"{event}: rating must be 1-5 or None, got {rating!r}")
        reason = context.get("reason")
        if reason is not None and reason not in CLOSE_REASONS:
            raise RenderError(f"{event}: unknown close reason {reason!r}")

        message = _body_text(context.get("message")).strip("\n")
        if event == "staff_reply" and not message.strip():
            raise RenderError("staff_reply: `message` is required")
        note = _body_text(context.get("note")).strip("\n") or None
        if note is not None and not note.strip():
            note = None

        attachments, log_attachments, attachment_names = _context_attachments(event, context)

        window = context.get("rating_window_days")
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise RenderError(f"{event}: rating_window_days must be an int >= 1 or None, "
                              f"got {window!r}")

        return {
            "number": None if number is None else f"{number:06d}",
            "ticket": None if number is None else format_ticket(number),
            "subject": _cut(clean_header_text(context.get("subject")), SUBJECT_LIMIT),
            "intake": clean_header_text(context.get("intake") or "serwis@s4e.pl"),
            "crm": clean_header_text(context.get("crm") or "crm@s4e.pl"),
            "phone_numbers": [p for p in (clean_header_text(p) for p in phones) if p],
            "fields": fields,
            "attachments": attachments,
            "log_attachments": log_attachments,
            "attachment_names": attachment_names,
            "phone_confirmation_required": bool(context.get("phone_confirmation_required")),
            "accepted_by_staff": bool(context.get("accepted_by_staff")),
            "again": bool(context.get("again")),
            "rating_window_days": window,
            "missing": list(missing),
            "missing_labels": [MISSING_LABELS[lang][name] for name in missing],
            "status": None if status is None else status.value,
            "status_label": None if status is None else STATUS_LABELS[lang][status],
            "note": note,
            "rating": rating,
            "reason": reason,
            "message": message,
            "reporter": clean_header_text(context.get("reporter")),
            "text": _body_text(context.get("text")).strip("\n"),
            "copy_kind": _choice(event, "copy_kind", context.get("copy_kind"), COPY_KINDS),
            "verdict": clean_header_text(context.get("verdict")),
            "files": _context_files(context.get("files")),
            "notes": [clean_header_text(n) for n in context.get("notes") or () if n],
            "dispatcher": clean_header_text(context.get("dispatcher")),
            "contact": clean_header_text(context.get("contact")),
            "assignee": clean_header_text(context.get("assignee")),
            "linked": _linked(context.get("linked")),
            "problem": _choice(event, "problem", context.get("problem"), NOTICE_PROBLEMS),
            "detail": _body_text(context.get("detail")).strip("\n"),
            "held": _context_held(context.get("held")),
        }


def _choice(event: str, key: str, value: object, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if value not in choices:
        raise RenderError(f"{event}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _linked(value: object) -> str | None:
    if value is None:
        return None
    try:
        return format_ticket(_check_number(value))
    except ValueError as exc:
        raise RenderError(str(exc)) from None


def _context_files(value: Iterable[object] | None) -> list[dict[str, Any]]:
    """Attachments listed for staff: cleaned display name, size, whether a log."""
    files = []
    for item in value or ():
        size = _item_attr(item, "size")
        files.append({"name": clean_filename(_item_attr(item, "filename")),
                      "size": size if _is_count(size) else 0,
                      "is_log": bool(_item_attr(item, "is_log")),
                      "attached": bool(_item_attr(item, "attached"))})
    return files


def _context_held(value: Iterable[object] | None) -> list[dict[str, Any]]:
    held = []
    for item in value or ():
        held.append({key: clean_header_text(_item_attr(item, key))
                     for key in ("id", "sender", "subject", "reason", "received", "ticket")})
    return held


def _context_number(context: Mapping[str, Any]) -> int | None:
    number, ticket = context.get("number"), context.get("ticket")
    try:
        n = None if number is None else _check_number(number)
        t = None if ticket is None else _check_number(ticket)
    except ValueError as exc:
        raise RenderError(str(exc)) from None
    if n is not None and t is not None and n != t:
        raise RenderError(f"number {number!r} and ticket {ticket!r} disagree")
    return n if n is not None else t


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _context_attachments(
    event: str, context: Mapping[str, Any],
) -> tuple[int, int | None, list[str]]:
    """(how many attachments, how many of them logs or None, their names if given).

    ``attachments`` is a count; a list (of names, `model.Attachment` objects or store
    rows) is still accepted: its length is the count, items with ``is_log`` give the log
    count when ``log_attachments`` is not passed, and the names are kept for the staff
    copy only.
    """
    value, logs = context.get("attachments"), context.get("log_attachments")
    names: list[str] = []
    derived_logs: int | None = None
    if value is None:
        count = 0
    elif _is_count(value):
        count = value
    elif isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise RenderError(f"{event}: attachments must be a count or a list, got {value!r}")
    else:
        items = list(value)
        count = len(items)
        flags = [_item_attr(item, "is_log") for item in items]
        if any(flag is not None for flag in flags):
            derived_logs = sum(1 for flag in flags if flag)
        for item in items:
            name = _item_attr(item, "filename")
            name = clean_header_text(item if name is None and isinstance(item, str) else name)
            if name:
                names.append(name)
    if logs is None:
        logs = derived_logs
    elif not _is_count(logs) or logs > count:
        raise RenderError(f"{event}: log_attachments must be a count from 0 to "
                          f"attachments ({count}), got {logs!r}")
    return count, logs, names


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


def _context_fields(value: object) -> dict[str, str | None]:
    if value is None:
        value = {}
    elif hasattr(value, "as_dict"):
        value = value.as_dict()
    if not isinstance(value, Mapping):
        raise RenderError(f"fields must be a mapping or model.Fields, got {type(value).__name__}")
    unknown = set(value) - set(FIELD_NAMES)
    if unknown:
        raise RenderError(f"unknown field(s): {', '.join(sorted(unknown))}")
    out: dict[str, str | None] = {}
    for name in FIELD_NAMES:
        raw = value.get(name)
        text = _body_text(raw).strip() if raw is not None else ""
        out[name] = text or None
    return out


# --------------------------------------------------------------------------- MIME

_POLICY = email.policy.SMTP  # CRLF line ends, 78-octet lines, RFC 2047/2231 encoding
# Header objects fold themselves as usual; values stored with set_raw (already folded
# by `_fold_header`) are emitted as they are.
_GENERATE_POLICY = _POLICY.clone(refold_source="none")
# RFC 2047 §5(3): the characters that may stand for themselves in a Q-encoded word.
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_EW_OPEN, _EW_CLOSE = "=?utf-8?q?", "?="
_MSGID = re.compile(r"<[!#-'*+\-./0-9:=?@A-Z\[\]^_`a-z{|}~]{1," + str(MAX_MSGID_LEN) + "}>",
                    re.ASCII)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LOCAL_PART = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*", re.ASCII)
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", re.ASCII)
_MIME_TOKEN = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_CONTENT_TYPE = re.compile(rf"({_MIME_TOKEN})/({_MIME_TOKEN})", re.ASCII)


def _check_address(value: object, what: str) -> str:
    """A bare addr-spec (dot-atom local part, DNS or IDN domain) or ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what}: no address")
    if len(value) > 254 or clean_header_text(value) != value or " " in value:
        raise ValueError(f"{what}: unusable address {value!r}")
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{what}: not an address {value!r}")
    if len(local) > 64 or not _LOCAL_PART.fullmatch(local) or "=?" in local:
        raise ValueError(f"{what}: unusable local part in {value!r}")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{what}: unusable domain in {value!r}") from None
    labels = domain.split(".")
    if len(domain) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{what}: unusable domain in {value!r}")
    return f"{local}@{domain.lower()}"


def _valid_msgid(value: object) -> str | None:
    """`value` when it is a plain "<...>" Message-ID (no whitespace, controls, "=?")."""
    if isinstance(value, str) and _MSGID.fullmatch(value) and "=?" not in value:
        return value
    return None


def _thread_references(references: Iterable[str], in_reply_to: str | None) -> list[str]:
    ids = [i for i in (_valid_msgid(r) for r in references) if i]
    if in_reply_to:
        ids.append(in_reply_to)
    # Keep the last occurrence of each id, so the parent stays last.
    seen: set[str] = set()
    unique: list[str] = []
    for msgid in reversed(ids):
        if msgid not in seen:
            seen.add(msgid)
            unique.append(msgid)
    unique.reverse()
    if len(unique) > MAX_REFERENCES:
        # RFC 5322 §3.6.4 / common practice: keep the thread's root and the newest ones.
        unique = unique[:1] + unique[-(MAX_REFERENCES - 1):]
    return unique


def _content_type(value: object) -> tuple[str, str]:
    match = _CONTENT_TYPE.fullmatch(value.strip().lower()) if isinstance(value, str) else None
    if not match or match.group(1) in ("multipart", "message"):
        return "application", "octet-stream"
    return match.group(1), match.group(2)


def compose_message(
    out: Outgoing, *, from_addr: str, message_id: str, date: datetime,
    from_name: str = "Serwis S4E",
) -> bytes:
    """`out` as an RFC 5322 message with CRLF line ends, ready for the relay or a maildir.

    Raises ValueError when `out.to` (or `from_addr`/`message_id`, which are ours) is not
    usable. Everything else that came from the customer is cleaned or dropped: the subject
    and file names go through `clean_header_text`, references that do not look like
    "<...>" are left out. No byte of customer input can start a header line.
    """
    to = _check_address(out.to, "to")
    sender = _check_address(from_addr, "from_addr")
    msgid = _valid_msgid(message_id)
    if msgid is None or "@" not in msgid:
        raise ValueError(f"message_id must look like <id@host>, got {message_id!r}")
    if not isinstance(date, datetime):
        raise ValueError(f"date must be a datetime, got {date!r}")

    in_reply_to = _valid_msgid(out.in_reply_to)
    references = _thread_references(out.references, in_reply_to)
    subject = _cut(_header_safe(out.subject), HEADER_TEXT_LIMIT)

    msg = EmailMessage(policy=_POLICY)
    msg["Date"] = format_datetime(date)
    msg["From"] = Address(display_name=_header_safe(out.from_name or from_name),
                          addr_spec=sender)
    msg["Reply-To"] = Address(addr_spec=sender)
    msg["To"] = Address(addr_spec=to)
    cc = [_check_address(a, "cc") for a in out.cc]
    # Folded here and stored verbatim: the email package's own folding may leave the
    # first line empty ("Subject:" CRLF " text"), which its parser then reads back with a
    # leading space; keep the text on the header line instead.
    msg.set_raw("Subject", _fold_header("Subject", subject))
    # Message-IDs too: the email package would turn an id longer than a line into
    # RFC 2047 encoded words, which no mail client matches against its threads.
    msg.set_raw("Message-ID", _fold_header("Message-ID", msgid))
    expected = ["Date", "From", "Reply-To", "To", "Subject", "Message-ID"]
    if cc:
        msg["Cc"] = [Address(addr_spec=a) for a in cc]
        expected.append("Cc")
    if in_reply_to:
        msg.set_raw("In-Reply-To", _fold_header("In-Reply-To", in_reply_to))
        expected.append("In-Reply-To")
    if references:
        msg.set_raw("References", _fold_header("References", " ".join(references)))
        expected.append("References")
    if out.auto:
        if out.auto_submitted not in ("auto-replied", "auto-generated"):
            raise ValueError(f"Auto-Submitted must be auto-replied or auto-generated, "
                             f"got {out.auto_submitted!r}")
        msg["Auto-Submitted"] = out.auto_submitted
        msg["X-Auto-Response-Suppress"] = "All"
        expected += ["Auto-Submitted", "X-Auto-Response-Suppress"]
    if out.urgent:
        msg["Importance"] = "high"
        msg["X-Priority"] = "1"
        expected += ["Importance", "X-Priority"]

    body = _body_text(out.body)
    if not body.endswith("\n"):
        body += "\n"
    # Quoted-printable: 7-bit clean for any relay, and lines stay under 78 octets however
    # long a line of the body is (a staff reply may paste a 3000-character log line).
    msg.set_content(body, subtype="plain", charset="utf-8", cte="quoted-printable")
    expected += ["MIME-Version", "Content-Type", "Content-Transfer-Encoding"]
    for attachment in out.attachments:
        maintype, subtype = _content_type(attachment.content_type)
        msg.add_attachment(
            bytes(attachment.data), maintype=maintype, subtype=subtype,
            filename=clean_filename(attachment.filename),
        )
    for part in msg.iter_parts():
        del part["MIME-Version"]  # the email package adds it to parts too; only top level

    raw = msg.as_bytes(policy=_GENERATE_POLICY)
    _verify(raw, expected, out.attachments)
    return raw


def _q_encode(char: str) -> str:
    if char == " ":
        return "_"
    return "".join(chr(b) if b in _Q_SAFE else f"={b:02X}" for b in char.encode("utf-8"))


def _fold_header(name: str, value: str) -> str:
    """`value` (one clean line, single spaces) as a folded header value.

    ASCII words stay as they are; each run of non-ASCII words becomes RFC 2047 Q-encoded
    words (split on character boundaries, spaces inside encoded as "_"). Lines are kept
    within 78 octets except where one ASCII word is longer. We fold ourselves because the
    email package's folder (3.11) may leave the first line empty, double the space it
    breaks at, drop the space between two encoded words, or encode a long Message-ID,
    and each of these changes what the reader sees.
    """
    lines: list[str] = []
    line = ""
    room = 78 - len(name) - 2  # the first line starts with "Name: "
    min_ew = len(_EW_OPEN) + 12 + len(_EW_CLOSE)  # one 4-byte character

    def append(atom: str) -> None:
        nonlocal line
        line = f"{line} {atom}" if line else atom

    def new_line() -> None:
        nonlocal line, room
        lines.append(line)
        line, room = "", 77  # continuation lines start with one space

    for is_ascii, group in groupby(value.split(" "), key=str.isascii):
        if is_ascii:
            for word in group:
                if line and len(line) + 1 + len(word) > room:
                    new_line()
                append(word)
            continue
        chars = list(" ".join(group))
        i = 0
        while i < len(chars):
            limit = min(75, room - len(line) - (1 if line else 0))
            if line and limit < min_ew:
                new_line()
                continue
            limit = max(limit, min_ew)
            payload = ""
            while i < len(chars):
                encoded = _q_encode(chars[i])
                if len(_EW_OPEN) + len(payload) + len(encoded) + len(_EW_CLOSE) > limit:
                    break
                payload += encoded
                i += 1
            append(_EW_OPEN + payload + _EW_CLOSE)
    lines.append(line)
    return "\r\n ".join(lines)


def _verify(raw: bytes, expected: list[str], attachments: tuple[Any, ...]) -> None:
    """Defence in depth: the header block holds exactly the headers we set, CRLF only."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    parsed = BytesHeaderParser(policy=email.policy.compat32).parsebytes(head + b"\r\n\r\n")
    names = sorted(k.lower() for k in parsed.keys())
    want = sorted(k.lower() for k in expected)
    if attachments:
        want = sorted(k for k in want if k != "content-transfer-encoding")
    if names != want:
        raise ValueError(f"refusing to compose: unexpected header set {names}")
    if raw.count(b"\n") != raw.count(b"\r\n") or raw.count(b"\r") != raw.count(b"\r\n"):
        raise ValueError("refusing to compose: bare CR or LF in output")
    if any(len(line) > 998 for line in raw.split(b"\r\n")):
        raise ValueError("refusing to compose: line longer than 998 octets")
