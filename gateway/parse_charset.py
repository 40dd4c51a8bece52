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
_POLISH_TEXT = _POLISH + "„”–—«»…"  # what Polish 8-bit text holds beyond ASCII
_SAMPLE = 64 * 1024  # enough text to judge a charset by

# Declared charsets that are routinely wrong for Polish text: we may override them.
_WESTERN = frozenset({"ascii", "latin-1", "iso8859-1", "iso8859-2", "iso8859-15",
                      "cp1250", "cp1252", "utf-8"})
_POLISH_8BIT = ("cp1250", "iso8859-2")

ISO2022JP_CP932 = "iso-2022-jp/cp932"  # our own reading, see decode_iso2022jp

# Names seen in the wild that Python's codec registry does not know, or that mail
# clients read as a larger charset than the name says.
_ALIASES = {
    "x-unknown": None, "unknown-8bit": None, "unknown": None, "x-user-defined": None,
    "default": None, "us": "ascii", "ansi": "cp1252", "iso-8859-8-i": "iso8859-8",
    "windows-874": "cp874", "x-mac-ce": "mac-latin2", "cp-1250": "cp1250",
    "win-1250": "cp1250", "x-cp1250": "cp1250", "iso-8859-2-i": "iso8859-2",
    # Mail clients read these as their supersets: GB2312/GBK-labelled mail is GBK text,
    # Shift_JIS and ISO-2022-JP carry the NEC/IBM rows of CP932 (①, Ⅰ, ㈱, 髙).
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "cp936": "gb18030",
    "euc-cn": "gb18030", "csgb2312": "gb18030", "shift_jis": "cp932", "shift-jis": "cp932",
    "sjis": "cp932", "x-sjis": "cp932", "ms_kanji": "cp932", "windows-31j": "cp932",
    "iso-2022-jp": ISO2022JP_CP932, "csiso2022jp": ISO2022JP_CP932,
    "ks_c_5601-1987": "cp949", "euc-kr": "cp949",
}


def lookup_codec(name: str | None) -> str | None:
    """Python's codec name for a declared MIME charset, None when unknown or absent."""
    if not name:
        return None
    key = name.strip().strip("\"'").lower()
    if key in _ALIASES:
        return _ALIASES[key]
    if key.startswith("iso-2022-jp"):  # -2, -3, -ext: the same reading serves
        return ISO2022JP_CP932
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


_ISO2022_ESCAPE = re.compile(rb"\x1b(\(B|\(J|\(I|\$@|\$B|\$\(B|\$\(Q|\$\(O|\$\(D)")


def _jis_to_sjis(pairs: bytes) -> bytes:
    """JIS X 0208 byte pairs (with the NEC rows) as Shift_JIS/CP932 bytes."""
    out = bytearray()
    for n in range(0, len(pairs) - 1, 2):
        j1, j2 = pairs[n], pairs[n + 1]
        if not (0x21 <= j1 <= 0x7E and 0x21 <= j2 <= 0x7E):
            out += b"?"
            continue
        s1 = (j1 + 1) // 2 + 0x70
        if s1 > 0x9F:
            s1 += 0x40
        s2 = j2 + 0x1F + (j2 >= 0x60) if j1 % 2 else j2 + 0x7E
        out += bytes((s1, s2))
    return bytes(out)


def decode_iso2022jp(data: bytes) -> str:
    """ISO-2022-JP as mail clients read it: the two-byte runs through CP932, so the NEC
    extensions (①, Ⅰ, ㈱) that Python's iso2022_jp rejects come out right."""
    out: list[str] = []
    mode = b"(B"
    pos = 0
    for match in [*_ISO2022_ESCAPE.finditer(data), None]:
        chunk = data[pos : match.start() if match else len(data)]
        if mode in (b"(B", b"(J"):
            out.append(chunk.decode("ascii", "replace"))
        elif mode == b"(I":  # half-width katakana
            out.append(bytes(b | 0x80 for b in chunk).decode("cp932", "replace"))
        else:
            out.append(_jis_to_sjis(chunk.replace(b"\n", b"").replace(b"\r", b"")).decode("cp932", "replace"))
        if match is None:
            break
        mode, pos = match.group(1), match.end()
    return "".join(out)


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
    if codec == ISO2022JP_CP932:
        return codec  # 7-bit with escapes: never valid UTF-8 text
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
        cjk = cjk_codec(sample)
        if cjk is not None:
            return cjk
        reading = sample.decode(best, "replace")
        if not any(ch in reading for ch in _CENTRAL_ONLY):
            return "cp1252"  # "Håvard", "Grüße": Western text, nothing Polish in it
    return best


def _common_share(codec: str, text: str) -> float:
    """Share of the non-ASCII characters of `text` that are common in that codec's
    language: GB2312 level-1 hanzi for GB18030; kana and level-1 kanji for CP932."""
    chars = [ch for ch in text if ord(ch) > 0x7F]
    if len(chars) < 2:
        return 0.0
    common = 0
    for ch in chars:
        if codec == "gb18030":
            raw = ch.encode("gb18030")
            common += len(raw) == 2 and 0xB0 <= raw[0] <= 0xD7 and raw[1] >= 0xA1
        elif "\u3040" <= ch <= "\u30ff":
            common += 1
        else:
            raw = ch.encode("cp932")
            common += len(raw) == 2 and 0x88 <= raw[0] <= 0x9F
    return common / len(chars)


def cjk_codec(data: bytes) -> str | None:
    """For undeclared 8-bit bytes that are not UTF-8: "gb18030" or "cp932" when the bytes
    read as Chinese or Japanese text (runs of two-byte characters, strictly valid, mostly
    common ones), else None. Polish 8-bit text has lone high bytes between ASCII letters
    and fails the share of high bytes, the strict decoding or the share of common
    characters; bytes that are all Polish letters in cp1250 or ISO-8859-2 stay Polish."""
    words = [w for w in data.split() if not w.isascii()]  # "山田太郎 <a@b.jp>": the name
    high = sum(1 for w in words for b in w if b >= 0x80)
    if high < 4 or high * 3 < sum(map(len, words)):
        return None
    for polish in _POLISH_8BIT:  # "żółć" is also two common hanzi: Polish wins here
        if all(ch in _POLISH_TEXT for ch in data.decode(polish, "replace") if ord(ch) > 0x7F):
            return None
    best, best_share = None, 0.8  # at least this share of common characters
    for codec in ("gb18030", "cp932"):
        try:
            text = data.decode(codec)
        except UnicodeDecodeError:
            continue
        share = _common_share(codec, text)
        if share > best_share:
            best, best_share = codec, share
    return best


_SURROGATES = re.compile("[\ud800-\udfff]")


def no_surrogates(text: str) -> str:
    """Lone surrogates (UTF-7 "+2AA-", "\\ud800" in unicode_escape) as U+FFFD: they cannot
    be stored or printed as UTF-8."""
    return text if text.isascii() else _SURROGATES.sub("\ufffd", text)


def _decode(data: bytes, codec: str) -> str:
    if codec == ISO2022JP_CP932:
        return decode_iso2022jp(data)
    return no_surrogates(data.decode(codec, "replace"))


def decode_text(data: bytes, declared: str | None = None) -> tuple[str, str | None]:
    """Decode body or header bytes; returns (text, note) where note says what was guessed."""
    codec = choose_codec(data, declared)
    text = _decode(data, codec)
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
