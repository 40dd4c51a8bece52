"""Plain-text helpers: folding for matching, format=flowed, quoted history, greeting and
signature blocks, inline uuencoded files."""

from __future__ import annotations

import binascii
import functools
import re
import unicodedata
from dataclasses import dataclass

from gateway.parse_headers import parse_addresses

_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_INVISIBLE = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
_TRAILING_BLANKS = re.compile(r"[ \t]+$", re.M)
_EMPTY_LINES = re.compile(r"\n{3,}")


def _build_fold_table() -> dict[int, str]:
    table: dict[int, str] = {}
    for code in range(0xC0, 0x250):
        base = unicodedata.normalize("NFD", chr(code))[0]
        if base.isascii() and base != chr(code):
            table[code] = base
    # No decomposition for "ł"; dashes fold too ("Adres instalacji sprzętu – realizacji").
    table.update({ord("ł"): "l", ord("–"): "-", ord("—"): "-", ord("‑"): "-"})
    return table


_FOLD_TABLE = _build_fold_table()


_FOLDABLE = re.compile("[" + "".join(map(chr, sorted(_FOLD_TABLE))) + "]")


def _fold_char(match: re.Match[str]) -> str:
    return _FOLD_TABLE[ord(match.group())]


def fold(text: str) -> str:
    """Lower-case, without diacritics, same length as `text` (so match offsets carry over).

    Cached for texts of a usual size: the stages fold the same body and lines several
    times (a huge body is folded afresh: the cache must not hold megabytes)."""
    if len(text) <= _FOLD_CACHE_MAX_CHARS:
        return _fold_cached(text)
    return _fold(text)


_FOLD_CACHE_MAX_CHARS = 64 * 1024


@functools.lru_cache(maxsize=128)
def _fold_cached(text: str) -> str:
    return _fold(text)


def _fold(text: str) -> str:
    # Only the foldable characters are looked up (str.translate looks up every one).
    lowered = text.lower()
    if len(lowered) != len(text):  # "İ" and a few others grow when lowered
        lowered = "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in text)
    if lowered.isascii():
        return lowered
    return _FOLDABLE.sub(_fold_char, lowered)


def line_breaks(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def normalize_text(text: str) -> str:
    """No-break spaces as spaces, zero-width ones gone, no blanks at line ends (HTML layout
    pads table cells), at most one empty line in a row. Run after `unflow`."""
    text = _INVISIBLE.sub("", _SPACES.sub(" ", line_breaks(text)))
    text = _TRAILING_BLANKS.sub("", text)
    return _EMPTY_LINES.sub("\n\n", text)


def unflow(text: str, delsp: bool) -> str:
    """Undo RFC 3676 format=flowed: soft-broken lines (ending in a space) are rejoined."""
    out: list[str] = []
    pending: tuple[int, str] | None = None

    def render(depth: int, body: str) -> str:
        return ">" * depth + (" " if depth else "") + body

    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip(">"))
        body = line[depth:]
        if body.startswith(" "):
            body = body[1:]  # space-stuffing
        if pending is not None:
            if pending[0] == depth:
                body = pending[1] + body
            else:
                out.append(render(*pending))
            pending = None
        if body.endswith(" ") and body != "-- ":
            pending = (depth, body[:-1] if delsp else body)
        else:
            out.append(render(depth, body))
    if pending is not None:
        out.append(render(*pending))
    return "\n".join(out)


# --- quoted history ----------------------------------------------------------------------

