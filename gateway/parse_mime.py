"""A bounded MIME splitter over the raw bytes.

Why not `email.parser`: its feed parser works line by line in Python, keeps every line as
an object and checks every line against every open boundary. A 30 MB message of short
lines takes 6 s there, one with many parts minutes, and deep nesting recurses until
RecursionError. Here boundaries are found with one C-speed regex search per multipart,
bodies stay offsets into the one raw buffer (no copies until a part is decoded), and depth,
part count and header bytes are capped. Each part's header block (small, capped) is still
parsed by the stdlib (`compat32`: it never raises on odd headers and keeps raw values).
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import decode_params, unquote

from gateway.parse_charset import decode_text, repair_surrogates

MAX_DEPTH = 20
MAX_PARTS = 500
MAX_TOP_HEADER = 256 * 1024
MAX_PART_HEADER = 64 * 1024
MAX_HEADER_TOTAL = 2 * 1024 * 1024  # header bytes of all parts together

# One header field (name, optional blanks, colon) and its folded continuation lines.
_HEADER_BLOCK = re.compile(
    rb"(?:[\x21-\x39\x3b-\x7e]+[ \t]*:[^\n]*(?:\n|\Z)(?:[ \t][^\n]*(?:\n|\Z))*)*"
)
_MBOX_FROM = re.compile(rb"From [^\n]*\n")
# "Name   : value" is legal in RFC 822's obsolete syntax; the stdlib would end the header
# section there, so the blanks go before it sees the block.
_BLANKS_BEFORE_COLON = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]+:", re.M)
_HEADER_PARSER = BytesHeaderParser(policy=compat32)


@dataclass(slots=True, eq=False)
class Part:
    """One MIME entity: its headers and where its body lies in `buf`."""

    headers: Message
    buf: bytes
    start: int
    end: int
    content_type: str  # as read: a multipart without usable boundary is text/plain
    depth: int
    children: list[Part] = field(default_factory=list)  # message/rfc822: [inner message]
    declared_type: str = ""  # as the header says
    params: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)  # by header

    def param(self, name: str, header: str = "content-type") -> str | None:
        """A parameter of Content-Type (or `header`); None if absent."""
        if header not in self.params:
            value = self.headers.get(header)
            self.params[header] = parse_params(str(value)) if value else {}
        return self.params[header].get(name)

    @property
    def cte(self) -> str:
        value = self.headers.get("content-transfer-encoding", "")
        return str(value).strip().lower()

    @property
    def disposition(self) -> str:
        value = str(self.headers.get("content-disposition", ""))
        return value.split(";", 1)[0].strip().lower()


@dataclass(slots=True)
class _Budget:
    notes: list[str]
    parts: int = 0
    header_bytes: int = 0

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


# One parameter of a Content-Type/-Disposition value: quoted strings (maybe unterminated)
# and escapes kept whole. compat32's own splitter is quadratic (250 KiB: a minute).
_PARAMETER = re.compile(r'(?:[^;"\\]|\\.?|"(?:[^"\\]|\\.)*"?)+', re.S)


def parse_params(value: str) -> dict[str, str]:
    """Parameters of a Content-Type or Content-Disposition value, names lower-cased,
    RFC 2231 continuations joined and decoded with their charset."""
    pairs = [("", "")]
    for item in _PARAMETER.findall(value.partition(";")[2]):
        name, sep, val = item.partition("=")
        if sep:
            pairs.append((name.strip().lower(), val.strip()))
    try:
        decoded = decode_params(pairs)
    except (TypeError, ValueError, LookupError):  # e.g. "name*" next to "name*0"
        decoded = pairs
    params: dict[str, str] = {}
    for name, val in decoded[1:]:
        if isinstance(val, tuple):  # RFC 2231: (charset, language, %-decoded octets)
            charset, _lang, text = val
            text = unquote(text)
            try:
                raw = text.encode("latin-1")
            except UnicodeEncodeError:
                raw = text.encode("utf-8", "surrogateescape")
            val = decode_text(raw, charset or "utf-8")[0]
        else:
            val = unquote(val)
        params.setdefault(name, val)
    return params


def _content_type(headers: Message, default: str) -> str:
    try:
        headers.set_default_type(default)
        return headers.get_content_type()
    except Exception:
        return default


def _read_headers(buf: bytes, start: int, end: int, limit: int, top: bool) -> tuple[int, int] | None:
    """(end of the header block, start of the body), or None when the block exceeds `limit`."""
    pos = start
    if top:
        mbox = _MBOX_FROM.match(buf, pos, min(end, pos + 1024))
        if mbox:
            pos = mbox.end()
    # The window reaches past the limit by more than a line, so a section cut inside a
    # field name still shows up as longer than the limit.
    match = _HEADER_BLOCK.match(buf, pos, min(end, pos + limit + 8192))
    header_end = match.end() if match else pos  # the pattern matches the empty string
    if header_end - pos > limit:
        return None
    if buf.startswith(b"\r\n", header_end, end):
        return header_end, header_end + 2
    if buf.startswith(b"\n", header_end, end):
        return header_end, header_end + 1
    return header_end, header_end  # no blank line: the body starts right away


def parse_header_block(block: bytes) -> Message:
    """The header fields of one part (compat32: raw values, never raises on odd ones).
    Raw 8-bit values are decoded here once (UTF-8, else cp1250/ISO-8859-2): left as the
    parser's surrogates, compat32 would turn them into Header objects that lose them."""
    try:
        msg = _HEADER_PARSER.parsebytes(_BLANKS_BEFORE_COLON.sub(rb"\1:", block))
    except Exception:
        return Message(policy=compat32)
    items = list(msg.raw_items())
    if not all(value.isascii() for _, value in items):
        for name in dict.fromkeys(name for name, _ in items):
            del msg[name]
        for name, value in items:
            msg[name] = repair_surrogates(value)
    return msg


