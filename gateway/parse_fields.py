"""The procedure's six fields and the service rating, read from a message's new text.

Labels are matched on a folded copy of each line (lower-case, no diacritics, same length),
so "Imię i nazwisko", "IMIE I NAZWISKO" and "imie i nazwisko" are one label; the value is
cut from the original line, as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import phonenumbers
from phonenumbers import Leniency, NumberParseException, PhoneNumberFormat, PhoneNumberMatcher

from gateway.model import Fields
from gateway.parse_guess import address_in_text, commcell_in_text, phone_in_text, serial_in_text
from gateway.parse_text import closing_tail, fold, looks_like_name, strip_greeting

# Folded label -> field key, in the procedure's order. The longest label that fits wins.
_LABELS: dict[str, tuple[str, ...]] = {
    "name": (
        "imie i nazwisko osoby zglaszajacej problem", "imie i nazwisko osoby zglaszajacej",
        "imie i nazwisko zglaszajacego", "imie i nazwisko", "imie nazwisko",
        "osoba zglaszajaca", "zglaszajacy", "zglaszajaca", "osoba kontaktowa",
        "name and surname", "full name", "reporter name", "reporter", "reported by",
        "contact person", "name",
    ),
    "first_name": ("imie", "first name"),
    "last_name": ("nazwisko", "last name", "surname"),
    "contact": (
        "dane kontaktowe osoby zglaszajacej", "dane kontaktowe", "kontakt",
        "contact details", "contact data", "contact",
    ),
    "email": ("adres e-mail", "adres mailowy", "e-mail address", "e-mail", "mail"),
    "phone": (
        "numer telefonu", "nr telefonu", "nr tel.", "telefon kontaktowy", "telefon komorkowy",
        "telefon", "tel. kom.", "tel.", "komorka", "kom.", "phone number", "telephone",
        "phone", "mobile", "gsm",
    ),
    "address": (
        "adres instalacji sprzetu - realizacji naprawy", "adres instalacji sprzetu",
        "adres instalacji", "adres realizacji naprawy", "miejsce instalacji",
        "lokalizacja urzadzenia", "lokalizacja", "adres", "installation address", "site address",
        "address", "location", "site",
    ),
    "description": (
        "opis problemu", "opis awarii", "opis usterki", "opis bledu", "opis",
        "problem description", "description of the problem", "description", "problem", "issue",
    ),
    "serial": (
        "numer seryjny urzadzenia", "nr seryjny urzadzenia", "numer seryjny", "nr seryjny",
        "numer fabryczny urzadzenia", "nr fabryczny urzadzenia", "numer fabryczny", "nr fabryczny",
        "serial number", "serial no.", "serial nr", "serial", "s/n", "sn",
    ),
    "commcell": (
        "numer commcell id", "nr commcell id", "numer commcell", "nr commcell", "commcell id",
        "commcell", "commserve id", "ccid", "cc id",
    ),
    "logs": ("logi z urzadzenia, o ile sa dostepne", "logi z urzadzenia", "logi", "logs", "log files"),
}
# "Numer seryjny urządzenia / numer Commcell ID" and its variants ("S/N lub CCID"...).
_DEVICE_LABEL = (
    r"(?:(?:numer|nr)\.?\s+seryjny(?:\s+urzadzenia)?|serial(?:\s+(?:number|no\.?|nr))?|s\s*/\s*n|sn)"
    r"\s*(?:/|,|\blub\b|\bor\b|\balbo\b)\s*(?:(?:numer|nr)\.?\s+)?(?:commcell(?:\s*id)?|ccid)"
)
MULTILINE_KEYS = frozenset({"address", "description", "contact"})
PARAGRAPH_KEYS = frozenset({"description"})
# Labels this long are unambiguous: a single space may separate the value ("5. Numer
# seryjny urządzenia / numer Commcell ID 12AB3"); numbered ones ("4. Opis problemu X") a bit
# shorter. "0. Kom in på..." (Swedish) must not read as a phone label.
LONG_LABEL = 20
NUMBERED_LABEL = 10
SIGNATURE_LINES = 8  # a signature block: the closing line and what follows it
MAX_CONTACT = 2000  # contact data is a line or three; phone/e-mail search stays cheap

_PLACEHOLDERS = frozenset({"", "-", "--", "---", "?", "x", "brak", "n/a", "na", "b/d", "bd",
                           "none", "nie dotyczy", "nie wiem", "tbd", "..."})
# The look-behind lets a match start only where a run of address characters starts: without
# it a long run with no "@" is rescanned from every position (quadratic).
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+'-])[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_SEPARATOR = re.compile(r"[ \t]*(?:[:;=]|[-–—>](?=[ \t]|$)|\t)[ \t]*|[ \t]{2,}")
_PHONE_START = re.compile(r"[ \t]+[+(]?\d")
# "S/N AB-12", "CC ID 2A3F5": one token with a digit may follow a short device label.
_IDENTIFIER = re.compile(r"^(?=[^\s]*\d)[A-Za-z0-9][A-Za-z0-9./_-]*$")
_PHONE_KEYWORD = re.compile(
    r"\b(?:tel|telefon|tel\. ?kom|kom|komorka|mobile|mob|phone|gsm|cell)\b\.?[ \t]*:?[ \t]*"
    r"([+(]?\d[\d \-()/.]{5,}\d)"
)
_CONTACT_DATA = re.compile(r"@|\d{3}")
_NAME_END = re.compile(r"[,;(<]|\s[-–]\s|\s+(?:tel|kom|e-?mail|mail|phone)\b", re.I)
_NOT_A_PHONE = re.compile(r"\b(?:nip|regon|krs|iban|konto|fax|faks|pesel)\b")
_COMMCELL_IN_VALUE = re.compile(
    r"\b(?:comm\s*cell(?:\s*id)?|ccid|cc\s*id)\b\s*(?:[:#=]|-(?=\s))?\s*([A-Za-z0-9][A-Za-z0-9-]*)", re.I
)
_SERIAL_PREFIX = re.compile(
    # The prefix must be followed by a separator or a space: in "SN-7F3K-0005" the
    # "SN" is part of the serial number itself.
    r"^(?:s/n|sn|serial(?:\s*(?:number|no\.?|nr))?|n(?:ume)?r\.?\s*seryjny)"
    r"(?:\s*(?:[:#=]|-(?=\s))\s*|\s+)", re.I
)


def _label_pattern(label: str) -> str:
    """A folded label as a regex: flexible blanks, dashes, slashes; optional final dots."""
    out = []
    for token in re.split(r"(\s*[-/,]\s*|\s+)", label):
        if not token:
            continue
        if token.isspace():
            out.append(r"\s+")
        elif token.strip() == "/":
            out.append(r"\s*/\s*")
        elif token.strip() == "-":
            out.append(r"\s*-?\s*")
        elif token.strip() == ",":
            out.append(r"\s*,?\s*")
        else:
            out.append(re.escape(token.rstrip(".")) + (r"\.?" if token.endswith(".") else ""))
    return "".join(out)


_LABEL_PREFIX = (
    r"^[ \t]*(?:[-*•·▪●◦‣+]+[ \t]*)?"  # a bullet
    r"(?P<num>\(?(?:\d{1,2}|[a-h])[ \t]*[.)][ \t]*)?"  # "1." "1)" "a)"
)
_DEVICE_LABEL_STARTS = "ns"  # _DEVICE_LABEL's words: numer, nr, serial, s/n, sn


def _build_label_regex() -> tuple[re.Pattern[str], dict[str, tuple[str, bool]]]:
    entries = [(label, key) for key, labels in _LABELS.items() for label in labels]
    entries.sort(key=lambda e: -len(e[0]))
    groups = {"g_device": ("device", True)}
    alternatives = [f"(?P<g_device>{_DEVICE_LABEL})"]
    for n, (label, key) in enumerate(entries):
        groups[f"g{n}"] = (key, len(label) >= LONG_LABEL)
        alternatives.append(f"(?P<g{n}>{_label_pattern(label)})")
    pattern = (
        _LABEL_PREFIX
        + r"(?:" + "|".join(alternatives) + r")(?![a-z0-9])"
        # "(mail, telefon)", but not an area code: "Telefon (0-12) 421 11 22"
        r"(?:[ \t]*\((?![ \t]*[+\d])[^)\n]{0,80}\))?"
    )
    return re.compile(pattern), groups


def _build_label_start() -> re.Pattern[str]:
    """What a labelled line begins with: the prefix, then a first letter of a label.
    Most lines of a report (prose, log lines) fail here, before the hundred
    alternatives of the label regex are each tried at their start."""
    firsts = {label[0] for labels in _LABELS.values() for label in labels}
    return re.compile(_LABEL_PREFIX + "[" + re.escape("".join(sorted(
        firsts | set(_DEVICE_LABEL_STARTS)))) + "]")


_LABEL_LINE, _LABEL_GROUPS = _build_label_regex()
_LABEL_START = _build_label_start()


@dataclass(frozen=True, slots=True)
class _Hit:
    key: str
    value: str  # "" when the label stands alone (value on the next lines)


def _match_label(line: str, folded: str) -> _Hit | None:
    """`folded`: fold(line), same length, so offsets found in it cut the original line."""
    if len(line) > 1000 or not _LABEL_START.match(folded):
        return None
    match = _LABEL_LINE.match(folded)
    if not match or match.lastgroup not in _LABEL_GROUPS:
        return None
    key, long_label = _LABEL_GROUPS[match.lastgroup]
    rest = line[match.end():]
    if not rest.strip() or rest.strip() in (":", ";", "-", "–", "—"):
        return _Hit(key, "")
    separator = _SEPARATOR.match(rest)
    if separator:
        return _Hit(key, rest[separator.end():].strip())
    single_space = rest[:1] == " " and (
        long_label
        or (match.group("num") is not None and len(match.group(match.lastgroup)) >= NUMBERED_LABEL)
        or (key == "phone" and _PHONE_START.match(rest) is not None)
        or (key == "email" and "@" in rest)
        or (key in ("serial", "commcell") and _IDENTIFIER.match(rest.strip()) is not None)
    )
    return _Hit(key, rest.strip()) if single_space else None


@dataclass(slots=True)
class Labelled:
    """What the labels of a text gave: raw values by key and the lines they used."""

    lines: list[str]
    folded: list[str]  # each line folded and stripped
    values: dict[str, str]
    used: set[int]
    # Keys given again with another value ("Numer seryjny: A" ... "Numer seryjny: B").
    repeated: set[str] = field(default_factory=set)

    def is_stop(self, i: int) -> bool:
        """A closing ("Pozdrawiam") or signature separator ("-- ") on line i."""
        return closing_tail(self.lines[i], self.folded[i]) is not None

    @property
    def found(self) -> bool:
        return any(key != "logs" for key in self.values)


def _continuation(doc: Labelled, hits: list[_Hit | None], start: int, key: str,
                  alone: bool) -> tuple[int, list[str]]:
    """Lines that continue a value from `start`; returns (first unused index, lines)."""
    lines = doc.lines
    j, blanks = start, 0
    out: list[str] = []
    if alone:
        while j < len(lines) and not lines[j].strip() and blanks < 2:
            j, blanks = j + 1, blanks + 1
    while j < len(lines):
        line = lines[j]
        if hits[j] is not None or doc.is_stop(j):
            break
        if not line.strip():
            if key not in PARAGRAPH_KEYS or not out:
                break
            nxt = next((k for k in range(j + 1, len(lines)) if lines[k].strip()), None)
            if nxt is None or hits[nxt] is not None or doc.is_stop(nxt):
                break
            out.append("")
            j += 1
            continue
        out.append(line.strip())
        j += 1
        if key not in MULTILINE_KEYS:
            break
    return j, out


def _clean(value: str, key: str) -> str | None:
    value = "\n".join(line.strip() for line in value.strip().split("\n"))
    value = re.sub(r"\n{3,}", "\n\n", value)
    if key not in MULTILINE_KEYS:
        value = value.rstrip(";,").strip()
    return None if fold(value) in _PLACEHOLDERS else value


def read_labels(text: str) -> Labelled:
    lines = text.split("\n")
    folded_full = fold(text).split("\n")
    doc = Labelled(lines, [f.strip() for f in folded_full], {}, set())
    hits = [_match_label(line, folded) for line, folded in zip(lines, folded_full, strict=True)]
    values, used = doc.values, doc.used
    i = 0
    while i < len(lines):
        hit = hits[i]
        if hit is None:
            i += 1
            continue
        parts = [hit.value] if hit.value else []
        j = i + 1
        if hit.key in MULTILINE_KEYS or not parts:
            j, more = _continuation(doc, hits, i + 1, hit.key, alone=not parts)
            parts += more
        used.update(range(i, j))
        value = _clean("\n".join(parts), hit.key)
        if value and hit.key not in values:
            values[hit.key] = value
        elif value and fold(value) != fold(values[hit.key]):
            doc.repeated.add(hit.key)
        i = j
    return doc


# --- phones ------------------------------------------------------------------------------

def _e164(number: phonenumbers.PhoneNumber) -> str:
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


def _valid_in(text: str, region: str) -> str | None:
    for match in PhoneNumberMatcher(text, region, leniency=Leniency.VALID, max_tries=20):
        return _e164(match.number)
    return None


def normalize_phone(text: str, region: str) -> str:
    """E.164 when the text holds a phone number; otherwise the text, stripped."""
    text = text.strip()
    try:
        found = _valid_in(text, region)
        if found:
            return found
        # "(0-12) 444-65-00": the old Polish trunk zero before the area code.
        digits = re.sub(r"\D", "", text)
        if digits.startswith("0") and not digits.startswith("00"):
            found = _valid_in(digits[1:], region)
            if found:
                return found
        for match in PhoneNumberMatcher(text, region, leniency=Leniency.POSSIBLE, max_tries=20):
            return _e164(match.number)
        number = phonenumbers.parse(text, region)
        if phonenumbers.is_possible_number(number):
            return _e164(number)
    except NumberParseException:
        pass
    return text


def _phone_in_signature(doc: Labelled, start: int, region: str) -> str | None:
    end = start + SIGNATURE_LINES
    for line, folded in zip(doc.lines[start:end], doc.folded[start:end], strict=True):
        if not folded or _NOT_A_PHONE.search(folded):
            continue
        try:
            found = _valid_in(line, region)
        except NumberParseException:
            found = None
        if found:
            return found
    return None


def _phone_by_keyword(doc: Labelled, region: str) -> str | None:
    for line, folded in zip(doc.lines, doc.folded, strict=True):
        match = _PHONE_KEYWORD.search(folded)
        if match:
            return normalize_phone(line.strip()[match.start(1) : match.end(1)], region)
    return None


# --- signature, free text ----------------------------------------------------------------

def _signature_start(doc: Labelled) -> int:
    """Index of the closing line ("Pozdrawiam", "-- "...), or len(lines) when none."""
    content_seen = False
    for i, folded in enumerate(doc.folded):
        if not folded:
            continue
        if content_seen and i not in doc.used and doc.is_stop(i):
            return i
        content_seen = True
    return len(doc.lines)


def _signature_name(doc: Labelled, start: int) -> str | None:
    if start >= len(doc.lines):
        return None
    tail = closing_tail(doc.lines[start], doc.folded[start]) or ""
    if tail and looks_like_name(tail):
        return tail.rstrip(",").strip()
    for i in range(start + 1, min(start + SIGNATURE_LINES, len(doc.lines))):
        if not doc.folded[i] or doc.is_stop(i):
            continue
        candidate = doc.lines[i].strip().rstrip(",").strip()
        return candidate if looks_like_name(candidate) else None
    return None


def _free_text(doc: Labelled, end: int) -> str | None:
    kept = [line.rstrip() for i, line in enumerate(doc.lines[:end])
            if i not in doc.used and not _RATING_ONLY.match(doc.folded[i])]
    while kept and not kept[0].strip():
        kept.pop(0)
    if kept:
        kept[0] = strip_greeting(kept[0])
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    return text or None


# --- fields ------------------------------------------------------------------------------

def _name_ending_paragraph(doc: Labelled, end: int) -> str | None:
    """A report written as one paragraph signed in its last sentence: "... Proszę o
    kontakt. Anna Nowak" -> "Anna Nowak" (two to four capitalised words)."""
    last = next((doc.lines[i] for i in range(min(end, len(doc.lines)) - 1, -1, -1)
                 if doc.lines[i].strip() and i not in doc.used), "")
    tail = re.split(r"[.!?]\s+", last.strip())[-1].strip().rstrip(".")
    return tail if " " in tail and tail != last.strip() and looks_like_name(tail) else None


