"""The outgoing mail: `Outgoing` -> RFC 5322 bytes, and the header texts it carries.

Pure: takes values (the addresses, the Message-ID and the date are passed in) and
returns bytes; no clock, no configuration, no disk. Everything that came from a
customer is cleaned here before it reaches a header: `clean_header_text` (one line,
no controls), `reply_subject` ("[#123456] <subject>"), `clean_filename`, and the
Message-IDs of the thread. The texts of the mails come from `gateway.texts`.
"""

from __future__ import annotations

import email.policy
import re
import unicodedata
from collections.abc import Iterable
from datetime import datetime
from email import quoprimime
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from itertools import groupby
from typing import Any

from gateway.model import TICKET_REF, Outgoing

__all__ = [
    "DEFAULT_SUBJECT",
    "SUBJECT_LIMIT",
    "body_text",
    "check_number",
    "clean_filename",
    "clean_header_text",
    "compose_message",
    "cut_text",
    "reply_subject",
]

# The subject of a reply to a mail without one, per language.
DEFAULT_SUBJECT = {"pl": "Zgłoszenie serwisowe", "en": "Service request"}
SUBJECT_LIMIT = 200  # reply_subject default
HEADER_TEXT_LIMIT = 400  # hard cap for Subject in compose_message
FILENAME_LIMIT = 120
MAX_REFERENCES = 10
MAX_MSGID_LEN = 250


# --------------------------------------------------------------------------- header text

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