_ORIGINAL = re.compile(
    r"^-{2,}\s*(?:original message|oryginalna wiadomosc|wiadomosc oryginalna"
    r"|ursprungliche nachricht|message d'origine)\s*-{2,}$"
)
_FORWARD = re.compile(
    r"^(?:-{2,}\s*(?:forwarded message|wiadomosc przekazana(?: dalej)?|przekazana wiadomosc"
    r"|weitergeleitete nachricht|message transfere)\s*-{2,}|begin forwarded message:)$"
)
_ATTRIBUTION_START = re.compile(r"^(?:on|w dniu|dnia|am|le|el|op)\b")
_ATTRIBUTION_END = re.compile(
    r"(?:wrote|writes|pisze|napisal\(a\)|napisala|napisal|schrieb|a ecrit|escribio|skrev|schreef)\s*:\s*$"
)
_UNDERSCORES = re.compile(r"^_{8,}$")
# Lotus Notes/Domino: `-----"Jan" <jan@x.pl> wrote: -----`, "Jan/Firma wrote on 10.03.2025
# 08:00:", "----- Forwarded by Jan/Firma on ... -----" (and their Polish forms).
_NOTES_REPLY = re.compile(
    r"^(?:-{3,}.{1,200}?\b(?:wrote|napisal\(a\)|napisala|napisal|pisze)\b.{0,80}?-{3,}"
    r"|.{1,200}?\b(?:wrote on|napisal\(a\) dnia|napisala dnia|napisal dnia)\b.{0,80}:)$"
)
_NOTES_FORWARD = re.compile(r"^-{3,}\s*(?:forwarded by|przekazane przez|przekazal\w*)\b.{0,200}-{3,}$")
# Apple Mail in Polish: "Wiadomość napisana przez Jan <jan@x.pl> w dniu 10.03.2025, o godz. 08:00:";
# mail.ru and others: a date, then "<jan@x.pl>:" at the end.
_OTHER_ATTRIBUTION = re.compile(
    r"^(?:wiadomosc napisana przez .{1,200} w dniu .{1,80}:|.{0,200}\d{1,2}:\d{2}.{0,120}<[^<>\s]+@[^<>\s]+>\s*:)$"
)
_DATE_OR_ADDRESS = re.compile(r"@|\d{1,2}:\d{2}|\b(?:19|20)\d{2}\b|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}")
# Gmail for Android wraps long quoted lines and the wrapped rest has no ">": a line right
# under a quoted line at least this long (no blank between) continues the quote.
_WRAPPED_QUOTE = 40
_BLOCK_FROM = re.compile(r"^\*?(?:od|from|von|de)\*?\s*:")
_BLOCK_FIELD = re.compile(
    r"^\*?(?:wyslano|wyslane|sent|data|date|do|to|dw|cc|temat|subject|gesendet|an|betreff|envoye|a|objet)\*?\s*:"
)


@dataclass(frozen=True, slots=True)
class SplitText:
    new: str  # the new text: quoted lines and history removed
    history: str  # from the first history marker on ("" if none)
    kind: str  # "", "reply", "forward" (a forward marker) or "header" (Od:/From: block)


def _ends_attribution(text: str) -> bool:
    """`_ATTRIBUTION_END` found in `text`. Its search tries the alternation at every
    position; only a text ending in ":" can match, and most lines do not."""
    return text.rstrip().endswith(":") and _ATTRIBUTION_END.search(text) is not None


def _folded_lines(lines: list[str]) -> list[str]:
    """Each line folded and stripped: what the history markers are matched on."""
    return [line.strip() for line in fold("\n".join(lines)).split("\n")]


def _next_lines(folded: list[str], start: int, count: int) -> list[str]:
    """The next `count` non-empty folded lines from `start`."""
    found = []
    for i in range(start, len(folded)):
        if folded[i]:
            found.append(folded[i])
            if len(found) == count:
                break
    return found


def _is_header_block(folded: list[str], i: int) -> bool:
    if not _BLOCK_FROM.match(folded[i]):
        return False
    following = _next_lines(folded, i + 1, 6)
    return sum(1 for line in following if _BLOCK_FIELD.match(line)) >= 2


def _is_attribution(line: str, following: list[str]) -> bool:
    """ "W dniu ... pisze:", "On ... wrote:" (maybe wrapped), or any "...wrote:" line
    right above `>` quotes."""
    if len(line) >= 400:
        return False
    if _ATTRIBUTION_START.match(line):
        if _ends_attribution(line):
            return True
        if following and _ends_attribution(line + " " + following[0]):
            return True
    if _ends_attribution(line):
        # "pon., 10 mar 2025 o 08:00 Jan <jan@x.pl> napisał(a):" (Gmail, Yahoo in Polish):
        # a date or an address in a short line ending so is an attribution.
        return bool((following and following[0].startswith(">"))
                    or (len(line) < 300 and _DATE_OR_ADDRESS.search(line)))
    return False