def _unused_text(doc: Labelled) -> str:
    """The lines no label took: where unlabelled values are looked for."""
    return "\n".join(line for i, line in enumerate(doc.lines) if i not in doc.used)


def _first_email(text: str | None) -> str | None:
    match = _EMAIL.search(text or "")
    return match.group(0).lower() if match else None


def _device(values: dict[str, str]) -> tuple[str | None, str | None]:
    """(serial_number, commcell_id) from the serial, CommCell and combined labels."""
    serial = values.get("serial")
    commcell = values.get("commcell")
    if commcell:
        match = _COMMCELL_IN_VALUE.match(commcell)
        commcell = match.group(1) if match else commcell
    combined = values.get("device")
    if combined:
        match = _COMMCELL_IN_VALUE.search(combined)
        if match:
            commcell = commcell or match.group(1)
            rest = (combined[: match.start()] + " " + combined[match.end():]).strip(" ,;/\n\t")
            rest = _SERIAL_PREFIX.sub("", rest).strip(" ,;/\n\t")
            if rest and fold(rest) not in _PLACEHOLDERS:
                serial = serial or rest
        else:
            serial = serial or combined
    return serial, commcell


def _contact_name(contact: str | None) -> str | None:
    if not contact:
        return None
    rest = _EMAIL.sub(" ", contact)
    rest = re.sub(r"(?i)\b(?:tel|kom|telefon|e-?mail|mail|phone)\b\.?:?", " ", rest)
    rest = re.sub(r"[+(]?\d[\d \-()/.]{5,}\d", " ", rest)
    rest = " ".join(re.sub(r"[,;:|/]", " ", rest).split())
    return rest if looks_like_name(rest) else None


