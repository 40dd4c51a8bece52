"""Header values of one message: decoded text, addresses, Message-IDs, date, auto-mail marks.

Values come from a `compat32` Message (`raw_items`: as sent, raw 8-bit already decoded by
`parse_mime.parse_header_block`); RFC 2047 encoded words are decoded here; addresses go
through `policy.default`'s parser, with `email.utils.getaddresses` when that one gives up.
"""

from __future__ import annotations

import binascii
import re
from datetime import UTC, datetime
from email import policy
from email.message import Message
from dateutil import parser as dateutil_parser
from email.utils import getaddresses, parsedate_to_datetime

from gateway.parse_charset import decode_text, no_surrogates, repair_surrogates

# RFC 2047 encoded word; lenient: encoded text may hold blanks (broken encoders do that).
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?]*)\?=")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")
_MSGID = re.compile(r"<[^<>\s]+>")
# policy.default's address parser is quadratic in the value's length (8 KiB of quotes:
# 0.7 s), so only short values, and only the first few of a header, go to it; the rest to
# `getaddresses`, which is linear enough. A spam run can carry thousands of To: lines.
_MAX_STRICT_ADDRESS = 2 * 1024
_MAX_STRICT_VALUES = 2
_MAX_ADDRESS_HEADERS = 50
_MAX_ADDRESS_CHARS = 64 * 1024
_BARE_ADDRESS = re.compile(r"(?<![^\s<>(),;:\"])[^\s<>(),;:\"]+@[^\s<>(),;:\"]+")

AUTO_SUBMITTED_KINDS = frozenset({"auto-generated", "auto-replied", "auto-notified"})
AUTOREPLY_HEADERS = ("x-autoreply", "x-autorespond", "x-autoresponder")
DAEMON_LOCAL_PARTS = frozenset({"mailer-daemon", "postmaster"})


def raw_values(headers: Message, name: str) -> list[str]:
    """Every value of header `name` (any case), unfolded, as sent."""
    name = name.lower()
    return [_FOLD.sub("", str(v)) for k, v in headers.raw_items() if k.strip().lower() == name]


def first_value(headers: Message, name: str) -> str | None:
    values = raw_values(headers, name)
    return values[0] if values else None