def _delimiters(buf: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int, bool]]:
    """(line start, line end incl. EOL, is_close) of each delimiter line in buf[start:end]."""
    mark = b"--" + boundary.encode("utf-8", "surrogateescape")
    tail = rb"(--)?[ \t]*\r?(?:\n|\Z)"
    found = []
    first = re.compile(re.escape(mark) + tail).match(buf, start, end)
    if first:
        found.append((first.start(), first.end(), bool(first.group(1))))
    for m in re.compile(rb"\n" + re.escape(mark) + tail).finditer(buf, start, end):
        found.append((m.start() + 1, m.end(), bool(m.group(1))))
        if len(found) > MAX_PARTS + 1:
            break
    return found


def _split(buf: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int]] | None:
    """Body spans of the parts of a multipart body; None when no delimiter was found."""
    delims = _delimiters(buf, start, end, boundary)
    if not delims:
        return None
    spans = []
    for (_, body_start, close), nxt in zip(delims, [*delims[1:], None], strict=True):
        if close:
            break
        if nxt is None:
            spans.append((body_start, end))
            break
        part_end = nxt[0]
        # The line break before a delimiter belongs to the delimiter.
        if part_end > body_start and buf[part_end - 1 : part_end] == b"\n":
            part_end -= 1
            if part_end > body_start and buf[part_end - 1 : part_end] == b"\r":
                part_end -= 1
        spans.append((body_start, max(body_start, part_end)))
    return spans


def parse_tree(raw: bytes, notes: list[str]) -> Part | None:
    """The part tree of a raw message; None when its header section is too large."""
    budget = _Budget(notes)
    return _build(raw, 0, len(raw), 0, "text/plain", budget)


