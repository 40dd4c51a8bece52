"""Fields written without a label: a serial or CommCell ID mentioned in a sentence or only
in the subject, a postal address `ul. Długa 5, 31-147 Kraków`, a phone number anywhere.

Guesses only: `parse_fields.build_fields` uses them where no label gave the field, and they
never count as labelled (`Report.labelled`), so they cannot correct a ticket later.
Matched on the folded text (same length), cut from the original.
"""

from __future__ import annotations

import re

from phonenumbers import Leniency, PhoneNumberFormat, PhoneNumberMatcher, format_number

from gateway.parse_text import fold

MAX_GUESS_TEXT = 20_000  # characters searched: a report is a few hundred

# An identifier: one token with at least one digit ("SN-7788-AB", "2A3F5", "12345678").
_ID = r"([a-z0-9](?=[a-z0-9./_-]*\d)[a-z0-9./_-]*[a-z0-9])"
_SERIAL_MENTION = re.compile(
    r"\b(?:(?:numer|nr)\.?\s+(?:seryjny|fabryczny)(?:\s+urzadzenia)?|serial(?:\s+(?:number|no\.?|nr))?"
    r"|s\s*/\s*n|sn)(?![a-z0-9])\s*(?:to\s+|jest\s+|is\s+)?[:#=]?\s*" + _ID
)
_COMMCELL_MENTION = re.compile(
    r"\b(?:(?:numer|nr)\.?\s+)?(?:comm\s*cell(?:\s*id)?|commserve\s*id|ccid|cc\s*id)(?![a-z0-9])"
    r"\s*(?:to\s+|jest\s+|is\s+)?[:#=]?\s*" + _ID
)
_CITY = r"[^\W\d_][^\W\d_-]*(?:[ -][^\W\d_][^\W\d_-]*)?"
_ADDRESS = re.compile(
    r"((?:\bul\.?|\bulica|\bal\.|\baleja|\bpl\.|\bplac|\bos\.|\bosiedle)\s*[^\n,;:()]{1,60}?"
    r"\d+[a-z]?(?:\s*/\s*\d+[a-z]?)?\s*,?\s*)?\b(\d{2}-\d{3})\s+(" + _CITY + ")"
)
_NOT_A_PHONE = re.compile(r"\b(?:nip|regon|krs|iban|konto|fax|faks|pesel)\b[^\n]{0,20}$")
# Words after a city that are not part of its name ("31-147 Kraków numer seryjny...").
_CITY_STOP = frozenset({"numer", "nr", "tel", "telefon", "sn", "s", "proszę", "prosze", "i", "oraz"})


def _id_after(pattern: re.Pattern[str], text: str) -> str | None:
    text = text[:MAX_GUESS_TEXT]
    match = pattern.search(fold(text))
    return text[match.start(1) : match.end(1)] if match else None


def serial_in_text(text: str) -> str | None:
    """ "..., numer seryjny SN-7788-AB." -> "SN-7788-AB" (a digit is required)."""
    return _id_after(_SERIAL_MENTION, text)


def commcell_in_text(text: str) -> str | None:
    return _id_after(_COMMCELL_MENTION, text)


def address_in_text(text: str) -> str | None:
    """A Polish postal address in running text: the street (when written before the
    postal code) through the city: "ul. Długa 5, 31-147 Kraków"."""
    text = text[:MAX_GUESS_TEXT]
    match = _ADDRESS.search(fold(text))
    if not match:
        return None
    start = match.start(1) if match.group(1) else match.start(2)
    city = text[match.start(3) : match.end(3)].split()
    if len(city) > 1 and (fold(city[1]) in _CITY_STOP or not city[1][:1].isupper()):
        city = city[:1]  # "Gdańsk nie działa": one word; "Nowy Sącz", "Bielsko-Biała": kept
    end = match.start(3) + len(" ".join(city))
    return text[start:end].strip()


def phone_in_text(text: str, region: str) -> str | None:
    """The first valid phone number anywhere in the text, not a NIP, fax or account."""
    text = text[:MAX_GUESS_TEXT]
    folded = fold(text)
    for match in PhoneNumberMatcher(text, region, leniency=Leniency.VALID, max_tries=50):
        if _NOT_A_PHONE.search(folded[max(0, match.start - 40) : match.start]):
            continue
        return format_number(match.number, PhoneNumberFormat.E164)
    return None