def _decode_word(charset: str, kind: str, text: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    if kind in "qQ":
        return binascii.a2b_qp(data, header=True)
    clean = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    clean = clean[: len(clean) - len(clean) % 4] if len(clean) % 4 == 1 else clean
    try:
        return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))
    except (binascii.Error, ValueError):
        return b""


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words; adjacent words of one charset are joined as bytes
    first, so a character split across two words (or an ISO-2022-JP run) survives."""
    if "=?" not in value:
        return value
    out: list[str] = []
    run = bytearray()
    run_charset = ""
    pos = 0

    def flush() -> None:
        nonlocal run, run_charset
        if run:
            out.append(decode_text(bytes(run), run_charset or None)[0])
        run, run_charset = bytearray(), ""

    for match in _ENCODED_WORD.finditer(value):
        gap = value[pos : match.start()]
        # Blanks between two encoded words are folding, not text (RFC 2047 §6.2).
        if gap and not (gap.isspace() and pos > 0 and run):
            flush()
            out.append(gap)
        charset = match.group(1).split("*", 1)[0].lower()  # RFC 2231 language suffix
        data = _decode_word(charset, match.group(2), match.group(3))
        if run and charset != run_charset:
            flush()
        run += data
        run_charset = charset
        pos = match.end()
    flush()
    out.append(value[pos:])
    return "".join(out)


def one_line(value: str) -> str:
    return no_surrogates(_CONTROLS.sub(" ", value)).strip()


def header_text(headers: Message, name: str) -> str:
    """A text header (Subject...) decoded and on one line; "" when absent."""
    value = first_value(headers, name)
    if value is None:
        return ""
    return one_line(decode_words(value))


def _strict_addresses(text: str) -> list[tuple[str, str]]:
    header = policy.default.header_factory("to", text)
    # An encoded word in a charset the stdlib cannot use ("=?utf-7?b?...?=" holding
    # UTF-8) comes back as surrogate-escaped bytes: read those bytes as we read any.
    return [(repair_surrogates(a.display_name or ""), a.addr_spec or "") for a in header.addresses]


def _drop_comments(text: str) -> str:
    """Text without (comments): both stdlib address parsers recurse once per nesting level."""
    out, depth, escaped = [], 0, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "(":
            depth += 1
            continue
        elif ch == ")" and depth:
            depth -= 1
            continue
        if not depth:
            out.append(ch)
    return "".join(out)


def _loose_addresses(text: str) -> list[tuple[str, str]]:
    try:
        return [(decode_words(n), a) for n, a in getaddresses([text])]
    except Exception:  # last resort: anything shaped like an address
        return [("", a) for a in _BARE_ADDRESS.findall(text)]


# One mailbox in the shapes clients and scripts really write, strict parsers lose a part of:
# `Kowalski, Jan <a@b>` (unquoted comma), `a@b (Jan Kowalski)`, `Jan <a@b.>` (trailing
# dot), `Jan <mailto:a@b>`, `Jan [a@b]`, `"Jan Kowalski" a@b` (no brackets).
_ADDR = r"(?:mailto:)?(?P<addr>[^\s<>()\[\]\"@,;]+@[^\s<>()\[\]\"@,;]+?)\.?"
_MAILBOX_SHAPES = (
    re.compile(r"^\s*(?P<name>[^<>@]*?)\s*[<\[]\s*" + _ADDR + r"\s*[>\]]+\s*$"),
    re.compile(r"^\s*[<]?" + _ADDR + r"[>]?\s*\((?P<name>[^()@]*)\)\s*$"),
    re.compile(r"^\s*(?P<name>[^<>@()]*?)\s+" + _ADDR + r"\s*$"),
    re.compile(r"^\s*<\s*" + _ADDR + r"\s*>\s*(?P<name>[^<>@()]+?)\s*$"),
    re.compile(r"^\s*" + _ADDR + r"\s*$"),
)


def _display_name(text: str) -> str:
    name = decode_words(text.strip())
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "\"'":
        name = name[1:-1]
    return one_line(name.replace('\\"', '"').replace("\\\\", "\\"))


def _one_mailbox(text: str) -> tuple[str, str] | None:
    """(name, addr) when `text` is a single mailbox in one of the shapes above."""
    if text.count("@") != 1 or len(text) > 1000 or text.count("(") > 10:
        return None
    for shape in _MAILBOX_SHAPES:
        match = shape.match(text)
        if match:
            groups = match.groupdict()
            return _display_name(groups.get("name") or ""), match.group("addr")
    return None


def _clean_addr(addr: str) -> str:
    addr = addr.strip().lower()
    if addr.startswith("mailto:"):
        addr = addr[len("mailto:"):]
    return addr.rstrip(".")


def parse_addresses(values: list[str]) -> list[tuple[str, str]]:
    """(display name, addr-spec lower-cased) of each mailbox; groups flattened, junk dropped."""
    pairs: list[tuple[str, str]] = []
    for n, value in enumerate(values[:_MAX_ADDRESS_HEADERS]):
        text = value[:_MAX_ADDRESS_CHARS]
        single = _one_mailbox(text)
        if single is not None:
            found = [single]
        else:
            if text.count("(") > 10:
                text = _drop_comments(text)
            try:
                if len(text) > _MAX_STRICT_ADDRESS or n >= _MAX_STRICT_VALUES:
                    raise ValueError("use the simple parser")
                found = _strict_addresses(text)
            except Exception:  # policy.default gives up on some broken headers
                found = _loose_addresses(text)
        before = len(pairs)
        for name, addr in found:
            addr = _clean_addr(addr)
            if "@" in addr and not any(ch.isspace() for ch in addr):
                pairs.append((one_line(name), addr))
        if len(pairs) == before and "@" in value:  # salvage: anything shaped like an address
            pairs += [("", _clean_addr(a)) for a in _BARE_ADDRESS.findall(value[:_MAX_ADDRESS_CHARS])]
    return pairs


def unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def message_ids(value: str | None, *, single: bool = False) -> tuple[str, ...]:
    """`<...>` tokens of a Message-ID / In-Reply-To / References value."""
    if not value:
        return ()
    found = _MSGID.findall(value)
    if not found:
        # Some clients drop the brackets; keep what still looks like an id.
        found = [f"<{t.strip('<>')}>" for t in value.split() if "@" in t]
    return tuple(found[:1]) if single else unique(found)


def parse_date(value: str | None) -> datetime | None:
    """The Date header as an aware datetime (UTC when no zone is given); None if impossible."""
    if not value:
        return None
    text = one_line(value)[:200]
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        # Webmails and scripts write odd dates ("2026-11-25 15:29", "25.11.2026 15:29").
        try:
            parsed = dateutil_parser.parse(text, dayfirst=True, fuzzy=True)
        except Exception:  # noqa: BLE001 - dateutil also raises decimal.InvalidOperation ("1:" + 29 digits)
            return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def auto_reasons(headers: Message, sender: str, content_type: str, has_dsn_part: bool) -> tuple[str, ...]:
    """Why the mail looks machine-generated, from its headers (RFC 3834 and practice)."""
    reasons: list[str] = []
    submitted = first_value(headers, "auto-submitted")
    if submitted is not None:
        kind = submitted.split(";", 1)[0].split("(", 1)[0].strip().lower()
        if kind != "no":
            reasons.append(f"auto-submitted:{kind}" if kind in AUTO_SUBMITTED_KINDS else "auto-submitted")
    precedence = (first_value(headers, "precedence") or "").strip().lower()
    if precedence in ("bulk", "junk", "list", "auto_reply"):
        reasons.append(f"precedence:{precedence}")
    if first_value(headers, "list-id") is not None:
        reasons.append("list-id")
    reasons += [name for name in AUTOREPLY_HEADERS if first_value(headers, name) is not None]
    local = sender.rpartition("@")[0]
    if local in DAEMON_LOCAL_PARTS:
        reasons.append(local)
    if content_type in ("multipart/report", "message/delivery-status") or has_dsn_part:
        reasons.append("dsn")
    if first_value(headers, "x-loop") is not None:
        reasons.append("x-loop")
    if first_value(headers, "x-autogenerated") is not None:
        reasons.append("x-autogenerated")
    if AUTOREPLY_SUBJECT.match(header_text(headers, "subject")):
        reasons.append("auto-reply subject")
    return tuple(reasons)


# Out-of-office and helpdesk robots that set no header at all still say so in the
# subject (Outlook, Exchange, Gmail, common Polish helpdesks).
AUTOREPLY_SUBJECT = re.compile(
    r"^\s*(automatyczna odpowied[zź]|odpowied[zź] automatyczna|automatic reply|auto-?reply|"
    r"autoreply|out of (the )?office|nieobecno[sś][cć] w biurze|poza biurem|"
    r"abwesenheitsnotiz|automatische antwort)\b", re.IGNORECASE)
