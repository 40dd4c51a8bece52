"""Attachment bytes, stored once: the files, and the raw without them.

Where the bytes live is an `AttachmentStore` (gateway/attachment_store.py): these
files on one host (the SQLite default), or a table of the database that every node
reads (PostgreSQL). As files, each attachment is a file named by its SHA-256 (never
by the sender's file name), written atomically and fsync'd, stored once however often
it arrives. The raw mail kept in the database for `inbox show --raw` and reprocessing
then no longer carries those bytes a second time: once the bytes are safe, the exact
encoded body of each attachment (base64 as the sender's mailer wrapped it, or the
plain bytes) is cut out of the stored raw and the place is remembered as a `Span`.
Reading the raw puts the same bytes back, re-encoded from the stored bytes: byte for
byte the message as received (only bytes checked to be exactly that re-encoding are
ever cut).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.model import Attachment

# Smaller attachments stay inside the raw: cutting them would save next to nothing.
MIN_CUT_SIZE = 4096
# Base64 line lengths mailers use (76: RFC 2045 and nearly everyone; 72, 64: some).
_B64_LINES = (76, 72, 64)
_EOLS = (b"\r\n", b"\n")
MAX_CANDIDATES = 64  # starts looked at per encoding variant and attachment (_find_base64)


def attachment_rows(attachments: Iterable[Attachment]) -> list[dict[str, Any]]:
    """What the attachments table records of each attachment (store.replace_attachments):
    a generated id and the metadata, never the bytes (those are in the AttachmentStore)."""
    return [{"id": uuid.uuid4().hex, "filename": attachment.filename,
             "content_type": attachment.content_type, "size": attachment.size,
             "sha256": attachment.sha256, "is_log": attachment.is_log}
            for attachment in attachments]


def write_attachment_files(folder: Path, attachments: Iterable[Attachment]) -> None:
    """Write attachment bytes under generated names (content hashes), never the
    sender's file name. Idempotent: the same bytes land in the same file. Each new
    file is fsync'd (and its folder), so the raw may then be stored without them."""
    for attachment in attachments:
        path = attachment_path(folder, attachment.sha256)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(attachment.data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_path(path.parent)


def attachment_path(folder: Path, sha256: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256: {sha256!r}")
    return folder / sha256[:2] / sha256


def read_attachment(folder: Path, sha256: str) -> bytes:
    """An attachment's bytes, checked against their hash (a damaged file is an error,
    never silently wrong bytes)."""
    path = attachment_path(folder, sha256)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AttachmentMissing(f"attachment {sha256[:12]}...: file {path} is missing") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise AttachmentMissing(f"attachment {sha256[:12]}...: file {path} is damaged "
                                "(its content does not match its name)")
    return data


class AttachmentMissing(Exception):
    """Attachment bytes (a file or a row of attachment_blobs) missing or damaged."""


# --- the raw without the attachment bytes -----------------------------------------------

@dataclass(frozen=True, slots=True)
class Span:
    """Where an attachment's encoded bytes were cut out of the stored raw."""

    at: int  # offset in the stored (cut) raw
    sha256: str
    encoding: str  # "base64" | "plain"
    line: int = 0  # base64: characters per line
    eol: str = "\r\n"  # base64: line end; plain: the line end the bytes were given with


def encode(data: bytes, span: Span) -> bytes:
    eol = span.eol.encode()
    if span.encoding == "plain":
        return data if eol == b"\n" else data.replace(b"\n", b"\r\n")
    text = base64.b64encode(data)
    return eol.join([text[i:i + span.line] for i in range(0, len(text), span.line)])


def _base64_at(raw: bytes, start: int, text: bytes, line: int, eol: bytes) -> int:
    """The end of `text` (base64) wrapped at `line` with `eol` when that is exactly what
    `raw` holds from `start`, else -1. Checked with C-speed slices, without building the
    wrapped text: the bytes between the line ends are `text`, and the line ends sit
    every `line` characters."""
    lines = -(-len(text) // line)
    end = start + len(text) + (lines - 1) * len(eol)
    region = raw[start:end]
    if len(region) != end - start or region.replace(eol, b"") != text:
        return -1
    step = line + len(eol)
    for k, byte in enumerate(eol):
        if region[line + k::step] != bytes([byte]) * (lines - 1):
            return -1
    return end


def _find_base64(raw: bytes, attachment: Attachment) -> Iterator[tuple[int, int, Span]]:
    """Where `raw` holds the attachment's base64 exactly as encode() would write it.

    A body always starts on a new line, so candidates are found as line end + first
    line. A repetitive body (the same line over and over) has its first line on every
    line: each variant looks at MAX_CANDIDATES starts at most (checked cheaply first:
    the last line where it must end; a full check after), so a hostile message costs
    a few linear passes, never one per line. What is not found stays in the raw."""
    text = base64.b64encode(attachment.data)
    for eol in _EOLS:
        for line in _B64_LINES:
            if len(text) <= line:
                continue
            lines = -(-len(text) // line)
            length = len(text) + (lines - 1) * len(eol)
            last = eol + text[(lines - 1) * line:]
            first = eol + text[:line] + eol
            found = raw.find(first)
            for _ in range(MAX_CANDIDATES):
                if found == -1:
                    break
                start = found + len(eol)
                end = start + length
                if (raw[end - len(last):end] == last
                        and _base64_at(raw, start, text, line, eol) == end):
                    yield start, end, Span(0, attachment.sha256, "base64", line, eol.decode())
                    found = raw.find(first, end - len(eol))
                else:
                    found = raw.find(first, found + 1)


def _find_plain(raw: bytes, attachment: Attachment) -> Iterator[tuple[int, int, Span]]:
    variants = [("\n", attachment.data)]
    if b"\n" in attachment.data and b"\r\n" not in attachment.data:
        variants.append(("\r\n", attachment.data.replace(b"\n", b"\r\n")))
    for eol, encoded in variants:
        start = raw.find(encoded)
        while start != -1:
            yield start, start + len(encoded), Span(0, attachment.sha256, "plain", 0, eol)
            start = raw.find(encoded, start + len(encoded))


def cut_attachments(raw: bytes, attachments: Iterable[Attachment],
                    min_size: int = MIN_CUT_SIZE) -> tuple[bytes, tuple[Span, ...]]:
    """The raw without the encoded bytes of its attachments (those in the store),
    and where they were; (raw, ()) when nothing is worth cutting. Every cut is of bytes
    that are exactly `encode(data, span)`, so restore_raw gives the original back."""
    data = {a.sha256: a for a in attachments if a.size >= min_size}
    matches: list[tuple[int, int, Span]] = []  # (start, end, span) in the original raw
    for attachment in data.values():
        matches.extend(_find_base64(raw, attachment))
        matches.extend(_find_plain(raw, attachment))
    if not matches:
        return raw, ()
    matches.sort(key=lambda m: (m[0], -(m[1] - m[0])))
    pieces, spans, position, removed = [], [], 0, 0
    for start, end, span in matches:
        if start < position:
            continue  # overlaps one already cut
        pieces.append(raw[position:start])
        spans.append(Span(start - removed, span.sha256, span.encoding, span.line, span.eol))
        removed += end - start
        position = end
    pieces.append(raw[position:])
    return b"".join(pieces), tuple(spans)


def restore_raw(stored: bytes, spans: Iterable[Span], load: Callable[[str], bytes]) -> bytes:
    """The raw as received: `stored` with each span's bytes put back (from `load`)."""
    pieces, position = [], 0
    for span in sorted(spans, key=lambda s: s.at):
        pieces.append(stored[position:span.at])
        pieces.append(encode(load(span.sha256), span))
        position = span.at
    pieces.append(stored[position:])
    return b"".join(pieces)


def spans_to_json(spans: Iterable[Span]) -> str:
    return json.dumps([[s.at, s.sha256, s.encoding, s.line, s.eol] for s in spans])


def spans_from_json(text: str) -> tuple[Span, ...]:
    return tuple(Span(int(at), sha, enc, int(line), eol)
                 for at, sha, enc, line, eol in json.loads(text))


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
