"""Bytes -> text for mail bodies and headers, robust to wrong or missing charsets.

Polish mail arrives in UTF-8, windows-1250 or ISO-8859-2, and is often mislabelled
(Outlook declaring iso-8859-1, old clients declaring nothing). The rule: trust UTF-8
when the bytes are valid UTF-8; otherwise choose between the declared charset and the
two Polish 8-bit ones by how Polish the result reads.
"""

from __future__ import annotations

import codecs
import re

# Polish letters, and the byte-level accidents of decoding with the wrong 8-bit table:
# C1 controls (cp1250 text read as ISO-8859-x) and U+FFFD (bytes a codec rejects).
_POLISH = "ąćęłńóśźżĄĆĘŁŃÓŚŹŻ"
# Letters a cp1250/ISO-8859-2 reading has and a Western (cp1252) one does not: Polish
# without "ó", and the common Czech ones. None of them: the text is not Central European.
_CENTRAL_ONLY = "ąćęłńśźżĄĆĘŁŃŚŹŻčěřůňťďČĚŘŮŇŤĎ"
# Also penalised: Latin-1 signs that stand where cp1250 has Polish letters ("zesz³ym" is
# "zeszłym", "¹" is "ą", "¥" is "Ą") and that real Western text hardly ever holds.
_BROKEN = re.compile("[\x80-\x9f\ufffd¹³¥¼¾ª¦¯]")
_SAMPLE = 64 * 1024  # enough text to judge a charset by

# Declared charsets that are routinely wrong for Polish text: we may override them.
_WESTERN = frozenset({"ascii", "latin-1", "iso8859-1", "iso8859-2", "iso8859-15",
                      "cp1250", "cp1252", "utf-8"})
_POLISH_8BIT = ("cp1250", "iso8859-2")

# Names seen in the wild that Python's codec registry does not know.
_ALIASES = {
    "x-unknown": None, "unknown-8bit": None, "unknown": None, "x-user-defined": None,
    "default": None, "us": "ascii", "ansi": "cp1252", "iso-8859-8-i": "iso8859-8",
    "windows-874": "cp874", "x-mac-ce": "mac-latin2", "cp-1250": "cp1250",
    "win-1250": "cp1250", "x-cp1250": "cp1250", "iso-8859-2-i": "iso8859-2",
}


def lookup_codec(name: str | None) -> str | None:
    """Python's codec name for a declared MIME charset, None when unknown or absent."""
    if not name:
        return None
    key = name.strip().strip("\"'").lower()
    if key in _ALIASES:
        return _ALIASES[key]
    try:
        codec = codecs.lookup(key).name
    except (LookupError, ValueError):
        return None
    # Only text codecs: "base64" or "rot13" are codecs too, but not charsets.
    try:
        "a".encode(codec).decode(codec)
    except (LookupError, TypeError, ValueError, UnicodeError):
        return None
    return codec


def _polish_score(text: str) -> int:
    return sum(text.count(ch) for ch in _POLISH) - 3 * len(_BROKEN.findall(text))


def _utf8_or_none(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A cut in the middle of the last character is still UTF-8.
        if exc.start >= len(data) - 3 and exc.reason == "unexpected end of data":
            return data[: exc.start].decode("utf-8", "replace") + "\ufffd"
        return None


def choose_codec(data: bytes, declared: str | None) -> str:
    """The codec to read `data` with, given the declared charset name (may be None)."""
    codec = lookup_codec(declared)
    if data.isascii():
        return codec or "ascii"
    if codec is not None and codec not in _WESTERN:
        return codec  # koi8-r, gb18030, iso-2022-jp...: the declaration is meaningful
    sample = data[:_SAMPLE]
    if _utf8_or_none(sample) is not None:
        return "utf-8"
    candidates = [codec] if codec and codec != "ascii" else []
    candidates += [c for c in _POLISH_8BIT if c not in candidates]
    if codec == "utf-8":
        candidates.append("utf-8")  # mostly UTF-8 with a stray byte: keep UTF-8
    scores = {c: _polish_score(sample.decode(c, "replace")) for c in candidates}
    best = max(candidates, key=lambda c: scores[c])  # max keeps the first on ties
    # A declared charset yields only to a clearly more Polish reading (French "ê" is
    # cp1250 "ę": one such letter must not flip a genuine Latin-1 mail).
    if codec in scores and scores[best] < scores[codec] + 2:
        return codec
    if codec is None or codec == "ascii":
        reading = sample.decode(best, "replace")
        if not any(ch in reading for ch in _CENTRAL_ONLY):
            return "cp1252"  # "Håvard", "Grüße": Western text, nothing Polish in it
    return best


def decode_text(data: bytes, declared: str | None = None) -> tuple[str, str | None]:
    """Decode body or header bytes; returns (text, note) where note says what was guessed."""
    codec = choose_codec(data, declared)
    text = data.decode(codec, "replace")
    wanted = lookup_codec(declared)
    guessed = wanted is None or (codec != wanted and not (wanted == "ascii" and codec == "utf-8"))
    if declared and guessed:
        return text, f"charset {declared.strip()[:40]}: decoded as {codec}"
    return text, None


def repair_surrogates(value: str) -> str:
    """Header text from the stdlib parser carries raw 8-bit bytes as lone surrogates."""
    if value.isascii():
        return value
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return decode_text(data)[0]