def _history_kind(folded: list[str], i: int) -> str:
    line = folded[i]
    if not line:
        return ""
    # Every marker but the header block and a wrapped "W dniu ..." starts or ends with
    # "-", "_" or ":": the cheap test first (this runs on every line of the text).
    first, last = line[0], line[-1]
    if first == "-" or last == "-":
        if _ORIGINAL.match(line):
            return "reply"
        if _FORWARD.match(line) or _NOTES_FORWARD.match(line):
            return "forward"
        if _NOTES_REPLY.match(line):
            return "reply"
    if last == ":":
        if _FORWARD.match(line):
            return "forward"
        if _NOTES_REPLY.match(line) or _OTHER_ATTRIBUTION.match(line):
            return "reply"
    if first == "_" and _UNDERSCORES.match(line):
        following = [j for j in range(i + 1, min(len(folded), i + 4)) if folded[j]]
        return "header" if following and _is_header_block(folded, following[0]) else ""
    if _is_header_block(folded, i):
        return "header"
    if (last == ":" or _ATTRIBUTION_START.match(line)) and _is_attribution(
            line, _next_lines(folded, i + 1, 2)):
        return "reply"
    return ""


def _attribution_above_quote(folded: list[str], i: int) -> int:
    """Lines to skip when line i attributes the `>` quote right below it (0 if it does not):
    the quote is dropped line by line, so text written below it (bottom-posting) stays."""
    line = folded[i]
    if not (_ATTRIBUTION_START.match(line) or _ends_attribution(line)):
        return 0
    following = _next_lines(folded, i + 1, 2)
    if not _is_attribution(line, following):
        return 0
    if following and following[0].startswith(">"):
        return 1
    if len(following) > 1 and following[1].startswith(">") and _ends_attribution(following[0]):
        return 2  # wrapped: "On ... Jan Kowalski <jan@x.pl>" / "wrote:"
    return 0


def _continues_quote(folded: list[str], i: int) -> bool:
    """Line i (under a long quoted line) is the wrapped rest of it: the quote goes on
    right below, or the message ends."""
    following = folded[i + 1] if i + 1 < len(folded) else ""
    return following.startswith(">") or (not following and not any(folded[i + 1 :]))


def split_quoted(text: str) -> SplitText:
    """Separate the new text from quoted history (`>` lines, Outlook header blocks,
    "-----Original Message-----", "W dniu ... pisze:" / "On ... wrote:" attributions)."""
    lines = text.split("\n")
    folded = _folded_lines(lines)
    kept: list[str] = []
    skip = 0
    quoted_above = 0  # length of the quoted line right above (0: none)
    for i, line in enumerate(lines):
        if skip or folded[i].startswith(">"):
            skip = max(0, skip - 1)
            quoted_above = len(folded[i]) if folded[i].startswith(">") else 0
            continue
        if folded[i] and quoted_above >= _WRAPPED_QUOTE and _continues_quote(folded, i):
            quoted_above = len(folded[i]) + 2  # the wrapped rest may wrap again
            continue
        quoted_above = 0
        skip = _attribution_above_quote(folded, i)
        if skip:
            skip -= 1
            continue
        kind = _history_kind(folded, i)
        if kind:
            return SplitText("\n".join(kept).strip("\n"), "\n".join(lines[i:]), kind)
        kept.append(line)
    return SplitText("\n".join(kept).strip("\n"), "", "")


@dataclass(frozen=True, slots=True)
class Forwarded:
    text: str  # the forwarded message's own new text
    from_name: str
    from_addr: str


def read_forwarded(history: str) -> Forwarded:
    """The message inside an inline forward: its header block, then its own new text."""
    lines = history.split("\n")
    folded = _folded_lines(lines)
    i, name, addr = 0, "", ""
    while i < len(lines) and (not folded[i] or _history_kind(folded, i) in ("reply", "forward")):
        i += 1  # the marker line
    if i < len(lines) and _UNDERSCORES.match(folded[i]):
        i += 1
    # The header block ("Od: / Wysłano: / Do: / Temat:") runs to the first blank line.
    while i < len(lines) and folded[i]:
        if _BLOCK_FROM.match(folded[i]) and not addr:
            value = lines[i].split(":", 1)[1].strip().strip("*").strip()
            if "[mailto:" in value:  # Outlook: Name [mailto:addr]
                value = value.replace("[mailto:", "<").replace("]", ">")
            name, addr = next(iter(parse_addresses([value])), ("", ""))
        i += 1
    inner = split_quoted("\n".join(lines[i:]))
    return Forwarded(inner.new.strip(), name.strip().strip('"'), addr.strip().lower())