def _build(buf: bytes, start: int, end: int, depth: int, default: str, budget: _Budget) -> Part | None:
    top = depth == 0
    limit = MAX_TOP_HEADER if top else MAX_PART_HEADER
    spans = _read_headers(buf, start, end, limit, top)
    budget.parts += 1
    if spans is None:
        if top:
            budget.note("headers too large: not parsed")
            return None
        budget.note("part headers too large: part kept as data")
        return Part(Message(policy=compat32), buf, start, end, "application/octet-stream", depth)
    header_end, body_start = spans
    block = buf[start:header_end]
    budget.header_bytes += len(block)
    if not top and budget.header_bytes > MAX_HEADER_TOTAL:
        budget.note("too many header bytes: later parts not read")
        headers = Message(policy=compat32)
    else:
        headers = parse_header_block(block)
    ctype = _content_type(headers, default)
    part = Part(headers, buf, body_start, end, ctype, depth, declared_type=ctype)
    if ctype.startswith("multipart/"):
        _build_multipart(part, budget)
    elif ctype in ("message/rfc822", "message/global"):
        _build_enclosed(part, budget)
    return part


def _build_multipart(part: Part, budget: _Budget) -> None:
    boundary = part.param("boundary")
    spans = _split(part.buf, part.start, part.end, boundary) if boundary else None
    if spans is None:
        # No boundary, or it never appears: what is there is readable text.
        budget.note(f"{part.content_type} without usable boundary: read as text")
        part.content_type = "text/plain"
        return
    if part.depth >= MAX_DEPTH:
        budget.note(f"MIME tree cut at depth {MAX_DEPTH}")
        return
    child_default = "message/rfc822" if part.content_type == "multipart/digest" else "text/plain"
    for child_start, child_end in spans:
        if budget.parts >= MAX_PARTS:
            budget.note(f"MIME tree cut at {MAX_PARTS} parts")
            break
        child = _build(part.buf, child_start, child_end, part.depth + 1, child_default, budget)
        if child is not None:
            part.children.append(child)


def _build_enclosed(part: Part, budget: _Budget) -> None:
    if part.depth >= MAX_DEPTH:
        budget.note(f"MIME tree cut at depth {MAX_DEPTH}")
        return
    if budget.parts >= MAX_PARTS:
        budget.note(f"MIME tree cut at {MAX_PARTS} parts")
        return
    buf, start, end = part.buf, part.start, part.end
    if part.cte in ("base64", "quoted-printable"):
        buf = decode_body(part)  # not allowed by RFC 2046, but seen
        start, end = 0, len(buf)
    inner = _build(buf, start, end, part.depth + 1, "text/plain", budget)
    if inner is not None:
        part.children.append(inner)


def _b64decode(data: memoryview | bytes) -> bytes:
    try:
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        # Bad padding or a stray trailing character: drop non-alphabet bytes and the
        # incomplete last quantum, as mail readers do.
        clean = re.sub(rb"[^A-Za-z0-9+/]", b"", bytes(data))
        clean = clean[: len(clean) - len(clean) % 4]
        try:
            return binascii.a2b_base64(clean)
        except (binascii.Error, ValueError):
            return b""


def _uudecode(data: bytes) -> bytes:
    out = bytearray()
    lines = data.splitlines()
    started = False
    for line in lines:
        if not started:
            started = line.startswith(b"begin ")
            continue
        if line.strip() in (b"end", b"`"):
            if line.strip() == b"end":
                break
            continue
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            # Broken encoders pad short lines wrongly; recompute from the length byte.
            nbytes = (((line[0] - 32) & 63) * 4 + 5) // 3 if line else 0
            try:
                out += binascii.a2b_uu(line[:nbytes])
            except binascii.Error:
                continue
    return bytes(out)


def decode_body(part: Part) -> bytes:
    """The body with its Content-Transfer-Encoding undone (unknown encodings: as is)."""
    view = memoryview(part.buf)[part.start : part.end]
    cte = part.cte
    if cte == "base64":
        return _b64decode(view)
    if cte == "quoted-printable":
        return binascii.a2b_qp(view)
    if cte in ("x-uuencode", "uuencode", "x-uue", "uue"):
        return _uudecode(bytes(view))
    return bytes(view)