def cut_text(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, ending in "…" when cut."""
    if len(text) <= limit:
        return text
    head = text[: max(limit - 1, 0)]
    # Never separate a base character from its combining marks.
    while head and unicodedata.combining(text[len(head)]):
        head = head[:-1]
    return head.rstrip() + "…"


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
            name = cut_text(stem, FILENAME_LIMIT - len(ext) - 1) + "." + ext
        else:
            name = cut_text(name, FILENAME_LIMIT)
    return name


def body_text(value: object) -> str:
    """Multi-line text: newlines normalised, lone surrogates replaced, NUL removed."""
    if value is None:
        return ""
    text = str(value).replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return text.encode("utf-8", "replace").decode("utf-8")


# --------------------------------------------------------------------------- subjects


def check_number(number: object) -> int:
    if isinstance(number, bool) or not isinstance(number, int | str):
        raise ValueError(f"ticket number must be an int, got {number!r}")
    if isinstance(number, str):
        if not re.fullmatch(r"#?[0-9]{6}", number, re.ASCII):
            raise ValueError(f"ticket number must be six digits, got {number!r}")
        number = int(number.lstrip("#"))
    if not 0 <= number <= 999_999:
        raise ValueError(f"ticket number out of range: {number!r}")
    return number


def reply_subject(
    number: int | None, original_subject: str, *, max_len: int = SUBJECT_LIMIT,
    language: str = "pl",
) -> str:
    """`[#123456] <original subject>` on one line, safe for a header, at most `max_len`.

    The original is decoded (RFC 2047) and cleaned (`clean_header_text`). When it already
    carries `#123456` it is kept as is; when it is empty the language's default subject
    is used. `number` None gives just the cleaned subject.
    """
    if language not in DEFAULT_SUBJECT:
        raise ValueError(f"language must be one of {', '.join(DEFAULT_SUBJECT)}, got {language!r}")
    if max_len < 30:
        raise ValueError(f"max_len too small: {max_len}")
    text = _header_safe(original_subject) or DEFAULT_SUBJECT[language]
    if number is None:
        return cut_text(text, max_len)
    digits = f"{check_number(number):06d}"
    kept = cut_text(text, max_len)
    if any(m.group(1) == digits for m in TICKET_REF.finditer(kept)):
        return kept
    prefix = f"[#{digits}] "
    return prefix + cut_text(text, max_len - len(prefix))


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
    return _compose(out, from_addr=from_addr, message_id=message_id, date=date,
                    from_name=from_name, fast=True)


def _compose(
    out: Outgoing, *, from_addr: str, message_id: str, date: datetime, from_name: str,
    fast: bool,
) -> bytes:
    """`compose_message`; `fast=False` always uses EmailMessage (tests compare the two)."""
    to = _check_address(out.to, "to")
    sender = _check_address(from_addr, "from_addr")
    msgid = _valid_msgid(message_id)
    if msgid is None or "@" not in msgid:
        raise ValueError(f"message_id must look like <id@host>, got {message_id!r}")
    if not isinstance(date, datetime):
        raise ValueError(f"date must be a datetime, got {date!r}")

    in_reply_to = _valid_msgid(out.in_reply_to)
    references = _thread_references(out.references, in_reply_to)
    subject = cut_text(_header_safe(out.subject), HEADER_TEXT_LIMIT)
    display = _header_safe(out.from_name or from_name)

    # Fast path: EmailMessage (header registry, set_content, generator) costs 2-4 ms of
    # CPU per mail, the largest cost of a report after parsing. Without attachments and
    # with a display name that fits one encoded word, the same mail (same decoded headers
    # and body, tests/test_compose_fast.py) is written directly, ~8x cheaper
    # (bench/bench_compose.py).
    phrase = _phrase(display) if display else ""
    if fast and not out.attachments and phrase is not None:
        return _compose_plain(out, to=to, sender=sender, msgid=msgid, date=date,
                              in_reply_to=in_reply_to, references=references,
                              subject=subject, phrase=phrase)

    msg = EmailMessage(policy=_POLICY)
    msg["Date"] = format_datetime(date)
    if phrase is None:  # a long non-ASCII name: the email package's encoded words
        msg["From"] = Address(display_name=display, addr_spec=sender)
    else:  # our own phrase and folding, as the fast path writes it (see _phrase)
        msg.set_raw("From", _fold_header("From", f"{phrase} <{sender}>") if phrase else sender)
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

    body = body_text(out.body)
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


# RFC 5322 specials: an ASCII display name holding one is sent as a quoted-string.
_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')


def _phrase(name: str) -> str | None:
    """A clean display name as an RFC 5322 phrase: as it is, quoted, or one RFC 2047
    encoded word; None when it needs more (the email package then composes).

    An ASCII name is never left to the email package: EmailMessage (3.11) folds a long
    quoted name without its quotes, and a ":" in it then reads as a group ("end of
    header in group"). Ours stays quoted; a word longer than a line stays whole (a
    header line may be 998 octets)."""
    if name.isascii():
        if not _SPECIALS.search(name):
            return name
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    word = _EW_OPEN + "".join(map(_q_encode, name)) + _EW_CLOSE
    return word if len(word) <= 75 else None


def _fold_list(name: str, items: list[str]) -> str:
    """Addresses joined by ", ", a line break before one that would pass 78 octets."""
    lines: list[str] = []
    line = ""
    room = 78 - len(name) - 2
    for item in items:
        piece = line + ", " + item if line else item
        if line and len(piece) > room:
            lines.append(line + ",")
            line, room = item, 77
        else:
            line = piece
    lines.append(line)
    return "\r\n ".join(lines)


def _compose_plain(
    out: Outgoing, *, to: str, sender: str, msgid: str, date: datetime,
    in_reply_to: str | None, references: list[str], subject: str, phrase: str,
) -> bytes:
    """`compose_message` for a mail without attachments, written without EmailMessage:
    the same headers in the same order, the body quoted-printable as set_content does."""
    head = [
        "Date: " + format_datetime(date),
        "From: " + (_fold_header("From", f"{phrase} <{sender}>") if phrase else sender),
        "Reply-To: " + sender,
        "To: " + to,
    ]
    cc = [_check_address(a, "cc") for a in out.cc]
    head += [
        "Subject: " + _fold_header("Subject", subject),
        "Message-ID: " + _fold_header("Message-ID", msgid),
    ]
    expected = ["Date", "From", "Reply-To", "To", "Subject", "Message-ID"]
    if cc:
        head.append("Cc: " + _fold_list("Cc", cc))
        expected.append("Cc")
    if in_reply_to:
        head.append("In-Reply-To: " + _fold_header("In-Reply-To", in_reply_to))
        expected.append("In-Reply-To")
    if references:
        head.append("References: " + _fold_header("References", " ".join(references)))
        expected.append("References")
    if out.auto:
        if out.auto_submitted not in ("auto-replied", "auto-generated"):
            raise ValueError(f"Auto-Submitted must be auto-replied or auto-generated, "
                             f"got {out.auto_submitted!r}")
        head += ["Auto-Submitted: " + out.auto_submitted, "X-Auto-Response-Suppress: All"]
        expected += ["Auto-Submitted", "X-Auto-Response-Suppress"]
    if out.urgent:
        head += ["Importance: high", "X-Priority: 1"]
        expected += ["Importance", "X-Priority"]
    head += ['Content-Type: text/plain; charset="utf-8"',
             "Content-Transfer-Encoding: quoted-printable", "MIME-Version: 1.0"]
    expected += ["MIME-Version", "Content-Type", "Content-Transfer-Encoding"]
    body = body_text(out.body)
    if not body.endswith("\n"):
        body += "\n"
    # As email.contentmanager does for cte="quoted-printable" (lines of 78 octets).
    lines = body.encode("utf-8").splitlines()
    encoded = quoprimime.body_encode((b"\n".join(lines) + b"\n").decode("latin-1"), 78)
    raw = ("\r\n".join(head) + "\r\n\r\n" + encoded.replace("\n", "\r\n")).encode("ascii")
    _verify(raw, expected, ())
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
