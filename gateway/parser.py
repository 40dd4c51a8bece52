"""Raw message bytes -> `Report`. Pure: no I/O, no clock, no configuration; never raises.

The stages: `parse_mime` splits the message into parts (bounded), this module walks the
parts (body text, attachments, forwarded messages, DSN parts), `parse_text` separates the
new text from quoted history, `parse_fields` reads the procedure's fields from it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from email.message import Message
from functools import partial
from typing import TypeVar

from gateway.model import TICKET_REF, Attachment, Fields, Report, missing_fields
from gateway.parse_attached import MAX_FORMS, form_kind, form_text
from gateway.parse_charset import decode_text
from gateway.parse_fields import (
    build_fields,
    find_rating,
    labelled_fields,
    read_labels,
    second_report,
)
from gateway.parse_headers import (
    DAEMON_LOCAL_PARTS,
    auto_reasons,
    decode_words,
    first_value,
    header_text,
    message_ids,
    one_line,
    parse_addresses,
    parse_date,
    raw_values,
    unique,
)
from gateway.parse_html import MAX_LAYOUT_ELEMENTS, html_to_text
from gateway.parse_mime import (
    MAX_PART_HEADER,
    Part,
    decode_body,
    essential_block,
    parse_header_block,
    parse_tree,
)
from gateway.parse_text import (
    extract_uuencoded,
    fold,
    line_breaks,
    normalize_text,
    read_forwarded,
    split_quoted,
    unflow,
)
from gateway.parse_tnef import unpack_tnef

log = logging.getLogger(__name__)

# Text read from all text parts of one mail together: bytes decoded, then lines. The raw mail
# (in the store) keeps the rest; a report is a few dozen lines, and reading text is linear
# but not free (a few µs a line).
TEXT_LIMIT = 1024 * 1024
MAX_LINES = 20_000
MAX_FILENAME = 255

_LOG_SUFFIXES = (".log", ".txt", ".gz", ".zip", ".tar", ".tgz", ".7z", ".bz2", ".xz",
                 ".tbz2", ".txz", ".rar")
_LOG_TYPES = frozenset({
    "text/plain", "text/x-log", "application/gzip", "application/x-gzip", "application/zip",
    "application/x-zip-compressed", "application/x-tar", "application/x-gtar",
    "application/x-compressed-tar", "application/x-7z-compressed", "application/x-bzip2",
    "application/x-xz", "application/x-rar-compressed", "application/vnd.rar",
})
# File name suffix <-> content type, for TNEF/uuencoded files and generated names. A table
# of our own: `mimetypes` reads the system's files on first use (I/O in a pure stage).
_TYPES_BY_SUFFIX = {
    ".txt": "text/plain", ".log": "text/plain", ".csv": "text/csv", ".html": "text/html",
    ".htm": "text/html", ".pdf": "application/pdf", ".zip": "application/zip",
    ".gz": "application/gzip", ".tgz": "application/gzip", ".tar": "application/x-tar",
    ".7z": "application/x-7z-compressed", ".bz2": "application/x-bzip2",
    ".xz": "application/x-xz", ".png": "image/png", ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg", ".gif": "image/gif", ".eml": "message/rfc822",
    ".xml": "application/xml", ".json": "application/json", ".asc": "application/pgp-signature",
}
_SUFFIX_BY_TYPE = {
    "text/plain": ".txt", "text/html": ".html", "image/png": ".png", "image/jpeg": ".jpg",
    "image/gif": ".gif", "application/pdf": ".pdf", "application/zip": ".zip",
    "application/gzip": ".gz", "message/rfc822": ".eml", "message/delivery-status": ".txt",
    "text/rfc822-headers": ".txt", "application/pgp-signature": ".asc",
}
_FORWARD_SUBJECT = re.compile(r"^\s*(?:\[[^\]]*\]\s*)?(?:fwd?|pd|tr|wg|przekaz\w*)\s*:")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_RETURNED_ID = re.compile(r"^[ \t>]*message-id:[ \t]*(<[^<>\s]+>)", re.I | re.M)


@dataclass(slots=True)
class _File:
    name: str
    content_type: str
    data: bytes


@dataclass(slots=True)
class _Body:
    """What one message (the mail itself, or a message inside it) carries."""

    headers: Message
    texts: list[str] = field(default_factory=list)
    tnef_texts: list[str] = field(default_factory=list)
    forwards: list[_Body] = field(default_factory=list)
    returned: list[Message] = field(default_factory=list)  # text/rfc822-headers of a DSN
    has_dsn: bool = False

    @property
    def text(self) -> str:
        text = "\n\n".join(t.strip("\n") for t in self.texts if t.strip())
        return text or "\n\n".join(t for t in self.tnef_texts if t.strip())


def _type_for(name: str) -> str:
    lowered = name.lower()
    suffix = lowered[lowered.rfind("."):] if "." in lowered else ""
    return _TYPES_BY_SUFFIX.get(suffix, "application/octet-stream")


def _contains(part: Part, content_type: str) -> bool:
    if part.content_type == content_type:
        return True
    return any(_contains(c, content_type) for c in part.children
               if c.content_type.startswith("multipart/"))


def _preferred(children: list[Part]) -> Part | None:
    """The alternative we read: plain text first, then HTML, else the last one."""
    for wanted in ("text/plain", "text/html"):
        for child in children:
            if _contains(child, wanted):
                return child
    return children[-1] if children else None


class _Collector:
    """Walks the part tree once: texts per message, attachments for the whole mail."""

    def __init__(self, notes: list[str]) -> None:
        self.notes = notes
        self.files: list[_File] = []
        self.text_bytes = TEXT_LIMIT  # left for all text parts together
        self.text_lines = MAX_LINES
        self.html_elements = MAX_LAYOUT_ELEMENTS

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def message(self, part: Part) -> _Body:
        body = _Body(part.headers)
        self._walk(part, body, True)
        return body

    def _walk(self, part: Part, body: _Body, in_text: bool) -> None:
        ctype = part.content_type
        if ctype.startswith("multipart/"):
            chosen = None
            if ctype == "multipart/alternative":
                chosen = _preferred(part.children)
            elif ctype == "multipart/related" and part.children:
                chosen = part.children[0]
            for child in part.children:
                self._walk(child, body, in_text and (chosen is None or child is chosen))
        elif ctype in ("message/rfc822", "message/global"):
            if part.children:
                body.forwards.append(self.message(part.children[0]))
            else:  # not descended (depth limit): keep the message whole
                self.files.append(_File("", "message/rfc822", decode_body(part)))
        else:
            try:
                self._leaf(part, body, in_text)
            except Exception:  # one unreadable part must not cost the rest of the mail
                log.exception("part %s not read", part.content_type)
                self.note(f"a {part.content_type} part could not be read: kept as is")
                self.files.append(_File("", part.content_type, part.buf[part.start : part.end]))

    def _leaf(self, part: Part, body: _Body, in_text: bool) -> None:
        name = _filename(part)
        ctype = part.content_type
        if ctype in ("text/plain", "text/html") and not name and part.disposition != "attachment":
            if in_text:
                body.texts.append(self._text(part))
            return
        data = decode_body(part)
        is_tnef = ctype == "application/ms-tnef" or name.lower() == "winmail.dat"
        if is_tnef and self._tnef(data, body):
            return
        if ctype in ("text/rfc822-headers", "message/rfc822-headers"):
            body.returned.append(parse_header_block(data[:MAX_PART_HEADER]))
        if ctype == "message/delivery-status":
            body.has_dsn = True
        self.files.append(_File(name, ctype, data))

    def _text(self, part: Part) -> str:
        if self.text_bytes <= 0 or self.text_lines <= 0:
            self.note("text of later parts not read")
            return ""
        data = decode_body(part)
        if len(data) > self.text_bytes:
            self.note(f"text cut at {TEXT_LIMIT // 1024} KiB")
            data = data[: self.text_bytes]
        self.text_bytes -= len(data)
        text, charset_note = decode_text(data, part.param("charset"))
        if charset_note:
            self.note(charset_note)
        if part.content_type == "text/html":
            text = self._html(text)
        else:
            text = line_breaks(text)
            if (part.param("format") or "").lower() == "flowed":
                text = unflow(text, (part.param("delsp") or "").lower() == "yes")
            text, files = extract_uuencoded(text)
            self.files += [_File(n, _type_for(n), d) for n, d in files]
        return self._count_lines(normalize_text(text))

    def _html(self, html: str) -> str:
        text, laid_out = html_to_text(html, self.html_elements)
        self.html_elements -= laid_out
        return text

    def _count_lines(self, text: str) -> str:
        lines = text.count("\n") + 1
        if lines > self.text_lines:
            self.note(f"text cut at {MAX_LINES} lines")
            text = "\n".join(text.split("\n", self.text_lines)[: self.text_lines])
        self.text_lines -= min(lines, self.text_lines)
        return text

    def _tnef(self, data: bytes, body: _Body) -> bool:
        content = unpack_tnef(data)
        if content is None or not (content.files or content.text.strip() or content.html.strip()):
            self.note("winmail.dat could not be unpacked: kept as attachment")
            return False
        if content.rtf_only:
            self.note("winmail.dat: RTF body not read")
        text = content.text or (self._html(content.html) if content.html else "")
        if text.strip():
            body.tnef_texts.append(normalize_text(text))
        self.files += [_File(f.name, _type_for(f.name), f.data) for f in content.files]
        return True


def _filename(part: Part) -> str:
    name = part.param("filename", "content-disposition") or part.param("name")
    return one_line(decode_words(name))[:MAX_FILENAME] if name else ""


def _attachments(files: list[_File]) -> tuple[Attachment, ...]:
    out = []
    for n, item in enumerate(files, 1):
        ctype = item.content_type.lower()
        name = one_line(item.name)[:MAX_FILENAME] or f"attachment-{n}{_SUFFIX_BY_TYPE.get(ctype, '.bin')}"
        lowered = name.lower()
        out.append(Attachment(
            filename=name,
            content_type=ctype,
            size=len(item.data),
            sha256=hashlib.sha256(item.data).hexdigest(),
            is_log=lowered.endswith(_LOG_SUFFIXES) or ctype in _LOG_TYPES,
            data=item.data,
        ))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _Source:
    """A forwarded message the fields may be read from, and whom its fallbacks name."""

    text: str
    headers: Message | None = None  # a message/rfc822 part: From is read when chosen
    name: str = ""
    addr: str = ""

    def sender(self) -> tuple[str, str]:
        if self.headers is None:
            return self.name, self.addr
        pairs = parse_addresses(raw_values(self.headers, "from"))
        return pairs[0] if pairs else ("", "")


def _forwarded_sources(body: _Body, history: str, kind: str, subject: str) -> list[_Source]:
    sources = [_Source(split_quoted(inner.text).new, inner.headers) for inner in body.forwards]
    if kind == "forward" or (kind in ("header", "reply") and _FORWARD_SUBJECT.match(fold(subject))):
        try:
            inline = read_forwarded(history)
        except Exception:  # the inline forward is lost, not the mail's own fields
            log.exception("inline forward not read")
            return sources
        sources.append(_Source(inline.text, None, inline.from_name, inline.from_addr))
    return sources


def _read_fields(body: _Body, subject: str, sender: str, sender_name: str,
                 region: str, bounce: bool, notes: list[str]) -> tuple[str, Fields, frozenset[str]]:
    """The new text and its fields; a forwarded report is read from inside when the
    new text has no labelled fields of its own."""
    split = split_quoted(body.text)
    labelled = read_labels(split.new)
    second = second_report(labelled)
    if second:
        notes.append(second)
    if not labelled.found and not bounce:
        sources = _forwarded_sources(body, split.history, split.kind, subject)
        chosen = next((s for s in sources if read_labels(s.text).found), None)
        if chosen is None and not split.new.strip() and sources:
            chosen = sources[0]
        if chosen is not None:
            text = "\n\n".join(t for t in (split.new.strip(), chosen.text) if t)
            name, addr = chosen.sender()
            inner = read_labels(chosen.text)
            fields = build_fields(inner, addr or sender, name or sender_name, region, subject)
            return text, fields, labelled_fields(inner, fields)
    fields = build_fields(labelled, sender, sender_name, region, subject)
    return split.new.strip(), fields, labelled_fields(labelled, fields)


def _with_forms(fields: Fields, labelled: frozenset[str], files: list[_File],
                who: tuple[str, str, str], notes: list[str]) -> tuple[Fields, frozenset[str]]:
    """Fields from filled-in forms attached as PDF or .docx, read like body text. They
    rank below what the body gave under a label and above the body's guesses (From name,
    signature, free text): the body wins, a form beats a guess."""
    sender, sender_name, region = who
    read = 0
    for item in files:
        if read >= MAX_FORMS or form_kind(item.name, item.content_type) is None:
            continue
        read += 1
        text = form_text(item.name, item.content_type, item.data)
        if not text:
            continue
        inner = read_labels(normalize_text(line_breaks(text)))
        if not inner.found:
            continue
        form = build_fields(inner, sender, sender_name, region)
        updates = {name: getattr(form, name) for name in labelled_fields(inner, form)
                   if name not in labelled}
        if updates:
            fields = replace(fields, **updates)
            labelled = labelled | frozenset(updates)
            notes.append(f"fields read from attachment {item.name or item.content_type}: "
                         + ", ".join(sorted(updates)))
    return fields, labelled


def _bounced_ids(body: _Body, own_id: str) -> tuple[str, ...]:
    found: list[str] = []
    for headers in [b.headers for b in body.forwards] + body.returned:
        found += message_ids(first_value(headers, "message-id"), single=True)
    if not found:  # text-only bounces quote the headers inline
        found = _RETURNED_ID.findall("\n".join(body.texts))
    return unique([i for i in found if i != own_id])


def _empty_report(notes: tuple[str, ...], reasons: tuple[str, ...] = ()) -> Report:
    fields = Fields()
    return Report(
        message_id="", in_reply_to=(), references=(), sender="", sender_name="", reply_to="",
        to=(), cc=(), subject="", date=None, text="", fields=fields,
        missing=missing_fields(fields), attachments=(), ticket_refs=(), auto_reasons=reasons,
        bounced_ids=(), rating=None, notes=notes,
    )


_T = TypeVar("_T")


def _guarded(notes: list[str], what: str, default: _T, func: Callable[..., _T], *args: object) -> _T:
    """func(*args), or `default` with a note when it raises: one bad header (a Date that
    breaks dateutil, a From nested 600 deep) loses only its own value."""
    try:
        return func(*args)
    except Exception as exc:
        log.warning("%s not read: %r", what, exc)
        notes.append(f"{what} could not be read ({type(exc).__name__})")
        return default


def _first_address(headers: Message, name: str) -> tuple[str, str]:
    pairs = parse_addresses(raw_values(headers, name))
    return pairs[0] if pairs else ("", "")


def _address_list(headers: Message, name: str) -> tuple[str, ...]:
    return unique([a for _, a in parse_addresses(raw_values(headers, name))])


def _message_id(headers: Message) -> str:
    return next(iter(message_ids(first_value(headers, "message-id"), single=True)), "")


def _parse(raw: bytes, region: str) -> Report:
    notes: list[str] = []
    head = raw[:65536]
    if b"\n" not in head and b"\r" in head:  # old Mac line ends
        raw = raw.replace(b"\r", b"\n")
    root = parse_tree(raw, notes)
    if root is None:
        return _empty_report(tuple(notes))
    headers = root.headers
    guard = partial(_guarded, notes)
    sender_name, sender = guard("header From", ("", ""), _first_address, headers, "from")
    collector = _Collector(notes)
    body = collector.message(root)
    subject = guard("header Subject", "", header_text, headers, "subject")
    message_id = guard("header Message-ID", "", _message_id, headers)
    reasons: tuple[str, ...] = guard("loop markers", (), auto_reasons, headers, sender, root.declared_type,
                    body.has_dsn)
    bounce = ("dsn" in reasons or bool(body.returned)
              or sender.rpartition("@")[0] in DAEMON_LOCAL_PARTS)
    try:
        text, fields, labelled = _read_fields(body, subject, sender, sender_name, region, bounce,
                                              notes)
    except Exception:  # keep headers and attachments even if the text defeats us
        log.exception("fields not read")
        notes.append("text could not be read")
        text, fields = "", Fields(reporter_name=sender_name or None, reporter_email=sender or None)
        labelled = frozenset()
    if not bounce:
        fields, labelled = guard("attached forms", (fields, labelled), _with_forms, fields,
                                 labelled, collector.files, (sender, sender_name, region), notes)
    reply_to = guard("header Reply-To", ("", ""), _first_address, headers, "reply-to")[1]

    return Report(
        message_id=message_id,
        in_reply_to=guard("header In-Reply-To", (), lambda: message_ids(first_value(headers, "in-reply-to"))),
        references=guard("header References", (),
                         lambda: message_ids(" ".join(raw_values(headers, "references")))),
        sender=sender,
        sender_name=sender_name,
        reply_to=reply_to,
        to=guard("header To", (), _address_list, headers, "to"),
        cc=guard("header Cc", (), _address_list, headers, "cc"),
        subject=subject,
        date=guard("header Date", None, parse_date, first_value(headers, "date")),
        text=text,
        fields=fields,
        missing=missing_fields(fields),
        attachments=_attachments(collector.files),
        ticket_refs=tuple(int(m.group(1)) for m in TICKET_REF.finditer(subject)),
        auto_reasons=reasons,
        bounced_ids=guard("bounced message ids", (), _bounced_ids, body, message_id) if bounce else (),
        rating=guard("rating", None, find_rating, text),
        notes=tuple(notes),
        labelled=labelled,
    )


def _loop_markers_only(raw: bytes) -> tuple[str, ...]:
    """After a parser bug: the loop markers alone, from a scan of the header section, so
    a broken auto-reply is still never answered."""
    try:
        blank = _BLANK_LINE.search(raw)
        headers = parse_header_block(essential_block(raw[: blank.start() if blank else len(raw)]))
        sender = _first_address(headers, "from")[1]
        return auto_reasons(headers, sender, "", False)
    except Exception:
        log.exception("loop markers not read")
        return ()


def parse_report(raw: bytes, *, default_region: str = "PL") -> Report:
    """Read one raw RFC 5322 message. Never raises: what cannot be read is left empty and
    named in `Report.notes` (the raw message itself stays in the store)."""
    try:
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        return _parse(bytes(raw), default_region or "PL")
    except Exception as exc:  # a parser bug must not lose the mail: report and go on
        log.exception("parser failed")
        return _empty_report((f"parser failed: {type(exc).__name__}",), _loop_markers_only(raw))
