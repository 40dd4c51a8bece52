"""Outlook's winmail.dat (TNEF) unpacked with `tnefparse`, within bounds.

tnefparse trusts the counts inside the blob: a crafted property count makes it loop
billions of times, and every object costs a copy of the rest of the data. So the blob is
walked once here first (offsets and counts only, no decoding); tnefparse only gets blobs
whose counts fit the bytes that are really there.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from tnefparse import TNEF

from gateway.parse_charset import decode_text

log = logging.getLogger(__name__)

MAX_TNEF_BYTES = 25 * 1024 * 1024
MAX_OBJECTS = 5_000
MAX_PROPERTIES = 50_000
MAX_EMBED_DEPTH = 3
MAX_COPY_BYTES = 1_500_000_000  # tnefparse copies the rest of the blob for every object

_SIGNATURE = 0x223E9F78
_MAPI_OBJECTS = (0x9003, 0x9005)  # attMAPIProps, attAttachment
_RECIPIENT_TABLE = 0x9004
_MULTI_VALUE = 0x1000
_NAMED = 0x8000
_FIXED_SIZES = {0x0002: 2, 0x000B: 2, 0x0003: 4, 0x0004: 4, 0x000A: 4, 0x0005: 8, 0x0006: 8,
                0x0007: 8, 0x0014: 8, 0x0040: 8, 0x0048: 16}
_VARIABLE = (0x0000, 0x000D, 0x001E, 0x001F, 0x0102)
_ATTACH_DATA_OBJ = 0x3701
_IMESSAGE_SIG = b"\x07\x03\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46"


class _Unsafe(Exception):
    pass


@dataclass(frozen=True, slots=True)
class TnefFile:
    name: str
    data: bytes


@dataclass(frozen=True, slots=True)
class TnefContent:
    text: str
    html: str
    files: tuple[TnefFile, ...]
    rtf_only: bool  # the body is compressed RTF only, which we do not read


def _u16(data: bytes, offset: int) -> int:
    return struct.unpack_from("<H", data, offset)[0]


def _u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


def _check_properties(data: bytes, offset: int, budget: list[int], depth: int) -> int:
    """Walk one MAPI property list the way tnefparse's decode_mapi will; returns the end."""
    count = _u32(data, offset)
    offset += 4
    if count > (len(data) - offset) // 4 + 1:
        raise _Unsafe("property count larger than the data")
    for _ in range(count):
        budget[0] -= 1
        if budget[0] < 0:
            raise _Unsafe("too many properties")
        if offset >= len(data):
            return offset
        kind, name = _u16(data, offset), _u16(data, offset + 2)
        offset += 4
        if name >= _NAMED:
            offset += 16
            if _u32(data, offset) == 0:
                offset += 8
            else:
                length = _u32(data, offset + 4)
                offset += 8 + length + (-length % 4)
        values = 0  # tnefparse: "num_mv_properties", None/0 meaning one plain value
        if kind & _MULTI_VALUE:
            kind ^= _MULTI_VALUE
            values = _u32(data, offset)
            offset += 4
            if values > (len(data) - offset) // 2 + 1:
                raise _Unsafe("value count larger than the data")
        budget[0] -= values
        for _ in range(values or 1):
            if kind in _FIXED_SIZES:
                offset += _FIXED_SIZES[kind]
            elif kind in _VARIABLE:
                items = 1 if values else _u32(data, offset)
                offset += 0 if values else 4
                if items > (len(data) - offset) // 4 + 1:
                    raise _Unsafe("item count larger than the data")
                budget[0] -= items
                for _ in range(items):
                    length = _u32(data, offset)
                    start = offset + 4
                    offset = start + length + (-length % 4)
                    if name == _ATTACH_DATA_OBJ and data.startswith(_IMESSAGE_SIG, start):
                        _check_blob(data[start + len(_IMESSAGE_SIG) : start + length], budget, depth + 1)
            else:
                return offset  # tnefparse stops at an unknown type
            if budget[0] < 0:
                raise _Unsafe("too many values")
        if (values or 1) % 2 and kind in (0x0002, 0x000B):
            offset += 2
    return offset


def _check_blob(data: bytes, budget: list[int], depth: int = 0) -> None:
    if depth > MAX_EMBED_DEPTH:
        raise _Unsafe("embedded messages nested too deep")
    if len(data) < 6 or _u32(data, 0) != _SIGNATURE:
        raise _Unsafe("not TNEF")
    offset, objects, copied = 6, 0, 0
    while offset + 12 < len(data):
        objects += 1
        copied += len(data) - offset
        if objects > MAX_OBJECTS or copied > MAX_COPY_BYTES:
            raise _Unsafe("too many objects")
        name = _u16(data, offset + 1)
        length = _u32(data, offset + 5)
        body = data[offset + 9 : offset + 9 + length]
        if name in _MAPI_OBJECTS and len(body) >= 4:
            _check_properties(body, 0, budget, depth)
        elif name == _RECIPIENT_TABLE and len(body) >= 4:
            rows, pos = _u32(body, 0), 4
            if rows > len(body) // 4:
                raise _Unsafe("recipient rows larger than the data")
            for _ in range(rows):
                pos = _check_properties(body, pos, budget, depth)
        offset += min(len(data) - offset, length + 11)


def _text(value: object, codepage: str | None) -> str:
    if isinstance(value, bytes):
        return decode_text(value, codepage)[0].rstrip("\x00")
    return value.rstrip("\x00") if isinstance(value, str) else ""


def unpack_tnef(data: bytes) -> TnefContent | None:
    """Body and files of a TNEF blob; None when it is not one or is not safe to read."""
    if len(data) > MAX_TNEF_BYTES:
        return None
    try:
        _check_blob(data, [MAX_PROPERTIES])
        tnef = TNEF(data, do_checksum=False)
        files = tuple(
            TnefFile(_text(a.long_filename(), tnef.codepage) or _text(a.name, tnef.codepage),
                     bytes(a.data or b""))
            for a in tnef.attachments
        )
        text, html = _text(tnef.body, tnef.codepage), _text(tnef.htmlbody, tnef.codepage)
        return TnefContent(text, html, files, tnef.has_body() and not (text or html))
    except (_Unsafe, struct.error) as exc:
        log.info("winmail.dat not unpacked: %s", exc)
        return None
    except Exception as exc:  # tnefparse raises anything on broken input
        log.info("winmail.dat not unpacked: %r", exc)
        return None