# --- greeting and signature --------------------------------------------------------------

_GREETING = re.compile(
    r"^(?:dzien dobry|dobry wieczor|witam(?: serdecznie)?|witajcie|czesc|hej|"
    r"szanown\w*(?: pan\w*)?|hello|hi|hey|dear|good (?:morning|afternoon|evening))"
    r"(?:(?: [a-z.]+){1,3}(?=\s*[,!:]))?"  # a name only when a comma closes the greeting
    r"(?=[\s,!.:]|$)[\s,!.:]*"
)
_CLOSING = re.compile(
    r"^(?:(?:serdecznie |z )?pozdr\w*(?: serdecznie)?|z powazaniem|z wyrazami szacunku|"
    r"lacze pozdrowienia|(?:best |kind |warm |many )?regards|best wishes|best|cheers|sincerely|"
    r"yours (?:sincerely|truly|faithfully)|mit freundlichen gru(?:ss|ß)en|mfg|br|"
    r"(?:z gory )?dziekuje(?: z gory)?(?: i pozdrawiam)?|dzieki|thanks|thank you)(?=[\s,!.]|$)[\s,!.]*"
)
_SIGNATURE_START = re.compile(
    r"^(?:--\s*|sent from my .*|wyslane z .*|wyslano z (?:mojego |telefonu|iphone|androida).*)$"
)
_NAME_TOKEN = re.compile(r"^[^\W\d_][^\W\d_'’.-]*(?:[-'’][^\W\d_]+)*\.?$")


def strip_greeting(line: str) -> str:
    """A first line without its greeting ("Dzień dobry, drukarka..." -> "drukarka...")."""
    match = _GREETING.match(fold(line.strip()))
    if not match:
        return line
    return line.strip()[match.end():]


def closing_tail(line: str, folded: str | None = None) -> str | None:
    """For a closing line ("Pozdrawiam, Jan Kowalski"): what follows the phrase ("" if
    nothing); None when the line is not a closing. `folded`: fold(line.strip()) if known."""
    stripped = line.strip()
    if len(stripped) > 60:
        return None
    folded = fold(stripped) if folded is None else folded
    if _SIGNATURE_START.match(folded):
        return ""
    match = _CLOSING.match(folded)
    if not match:
        return None
    tail = stripped[match.end():].strip()
    # "Dziękuję za szybką odpowiedź" is a sentence, not a closing.
    if tail and not looks_like_name(tail):
        return None
    return tail


def looks_like_name(text: str) -> bool:
    """One to four capitalised words of letters: "Jan Kowalski", "Anna Nowak-Kowalska"."""
    words = text.strip().rstrip(",").split()
    if not 1 <= len(words) <= 4 or len(text) > 60:
        return False
    return all(_NAME_TOKEN.match(w) and w[0].isupper() for w in words)


# --- inline uuencoded files (Lotus Notes and older clients) ------------------------------

_UU_BEGIN = re.compile(r"^begin [0-7]{3,4} ([^\n]+)$", re.M)


def extract_uuencoded(text: str) -> tuple[str, list[tuple[str, bytes]]]:
    """Cut "begin 644 name ... end" blocks out of the text and decode them."""
    if "begin " not in text:
        return text, []
    files: list[tuple[str, bytes]] = []
    pieces: list[str] = []
    pos = 0
    for match in _UU_BEGIN.finditer(text):
        if match.start() < pos:
            continue
        end = text.find("\nend", match.end())
        if end < 0:
            break  # no later block can be complete either
        data = bytearray()
        for line in text[match.end() + 1 : end].split("\n"):
            if not line or line == "`":
                continue
            try:
                data += binascii.a2b_uu(line.encode("latin-1", "replace"))
            except binascii.Error:
                continue
        files.append((match.group(1).strip(), bytes(data)))
        pieces.append(text[pos : match.start()])
        pos = end + len("\nend")
    pieces.append(text[pos:])
    return "".join(pieces), files