def _split_name(value: str | None) -> tuple[str | None, str | None]:
    """"Jan Kowalski, tel. 600 100 200" under a name label: (name, the contact part)."""
    if not value or not _CONTACT_DATA.search(value):
        return value, None
    name = _NAME_END.split(value, 1)[0].strip()
    return (name or None), value


def build_fields(labelled: Labelled, sender: str, sender_name: str, region: str,
                 subject: str = "") -> Fields:
    """Fields from the labels, with the fallbacks: signature, From, free text (phone,
    postal address, serial or CommCell ID mentioned in a sentence), the subject."""
    values = labelled.values
    labelled_name, name_contact = _split_name(values.get("name"))
    contact = (values.get("contact") or name_contact or "")[:MAX_CONTACT] or None
    sig_start = _signature_start(labelled)
    sig_name = _signature_name(labelled, sig_start)
    split_name = " ".join(v for v in (values.get("first_name"), values.get("last_name")) if v)
    display = sender_name if sender_name and "@" not in sender_name else None
    unused = _unused_text(labelled)

    name = (labelled_name or split_name or _contact_name(contact)
            or (sig_name if sig_name and " " in sig_name else None)
            or _name_ending_paragraph(labelled, sig_start) or display or sig_name)
    email = _first_email(values.get("email")) or _first_email(contact) or (sender or None)
    phone: str | None
    if values.get("phone"):
        phone = normalize_phone(values["phone"], region)
    else:
        phone = ((_valid_in(contact, region) if contact else None)
                 or _phone_in_signature(labelled, sig_start, region)
                 or _phone_by_keyword(labelled, region)
                 or phone_in_text(unused, region))
    serial, commcell = _device(values)
    if not (serial or commcell):
        serial = serial_in_text(unused) or serial_in_text(subject)
        commcell = commcell_in_text(unused) or (None if serial else commcell_in_text(subject))
    address = values.get("address") or address_in_text(unused)
    description = values.get("description") or _free_text(labelled, sig_start)
    return Fields(
        reporter_name=name,
        reporter_email=email,
        reporter_phone=phone,
        install_address=address,
        description=description,
        serial_number=serial,
        commcell_id=commcell,
    )


_KEY_FIELDS = {
    "name": ("reporter_name",), "first_name": ("reporter_name",),
    "last_name": ("reporter_name",), "email": ("reporter_email",),
    "phone": ("reporter_phone",), "address": ("install_address",),
    "description": ("description",), "serial": ("serial_number",),
    "commcell": ("commcell_id",), "device": ("serial_number", "commcell_id"),
}


# Keys that name one failure: one of them twice with two values is two reports in one mail.
_REPORT_KEYS = frozenset({"serial", "commcell", "device", "address", "description", "name"})


def second_report(labelled: Labelled) -> str | None:
    """A note for staff when the text seems to hold two reports (a device key, or two
    report keys, given twice with different values): only the first one was read."""
    keys = labelled.repeated & _REPORT_KEYS
    device = keys & {"serial", "commcell", "device"}
    if not device and len(keys) < 2:
        return None
    return ("two reports in one mail? fields given twice with different values ("
            + ", ".join(sorted(keys)) + "): only the first of each was read")


def labelled_fields(labelled: Labelled, fields: Fields) -> frozenset[str]:
    """Which of `fields` the customer wrote under a label (the contact line counts for
    the e-mail and phone it holds)."""
    names: set[str] = set()
    for key in labelled.values:
        names.update(_KEY_FIELDS.get(key, ()))
    if "contact" in labelled.values:
        contact = labelled.values["contact"]
        if fields.reporter_email and fields.reporter_email in contact.lower():
            names.add("reporter_email")
        if fields.reporter_phone:
            names.add("reporter_phone")
    return frozenset(n for n in names if getattr(fields, n))


# --- rating ------------------------------------------------------------------------------

_RATING_WORD = r"(?:ocena|oceniam(?: na)?|moja ocena|rating|rate|score)"
_RATING_ONLY = re.compile(
    r"^[ \t]*(?:" + _RATING_WORD + r"[ \t]*[:=\-–]?[ \t]*)?[1-5](?:[ \t]*/[ \t]*5)?[ \t]*[.!]?[ \t]*$"
)
_RATING_LABEL = re.compile(
    r"\b" + _RATING_WORD + r"\b[ \t]*[:=\-–]?[ \t]*"
    r"([1-5])(?:[ \t]*/[ \t]*5(?![0-9]))?(?![0-9])(?![ \t]*/)(?![.,][0-9])"
)
_RATING_FRACTION = re.compile(r"^[ \t]*([1-5])[ \t]*/[ \t]*5[ \t]*[.!]?[ \t]*$", re.M)
_RATING_LONE = re.compile(r"^[ \t]*([1-5])[ \t]*[.!]?[ \t]*$")


# Every word of _RATING_WORD holds one of these: a text without any cannot match
# _RATING_LABEL, whose search tries its alternatives at every position (~0.25 ms for
# a 5 KB report, against ~0.01 ms for these substring tests).
_RATING_STEMS = ("ocen", "rat", "score")


def find_rating(text: str) -> int | None:
    """A 1-5 service rating: "Ocena: 4", "Rating 4/5", "4/5" on a line, or a lone digit
    as the whole first line."""
    folded = fold(text)
    labelled = any(stem in folded for stem in _RATING_STEMS)
    for pattern in (_RATING_LABEL, _RATING_FRACTION) if labelled else (_RATING_FRACTION,):
        match = pattern.search(folded)
        if match:
            return int(match.group(1))
    first = next((line for line in folded.split("\n") if line.strip()), "")
    match = _RATING_LONE.match(first)
    return int(match.group(1)) if match else None
