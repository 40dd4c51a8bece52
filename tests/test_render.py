"""Texts (typed contexts -> pl/en templates), reply subjects, and MIME composition."""

from __future__ import annotations

import email
import email.policy
import re
import shutil
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.model import REQUIRED_FIELDS, Fields, OutAttachment, Outgoing, Status
from gateway.compose import clean_filename, clean_header_text, compose_message, reply_subject
from gateway.texts import (
    EVENTS,
    MISSING_LABELS,
    STATUS_LABELS,
    TEXTS,
    Acknowledgement,
    Common,
    HeldItem,
    Renderer,
    RenderError,
    StaffFile,
    Text,
    attachment_counts,
    customer_value,
    device_id_value,
    format_phone,
    short_text,
)

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
WHEN = datetime(2025, 3, 14, 9, 26, 53, tzinfo=timezone(timedelta(hours=1)))
MSGID = "<123456.abcdef0123@crm.s4e.pl>"

FIELDS = Fields(
    reporter_name="Jan Kowalski",
    reporter_email="jan.kowalski@firma.pl",
    reporter_phone="+48124446500",
    install_address="ul. Długa 5, 31-147 Kraków",
    description="Serwer nie startuje po aktualizacji, na ekranie błąd 0x1F.",
    serial_number="SN-4711-XZ",
    commcell_id=None,
)

# A representative context per event: the fields of its class besides `common` (which
# `make_text` builds: ticket 123456, "Awaria serwera", the default addresses and numbers).
CONTEXTS: dict[str, dict] = {
    "acknowledgement": {"fields": FIELDS, "attachments": 2, "log_attachments": 1,
                        "phone_confirmation_required": True},
    "missing_fields": {"fields": Fields(reporter_name="Jan Kowalski"),
                       "missing": ("reporter_phone", "install_address", "device_id")},
    "status_changed": {"status": Status.IN_PROGRESS,
                       "note": "Wymiana dysku zaplanowana na jutro."},
    "resolved": {"note": None},
    "closed": {"rating": 5, "reason": "rating"},
    "closed_ticket_guidance": {},
    "unknown_ticket_guidance": {},
    "staff_reply": {"message": "Dzień dobry,\nprosimy o przesłanie logów.\n\nAnna Nowak",
                    "status": Status.IN_PROGRESS},
    "held_notice": {},
    "staff_copy": {"fields": FIELDS, "missing": (), "phone_confirmation_required": True,
                   "reporter": "jan.kowalski@firma.pl", "copy_kind": "new",
                   "text": "Serwer nie startuje po aktualizacji, na ekranie błąd 0x1F.",
                   "verdict": "pass: dmarc=pass",
                   "files": (StaffFile(filename="cvlt.log", size=2048, is_log=True,
                                       attached=True),
                             StaffFile(filename="zdjęcie.jpg", size=3 * 1024 * 1024))},
    "rating_request": {},
    "staff_notice": {"problem": "bad_command", "detail": "Status: zrobione: unknown status",
                     "status": Status.IN_PROGRESS},
    "held_digest": {"held": (HeldItem(id=7, sender="obcy@example.com", subject="Re: [#123456]",
                                      reason="sender not authorised for the ticket",
                                      received="2026-12-01 10:15", ticket=123456),)},
}

# Concrete wording the Polish mails must carry.
PL_PHRASES: dict[str, list[str]] = {
    "acknowledgement": ["Szanowni Państwo,",
                        "zostało zarejestrowane pod numerem #123456 i otrzymało status: Przyjęte.",
                        "zachowując numer #123456 w temacie", "serwis@s4e.pl",
                        ("telefoniczne potwierdzenie pod jednym z numerów: "
                         "(0-12) 444-65-00 lub 801 090 101."),
                        "- Imię i nazwisko: Jan Kowalski\n",
                        "- Telefon: +48 12 444 65 00\n",
                        "- Adres instalacji sprzętu: ul. Długa 5, 31-147 Kraków\n",
                        "- Numer seryjny urządzenia: SN-4711-XZ\n",
                        "Otrzymaliśmy 2 załączniki, w tym 1 plik z logami.",
                        "Z poważaniem,\nSerwis S4E\ncrm@s4e.pl"],
    "missing_fields": ["Szanowni Państwo,", "dziękujemy za przesłanie zgłoszenia.",
                       "zarejestrowane pod numerem #123456",
                       "otrzymało status: Oczekuje na uzupełnienie.",
                       "Dane kontaktowe osoby zgłaszającej (telefon)",
                       "Adres instalacji sprzętu – realizacji naprawy",
                       "Numer seryjny urządzenia / numer Commcell ID",
                       "w formie „Etykieta: wartość”, np. „Numer seryjny urządzenia: ABC123”.",
                       "Numer #123456 w temacie wiadomości należy pozostawić bez zmian.",
                       "Z poważaniem,"],
    "status_changed": ["Szanowni Państwo,", "#123456", "W realizacji",
                       "Wymiana dysku zaplanowana na jutro.", "Z poważaniem,"],
    "resolved": ["Szanowni Państwo,", "#123456", "Rozwiązane", "Ocena: 5", "od 1 do 5",
                 "problem nadal występuje", "Z poważaniem,"],
    "closed": ["Szanowni Państwo,", "zgłoszenie #123456 otrzymało status: Zamknięte.",
               "Dziękujemy za ocenę realizacji zgłoszenia: 5/5.",
               "nie będą już trafiały do systemu zgłoszeń serwisowych",
               "wyłącznie na adres serwis@s4e.pl", "Z poważaniem,"],
    "closed_ticket_guidance": ["Szanowni Państwo,", "#123456", "zostało już zamknięte",
                               "nie została do niego dołączona",
                               "w tym awarie związane z zamkniętym zgłoszeniem",
                               "wyłącznie na adres serwis@s4e.pl",
                               "Imię i nazwisko osoby zgłaszającej problem"],
    "unknown_ticket_guidance": ["Szanowni Państwo,", "serwis@s4e.pl",
                                "1. Imię i nazwisko osoby zgłaszającej problem;",
                                "2. Dane kontaktowe osoby zgłaszającej (mail, telefon);",
                                "3. Adres instalacji sprzętu – realizacji naprawy;",
                                "4. Opis problemu;",
                                "5. Numer seryjny urządzenia / numer Commcell ID;",
                                "6. Logi z urządzenia, o ile są dostępne.",
                                "pod jednym z numerów: (0-12) 444-65-00 lub 801 090 101.",
                                "w temacie wiadomości"],
    "staff_reply": ["prosimy o przesłanie logów", "Zgłoszenie #123456", "W realizacji",
                    "Odpowiadając, prosimy zachować numer #123456 w temacie wiadomości.",
                    "\n-- \n"],
    "held_notice": ["Szanowni Państwo,", "nie mogła zostać automatycznie dodana",
                    "serwis@s4e.pl", "Z poważaniem,\nSerwis S4E\ncrm@s4e.pl"],
    "staff_copy": ["PILNE", "#123456", "Przyjęte", "jan.kowalski@firma.pl",
                   "Serwer nie startuje po aktualizacji", "weryfikacja nadawcy: pass: dmarc=pass",
                   "Załączniki (2):\n- cvlt.log, 2 KB, plik z logami – w załączeniu\n"
                   "- zdjęcie.jpg, 3.0 MB\n", "Treść wiadomości klienta:",
                   "trafi do klienta w wątku zgłoszenia #123456"],
    "rating_request": ["Szanowni Państwo,", "#123456", "Rozwiązane", "Ocena: 5",
                       "jedną liczbą całkowitą od 1 do 5", "Z poważaniem,"],
    "staff_notice": ["#123456", "żadne polecenie nie zostało wykonane",
                     "Szczegóły: Status: zrobione: unknown status",
                     "Obecny status zgłoszenia: W realizacji.", "#wewnętrzne"],
    "held_digest": ["Wiadomości wstrzymane do decyzji operatora: 1",
                    "7. 2026-12-01 10:15 od obcy@example.com, zgłoszenie #123456",
                    "Powód: sender not authorised", "s4e-gateway held release ID"],
}

EN_PHRASES: dict[str, list[str]] = {
    "acknowledgement": ["Dear Sir or Madam,", "#123456", "Accepted", "serwis@s4e.pl",
                        "keep the number #123456 in the subject",
                        "at one of these numbers: (0-12) 444-65-00 or 801 090 101.",
                        "- Phone: +48 12 444 65 00\n",
                        "We received 2 attachments, including 1 log file.",
                        "Kind regards,\nS4E Service Desk"],
    "missing_fields": ["Dear Sir or Madam,", "Awaiting information",
                       "Serial number / CommCell ID",
                       'in the form "Label: value", e.g. "Serial number: ABC123"'],
    "status_changed": ["Dear Sir or Madam,", "In progress"],
    "resolved": ["Resolved", "Rating: 5", "If the problem persists"],
    "closed": ["Closed", "Thank you for your rating", "serwis@s4e.pl only"],
    "closed_ticket_guidance": ["Ticket #123456 has already been closed", "has not been added",
                               "serwis@s4e.pl only"],
    "unknown_ticket_guidance": ["could not match", "serwis@s4e.pl", "6. Logs from the device"],
    "staff_reply": ["Ticket #123456", "In progress",
                    "When replying, please keep #123456 in the subject."],
    "held_notice": ["Dear Sir or Madam,", "could not be added", "serwis@s4e.pl"],
    "staff_copy": ["URGENT", "#123456", "Serwer nie startuje", "sender verification: pass",
                   "- cvlt.log, 2 KB, log file – attached\n"],
    "rating_request": ["Dear Sir or Madam,", "#123456", "Rating: 5", "one whole number"],
    "staff_notice": ["#123456", "no command was applied", "#internal"],
    "held_digest": ["Messages held for an operator: 1", "Reason: sender not authorised"],
}


@pytest.fixture(scope="module", params=["pl", "en"])
def renderer(request) -> Renderer:
    return Renderer(TEMPLATES, request.param)


@pytest.fixture(scope="module")
def pl() -> Renderer:
    return Renderer(TEMPLATES, "pl")


@pytest.fixture(scope="module")
def en() -> Renderer:
    return Renderer(TEMPLATES, "en")


COMMON_KEYS = frozenset({"number", "subject", "intake", "crm", "phone_numbers"})


def make_text(event: str, **extra) -> Text:
    """`event`'s representative context with `extra` replacing fields (common ones too)."""
    common: dict = {"number": 123456, "subject": "Awaria serwera"}
    values = dict(CONTEXTS[event])
    for key, value in extra.items():
        (common if key in COMMON_KEYS else values)[key] = value
    return TEXTS[event](Common(**common), **values)


def render(r: Renderer, event: str, **extra) -> str:
    return r.render(make_text(event, **extra))


def missing(event: str, *names: str) -> dict:
    """`missing=names` for the event that has it (missing_fields), nothing otherwise."""
    return {"missing": names} if event == "missing_fields" else {}


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize("event", EVENTS)
def test_every_event_renders_cleanly(renderer: Renderer, event: str) -> None:
    body = render(renderer, event)
    assert "{{" not in body and "{%" not in body and "}}" not in body
    assert "None" not in body
    assert body.endswith("\n") and not body.endswith("\n\n")
    assert "\n\n\n" not in body
    assert all(line == line.rstrip() or line == "-- " for line in body.splitlines())


@pytest.mark.parametrize("event", EVENTS)
def test_polish_wording(pl: Renderer, event: str) -> None:
    body = render(pl, event)
    for phrase in PL_PHRASES[event]:
        assert phrase in body, (event, phrase)


@pytest.mark.parametrize("event", EVENTS)
def test_english_wording(en: Renderer, event: str) -> None:
    body = render(en, event)
    for phrase in EN_PHRASES[event]:
        assert phrase in body, (event, phrase)
    assert "Szanowni" not in body and "Zgłoszenie" not in body


@pytest.mark.parametrize("status", list(Status))
def test_status_changed_names_each_status(renderer: Renderer, status: Status) -> None:
    body = render(renderer, "status_changed", status=status, note=None)
    assert STATUS_LABELS[renderer.language][status] in body
    assert "None" not in body


def test_polish_status_labels_match_spec() -> None:
    assert [STATUS_LABELS["pl"][s] for s in Status] == [
        "Oczekuje na uzupełnienie", "Przyjęte", "W realizacji", "Rozwiązane", "Zamknięte"]


def test_every_required_field_has_the_procedures_label(pl: Renderer) -> None:
    assert set(MISSING_LABELS["pl"]) == set(REQUIRED_FIELDS) == set(MISSING_LABELS["en"])
    body = render(pl, "missing_fields", missing=REQUIRED_FIELDS, fields=Fields())
    for label in ("Imię i nazwisko osoby zgłaszającej problem",
                  "Dane kontaktowe osoby zgłaszającej (telefon)",
                  "Adres instalacji sprzętu – realizacji naprawy", "Opis problemu",
                  "Numer seryjny urządzenia / numer Commcell ID"):
        assert f"- {label}\n" in body
    assert "Otrzymane dotychczas dane" not in body  # nothing received: no empty list


def test_acknowledgement_never_carries_the_description(renderer: Renderer) -> None:
    secret = "KLIKNIJ http://evil.example/login i podaj hasło " * 50
    fields = replace(FIELDS, description=secret)
    for event in ("acknowledgement", "missing_fields"):
        body = render(renderer, event, fields=fields, **missing(event, "device_id"))
        assert "KLIKNIJ" not in body and "evil.example" not in body


WITHHELD = {"pl": "(podano)", "en": "(provided)"}
CUSTOMER_EVENTS = ("acknowledgement", "missing_fields")


def test_acknowledgement_withholds_a_malicious_field(renderer: Renderer) -> None:
    evil = ("Jan\r\nBcc: x@evil.example\n\nZapłać na konto http://evil.example/pay\u2028"
            + "A" * 5000)
    fields = replace(FIELDS, reporter_name=evil, install_address=evil, serial_number=evil,
                     commcell_id=evil, reporter_phone=evil, reporter_email=evil)
    count, logs = attachment_counts([evil] * 3)
    for event in CUSTOMER_EVENTS:
        body = render(renderer, event, fields=fields, **missing(event, "description"),
                      attachments=count, log_attachments=logs)
        assert "Bcc" not in body and "\u2028" not in body and "evil" not in body
        assert "Zapłać" not in body and "AAAA" not in body
        assert body.count(WITHHELD[renderer.language]) == 6, body


@pytest.mark.parametrize("value", [
    "Prosimy o wpłatę na rachunek PL61 1090 1014 0000 0712 1981 2874",
    "PL61109010140000071219812874",
    "pl61-1090-1014-0000-0712-1981-2874",
    "DE89 3704 0044 0532 0130 00",
    "GB29 NWBK 6016 1331 9268 19",
    "61 1090 1014 0000 0712 1981 2874",  # a Polish account number without "PL"
    "Szczegóły: http://evil.example",
    "HTTPS://EVIL.EXAMPLE",
    "evil.example/pay",
    "bit.ly/abc",
    "www.evil.example",
    "ＷＷＷ．evil．example",  # fullwidth
    "h\u200bttp://evil.example",  # a zero-width space hides nothing
    "ftp://files.example",
    "x" * 81,
])
def test_customer_value_withholds_links_accounts_and_long_text(renderer: Renderer,
                                                              value: str) -> None:
    withheld = WITHHELD[renderer.language]
    assert customer_value(value, withheld) == withheld
    for name in ("reporter_name", "install_address", "reporter_email", "reporter_phone",
                 "serial_number", "commcell_id"):
        body = render(renderer, "acknowledgement", fields=Fields(**{name: value}))
        assert f": {withheld}\n" in body, (name, body)
        assert value not in body


@pytest.mark.parametrize("value", [
    "Jan Kowalski", "Zażółć Gęślą-Jaźń", "ul. Długa 5/7, 31-147 Kraków",
    "al. Jana Pawła II 12, 00-001 Warszawa", "jan.kowalski@firma.pl", "+48 601 234 567",
    "Budynek B2, piętro 3, serwerownia 3.14", "x" * 80,
])
def test_customer_value_keeps_ordinary_values(value: str) -> None:
    assert customer_value(value) == value
    assert customer_value(f"  {value}\r\n") == value


def test_customer_value_basics() -> None:
    assert customer_value(None) == "" and customer_value("  \r\n") == ""
    assert customer_value("Jan\u200b Kowalski\u00ad") == "Jan Kowalski"
    assert customer_value("Jan\r\nKowalski") == "Jan Kowalski"
    assert customer_value("x" * 41, "(podano)", 40) == "(podano)"


@pytest.mark.parametrize("value, shown", [
    ("SN-4711-XZ", "SN-4711-XZ"),
    ("2A3F1", "2A3F1"),
    ("CZ1234 ABC/7.1_x", "CZ1234 ABC/7.1_x"),
    ("A" * 40, "A" * 40),
    ("A" * 41, "(podano)"),
    ("-SN1", "(podano)"),  # must start with a letter or digit
    ("SN: 123", "(podano)"),
    ("SN#1", "(podano)"),
    ("Numer ŻÓŁW-1", "(podano)"),
    ("www.evil.pl", "(podano)"),  # fits the pattern, still a link
    ("PL61 1090 1014 0000 0712 1981 2874", "(podano)"),  # fits the pattern, an IBAN
    (None, ""),
])
def test_device_ids_are_printed_only_when_they_look_like_one(value, shown) -> None:
    assert device_id_value(value) == shown
    assert device_id_value(value, "(provided)") == shown.replace("(podano)", "(provided)")


def test_serial_and_commcell_in_the_acknowledgement(pl: Renderer) -> None:
    body = render(pl, "acknowledgement",
                  fields=replace(FIELDS, serial_number="SN 1/2", commcell_id="zadzwoń: 123"))
    assert "- Numer seryjny urządzenia: SN 1/2\n" in body
    assert "- Numer Commcell ID: (podano)\n" in body and "zadzwoń" not in body


@pytest.mark.parametrize("raw, shown", [
    ("+48601234567", "+48 601 234 567"),
    ("+48124446500", "+48 12 444 65 00"),
    ("+442079460000", "+44 20 7946 0000"),
    ("601 234 567", "601 234 567"),  # not E.164: as it is
    ("+48 601 234 567", "+48 601 234 567"),
    ("+4812", "+4812"),  # too short to be a number
    ("tel. 601234567 wew. 12", "tel. 601234567 wew. 12"),
    ("+48601234567\r\n", "+48 601 234 567"),
    (None, ""),
])
def test_phone_filter(raw, shown) -> None:
    assert format_phone(raw) == shown


def test_phone_is_formatted_in_customer_mails(renderer: Renderer) -> None:
    for event in CUSTOMER_EVENTS:
        body = render(renderer, event, fields=Fields(reporter_phone="+48601234567"),
                      **missing(event, "device_id"))
        assert "+48 601 234 567\n" in body and "+48601234567" not in body


def test_short_filter() -> None:
    assert short_text("  a\r\n\tb\x00c  ") == "a b c"
    assert short_text(None) == ""
    assert short_text("x" * 500) == "x" * 79 + "…"
    assert len(short_text("x" * 500, 40)) == 40
    # a combining mark is never separated from its letter
    assert short_text("a" * 78 + "e\u0301" + "b" * 10) == "a" * 78 + "…"


def test_acknowledgement_accepts_model_fields(pl: Renderer) -> None:
    body = pl.render(Acknowledgement(Common(number=123456),
                                     fields=Fields(reporter_name="Ewa Nowak")))
    assert "Ewa Nowak" in body and "#123456" in body and "None" not in body


@pytest.mark.parametrize("event", CUSTOMER_EVENTS)
def test_attachments_are_counted_never_named(pl: Renderer, event: str) -> None:
    body = render(pl, event, attachments=3, log_attachments=2)
    assert "Otrzymaliśmy 3 załączniki, w tym 2 pliki z logami.\n" in body
    for logs in (None, 0):
        body = render(pl, event, attachments=3, log_attachments=logs)
        assert "Otrzymaliśmy 3 załączniki.\n" in body
    count, logs = attachment_counts([])
    assert "załącznik" not in render(pl, event, attachments=count, log_attachments=logs)
    assert "załącznik" not in render(pl, event, attachments=0, log_attachments=0)
    # A list of names is counted; the names never reach the customer (only a count can).
    names = ["Wpłać na PL61109010140000071219812874.log", "www.evil.example.png"]
    count, logs = attachment_counts(names)
    assert (count, logs) == (2, None)
    body = render(pl, event, attachments=count, log_attachments=logs)
    assert "Otrzymaliśmy 2 załączniki.\n" in body
    assert "evil" not in body and "PL61" not in body and "Wpłać" not in body


def test_attachment_objects_give_the_log_count(en: Renderer) -> None:
    from gateway.model import Attachment

    files = [Attachment(filename="cvd.log", content_type="text/plain", data=b"x", size=1,
                        sha256="0" * 64, is_log=True),
             Attachment(filename="x.png", content_type="image/png", data=b"x", size=1,
                        sha256="0" * 64, is_log=False)]
    count, logs = attachment_counts(files)
    body = render(en, "acknowledgement", attachments=count, log_attachments=logs)
    assert "We received 2 attachments, including 1 log file.\n" in body and "cvd.log" not in body
    rows = [{"filename": "a.log", "is_log": 1}, {"filename": "b.log", "is_log": 1}]
    count, logs = attachment_counts(rows)
    body = render(en, "missing_fields", attachments=count, log_attachments=logs)
    assert "We received 2 attachments, including 2 log files.\n" in body and "a.log" not in body
    # an explicit count wins
    assert "including 1 log file." in render(en, "acknowledgement", attachments=count,
                                             log_attachments=1)
    copy = render(en, "staff_copy", files=tuple(
        StaffFile(filename=str(r["filename"]), size=10, is_log=bool(r["is_log"])) for r in rows))
    assert "Attachments (2):\n- a.log, 10 B, log file\n- b.log, 10 B, log file\n" in copy


def test_staff_copy_lists_files_with_sizes(pl: Renderer) -> None:
    files = (StaffFile(filename="../../etc/passwd\u202egol.exe", size=5 * 1024 * 1024 + 1),)
    body = render(pl, "staff_copy", files=files)
    assert "Załączniki (1):\n- _.._etc_passwd gol.exe, 5.0 MB\n" in body
    assert "Załączniki: brak\n\n" in render(pl, "staff_copy", files=())


@pytest.mark.parametrize("kind, heading", [
    ("new", "Nowe zgłoszenie #123456"),
    ("follow_up", "Nowa wiadomość klienta w zgłoszeniu #123456"),
    ("reply_unrated", "Odpowiedź klienta na rozwiązane zgłoszenie #123456 (bez oceny)")])
def test_staff_copy_says_what_arrived(pl: Renderer, kind: str, heading: str) -> None:
    body = render(pl, "staff_copy", copy_kind=kind)
    assert body.splitlines()[2] == heading + ", status: Przyjęte"
    assert ("Imię i nazwisko: Jan Kowalski" in body) == (kind == "new")


def test_phone_confirmation_only_when_required(pl: Renderer) -> None:
    asked = render(pl, "acknowledgement", phone_confirmation_required=True,
                   phone_numbers=("(0-12) 444-65-00", "801 090 101"))
    assert "telefoniczne potwierdzenie" in asked and "801 090 101" in asked
    quiet = render(pl, "acknowledgement", phone_confirmation_required=False)
    assert "telefoniczne" not in quiet and "801 090 101" not in quiet
    no_numbers = render(pl, "acknowledgement", phone_numbers=())
    assert "prosimy o jego telefoniczne potwierdzenie. W rozmowie" in no_numbers
    one = render(pl, "acknowledgement", phone_numbers=("801 090 101",))
    assert "telefoniczne potwierdzenie pod numerem 801 090 101." in one
    three = render(pl, "acknowledgement", phone_numbers=("1", "2", "3"))
    assert "pod jednym z numerów: 1, 2 lub 3." in three


def test_missing_fields_again(renderer: Renderer) -> None:
    first = render(renderer, "missing_fields")
    again = render(renderer, "missing_fields", again=True)
    if renderer.language == "pl":
        assert "dziękujemy za przesłanie zgłoszenia" in first
        assert ("dziękujemy za uzupełnienie zgłoszenia #123456. "
                "Do jego przyjęcia nadal brakuje następujących informacji:\n") in again
        assert "zarejestrowane" not in again and "przesłanie" not in again
    else:
        assert "Thank you for your report" in first
        assert ("Thank you for the additional information on ticket #123456. "
                "The following is still missing") in again
        assert "registered" not in again and "Thank you for your report" not in again
    for label in MISSING_LABELS[renderer.language].values():
        if label in first:
            assert f"- {label}\n" in again


@pytest.mark.parametrize("language", ["pl", "en"])
def test_missing_labels_are_read_back_by_the_parser(language: str) -> None:
    """missing_fields asks for "Label: value": answering with the labels must work."""
    from gateway.parse_fields import build_fields, read_labels

    values = {"reporter_name": "Jan Kowalski", "reporter_phone": "601 234 567",
              "install_address": "ul. Długa 5, 31-147 Kraków",
              "description": "Serwer nie startuje.", "device_id": "ABC123"}
    body = "".join(f"{MISSING_LABELS[language][k]}: {v}\n" for k, v in values.items())
    fields = build_fields(read_labels(body), "x@example.com", "", "PL")
    assert (fields.reporter_name, fields.reporter_phone, fields.install_address,
            fields.description, fields.serial_number) == (
        "Jan Kowalski", "+48601234567", "ul. Długa 5, 31-147 Kraków", "Serwer nie startuje.",
        "ABC123")
    example = build_fields(read_labels("Numer seryjny urządzenia: ABC123\nSerial number: X\n"),
                           "x@example.com", "", "PL")
    assert example.serial_number in ("ABC123", "X")


@pytest.mark.parametrize("days, pl_text, en_text", [
    (1, "Jeżeli nie otrzymamy jej w ciągu 1 dnia, zamknięcie nastąpi automatycznie.",
     "If we do not receive it within 1 day, this will happen automatically."),
    (2, "w ciągu 2 dni,", "within 2 days,"),
    (5, "w ciągu 5 dni,", "within 5 days,"),
    (14, "w ciągu 14 dni,", "within 14 days,"),
    (22, "w ciągu 22 dni,", "within 22 days,"),
])
def test_resolved_names_the_rating_window(pl: Renderer, en: Renderer, days, pl_text,
                                          en_text) -> None:
    assert pl_text in render(pl, "resolved", rating_window_days=days)
    assert en_text in render(en, "resolved", rating_window_days=days)


def test_resolved_without_rating_window(renderer: Renderer) -> None:
    body = render(renderer, "resolved", rating_window_days=None)
    assert "automaty" not in body and "automatically" not in body
    assert body == render(renderer, "resolved")


def test_acknowledgement_accepted_by_staff(renderer: Renderer) -> None:
    # Staff accepted an incomplete report by hand: some fields are None.
    fields = replace(FIELDS, serial_number=None, commcell_id=None, install_address=None)
    body = render(renderer, "acknowledgement", fields=fields, accepted_by_staff=True,
                  phone_confirmation_required=False)
    assert "None" not in body and "\n\n\n" not in body
    if renderer.language == "pl":
        assert ("serwis S4E przyjął Państwa zgłoszenie #123456 do realizacji. "
                "Status zgłoszenia: Przyjęte.") in body
        assert "brak" not in body.lower() and "zarejestrowane" not in body
        assert "Numer seryjny" not in body and "Adres instalacji" not in body
    else:
        assert "has accepted your report #123456 for processing" in body
        assert "missing" not in body.lower() and "registered" not in body
    assert render(renderer, "acknowledgement", accepted_by_staff=False) == render(
        renderer, "acknowledgement")


def test_held_notice_is_content_free(renderer: Renderer) -> None:
    held_notice = TEXTS["held_notice"]
    base = renderer.render(held_notice(Common()))
    variants = [
        Common(number=123456),
        Common(number=None, subject="Re: [#123456] Awaria"),
        Common(number=654321, subject="tajne"),
    ]
    for common in variants:
        assert renderer.render(held_notice(common)) == base
    # It has nothing else to print: anything more is refused where it is built.
    for key, value in [("status", "closed"), ("fields", FIELDS), ("note", "tajne"),
                       ("message", "tajne"), ("rating", 5), ("attachments", 1)]:
        with pytest.raises(TypeError):
            held_notice(Common(number=654321), **{key: value})
    assert "#" not in base and "123456" not in base
    for label in STATUS_LABELS[renderer.language].values():
        assert label not in base


def test_unknown_ticket_guidance_never_names_a_ticket(renderer: Renderer) -> None:
    guidance = TEXTS["unknown_ticket_guidance"]
    body = renderer.render(guidance(Common(number=654321, subject="[#654321] x")))
    assert "654321" not in body
    assert body == renderer.render(guidance(Common()))


def test_closed_ticket_guidance_without_a_number(pl: Renderer) -> None:
    body = pl.render(TEXTS["closed_ticket_guidance"](Common(number=None)))
    assert "#" not in body and "zostało już zamknięte" in body and "serwis@s4e.pl" in body


@pytest.mark.parametrize("reason, phrase", [
    ("staff", "status: Zamknięte.\nZamknięcia dokonał serwis S4E.\n"),
    ("rating_window", ("nie otrzymaliśmy oceny realizacji zgłoszenia, zamknięcie nastąpiło "
                       "automatycznie.")),
    (None, "status: Zamknięte.\n\nUwaga!"),
])
def test_closed_without_rating(pl: Renderer, reason, phrase) -> None:
    body = render(pl, "closed", rating=None, reason=reason, note=None)
    assert phrase in body and "Dziękujemy za ocenę" not in body and "None" not in body
    assert "Dziękujemy za skorzystanie z usług serwisu S4E." in body


def test_closed_keeps_the_procedures_warning(renderer: Renderer) -> None:
    for reason in (None, "staff", "rating_window", "rating"):
        body = render(renderer, "closed", reason=reason, rating=4 if reason == "rating" else None)
        if renderer.language == "pl":
            assert body.count("amknię") <= 3, body  # no "zamknięte" three times over
            assert ("Wiadomości wysyłane na adres crm@s4e.pl z numerem #123456 nie będą już "
                    "trafiały do systemu zgłoszeń serwisowych.") in body
            assert ("Kolejne awarie, również te związane z tym zgłoszeniem, prosimy zgłaszać "
                    "wyłącznie na adres serwis@s4e.pl.") in body
        else:
            assert "will no longer enter the service ticket system" in body
            assert "including ones related to this ticket, to serwis@s4e.pl only" in body


def test_staff_text_is_rendered_as_is(pl: Renderer) -> None:
    note = "Linia 1\nLinia 2 <b>nie HTML</b> & {{ nie szablon }}"
    body = render(pl, "status_changed", note=note)
    assert note in body
    body = render(pl, "staff_reply", message=note)
    assert body.startswith(note + "\n")


def test_staff_copy_without_urgency(pl: Renderer) -> None:
    body = render(pl, "staff_copy", phone_confirmation_required=False, missing=("device_id",))
    assert "PILNE" not in body and "Oczekuje na uzupełnienie" in body
    assert "Numer seryjny urządzenia / numer Commcell ID" in body


# The fields an event cannot be built without (besides `common`).
REQUIRED: dict[str, dict] = {"missing_fields": {"missing": ("device_id",)},
                             "status_changed": {"status": Status.ACCEPTED},
                             "staff_reply": {"message": "x"}, "staff_copy": {"copy_kind": "new"},
                             "staff_notice": {"problem": "empty"}}
LEAVE_OUT = object()


@pytest.mark.parametrize("event, context, error", [
    ("acknowledgement", {"number": None}, RenderError),
    ("acknowledgement", {"number": "12345"}, RenderError),
    ("acknowledgement", {"number": "123456"}, RenderError),  # a number, not its text
    ("acknowledgement", {"number": 1234567}, RenderError),
    ("acknowledgement", {"phone_confirmation_requried": True}, TypeError),
    ("acknowledgement", {"fields": {"password": "x"}}, RenderError),
    ("status_changed", {"status": LEAVE_OUT}, TypeError),
    ("status_changed", {"status": "lost"}, RenderError),
    ("missing_fields", {"missing": ()}, RenderError),
    ("missing_fields", {"missing": ("shoe_size",)}, RenderError),
    ("missing_fields", {"missing": LEAVE_OUT}, TypeError),
    ("closed", {"rating": 6}, RenderError),
    ("closed", {"reason": "bored"}, RenderError),
    ("staff_reply", {"message": "  "}, RenderError),
    ("resolved", {"ticket": "#654321"}, TypeError),
    ("resolved", {"rating_window_days": 0}, RenderError),
    ("resolved", {"rating_window_days": True}, RenderError),
    ("resolved", {"rating_window_days": "14"}, RenderError),
    ("acknowledgement", {"attachments": -1}, RenderError),
    ("acknowledgement", {"attachments": True}, RenderError),
    ("acknowledgement", {"attachments": "a.log"}, RenderError),
    ("acknowledgement", {"attachments": 2, "log_attachments": 3}, RenderError),
    ("acknowledgement", {"attachments": 2, "log_attachments": -1}, RenderError),
    ("missing_fields", {"missing": ("device_id",), "log_attachments": 1}, RenderError),
    ("acknowledgement", {"againn": True}, TypeError),
    ("held_notice", {"fields": FIELDS}, TypeError),
    ("staff_copy", {"copy_kind": "later"}, RenderError),
    ("staff_copy", {"linked": 1234567}, RenderError),
    ("staff_notice", {"problem": "bored"}, RenderError),
    ("staff_notice", {"status": "lost"}, RenderError),
])
def test_bad_context_is_refused_where_it_is_built(event, context, error) -> None:
    common = {"number": 123456, **{k: v for k, v in context.items() if k in COMMON_KEYS}}
    values = {**REQUIRED.get(event, {}),
              **{k: v for k, v in context.items() if k not in COMMON_KEYS}}
    values = {k: v for k, v in values.items() if v is not LEAVE_OUT}
    with pytest.raises(error):
        TEXTS[event](Common(**common), **values)


def test_render_takes_only_a_text(pl: Renderer) -> None:
    for wrong in ("acknowledgement", {"number": 123456}, Common(number=123456)):
        with pytest.raises(RenderError):
            pl.render(wrong)  # type: ignore[arg-type]


def _copy_templates(tmp_path: Path) -> Path:
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATES, target)
    return target


def test_missing_template_fails_at_construction(tmp_path: Path) -> None:
    root = _copy_templates(tmp_path)
    (root / "pl" / "held_notice.txt.j2").unlink()
    with pytest.raises(ValueError, match="held_notice.txt.j2"):
        Renderer(root, "pl")


def test_broken_template_fails_at_construction(tmp_path: Path) -> None:
    root = _copy_templates(tmp_path)
    (root / "en" / "closed.txt.j2").write_text("{% if %}\n", encoding="utf-8")
    with pytest.raises(RenderError, match="closed.txt.j2"):
        Renderer(root, "en")


def test_template_cannot_print_the_description_to_a_customer(tmp_path: Path) -> None:
    root = _copy_templates(tmp_path)
    path = root / "pl" / "acknowledgement.txt.j2"
    path.write_text(path.read_text(encoding="utf-8") + "{{ fields.description }}\n",
                    encoding="utf-8")
    with pytest.raises(RenderError, match="acknowledgement"):
        Renderer(root, "pl")


def test_unknown_language_is_refused() -> None:
    with pytest.raises(ValueError):
        Renderer(TEMPLATES, "../pl")


def test_rendering_reads_nothing_after_construction(tmp_path: Path) -> None:
    root = _copy_templates(tmp_path)
    r = Renderer(root, "pl")
    shutil.rmtree(root)
    for event in EVENTS:
        assert render(r, event)


def test_html_templates_would_be_escaped(pl: Renderer) -> None:
    autoescape = pl._env.autoescape
    assert autoescape("notice.html.j2") and autoescape("notice.html")
    assert not autoescape("acknowledgement.txt.j2")


# --------------------------------------------------------------------------- subjects


def test_clean_header_text() -> None:
    assert clean_header_text("Awaria\r\nBcc: x@evil.example") == "Awaria Bcc: x@evil.example"
    assert clean_header_text("a\x00b\x85c\u2028d\u2029e\x1bf\x7fg\x9fh") == "a b c d e f g h"
    assert clean_header_text("  a \t\t b  ") == "a b"
    assert clean_header_text("plik\u202egpj.exe") == "plik gpj.exe"
    assert clean_header_text("\udcff") == ""
    assert clean_header_text(None) == ""


@pytest.mark.parametrize("original, expected", [
    ("Awaria serwera", "[#123456] Awaria serwera"),
    ("Re: [#123456] Awaria", "Re: [#123456] Awaria"),
    ("RE: Odp: AW: #123456 awaria", "RE: Odp: AW: #123456 awaria"),
    ("Re: [#654321] Awaria", "[#123456] Re: [#654321] Awaria"),
    ("Zamówienie #1234567", "[#123456] Zamówienie #1234567"),
    ("", "[#123456] Zgłoszenie serwisowe"),
    ("  \r\n ", "[#123456] Zgłoszenie serwisowe"),
    ("Awaria\r\nBcc: x@evil.example", "[#123456] Awaria Bcc: x@evil.example"),
    ("=?UTF-8?Q?Awaria_dysku_=C5=BC?=", "[#123456] Awaria dysku ż"),
    ("=?UTF-8?Q?=0A?=Bcc: x@evil.example", "[#123456] Bcc: x@evil.example"),
])
def test_reply_subject(original: str, expected: str) -> None:
    assert reply_subject(123456, original) == expected


def test_reply_subject_languages_and_no_number() -> None:
    assert reply_subject(123456, "", language="en") == "[#123456] Service request"
    assert reply_subject(None, "Re:  Awaria\n") == "Re: Awaria"
    assert reply_subject(None, "") == "Zgłoszenie serwisowe"
    assert reply_subject(42, "x") == "[#000042] x"
    with pytest.raises(ValueError):
        reply_subject(1234567, "x")
    with pytest.raises(ValueError):
        reply_subject(123456, "x", language="de")


def test_reply_subject_is_cut_on_a_character_boundary() -> None:
    long = "Zażółć gęślą jaźń " * 300
    subject = reply_subject(123456, long)
    assert len(subject) <= 200 and subject.startswith("[#123456] Zażółć")
    assert subject.endswith("…")
    subject = reply_subject(123456, long, max_len=60)
    assert len(subject) <= 60
    # a token that would fall off the end is not trusted to be there: prefix it
    buried = "Re: " + "x" * 300 + " [#123456]"
    assert reply_subject(123456, buried).startswith("[#123456] Re: xxx")


def test_reply_subject_neutralises_nested_encoded_words() -> None:
    # Decodes once to "=?UTF-8?Q?=0A?=Bcc: ..." which must not decode again later.
    twice = "=?UTF-8?Q?=3D=3FUTF-8=3FQ=3F=3D0A=3F=3D?=Bcc: x@evil.example"
    subject = reply_subject(123456, twice)
    assert "=?" not in subject and "\n" not in subject


# --------------------------------------------------------------------------- MIME


def outgoing(**overrides) -> Outgoing:
    values = dict(
        kind="acknowledgement", ticket=123456, to="jan.kowalski@firma.pl",
        subject=reply_subject(123456, "Awaria serwera – pilne"),
        body="Szanowni Państwo,\n\nzgłoszenie #123456 zostało przyjęte.\n",
        in_reply_to="<CAF=abc+1@mail.gmail.com>",
        references=("<root@firma.pl>", "<CAF=abc+1@mail.gmail.com>"),
    )
    values.update(overrides)
    return Outgoing(**values)


def compose(out: Outgoing, **kwargs) -> bytes:
    return compose_message(out, from_addr="crm@s4e.pl", message_id=MSGID, date=WHEN, **kwargs)


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def header_lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_compose_headers_and_body_round_trip() -> None:
    out = outgoing()
    raw = compose(out)
    msg = parse(raw)
    assert msg["From"] == "Serwis S4E <crm@s4e.pl>"
    assert msg["Reply-To"] == "crm@s4e.pl"
    assert msg["To"] == "jan.kowalski@firma.pl"
    assert msg["Subject"] == out.subject == "[#123456] Awaria serwera – pilne"
    assert msg["Message-ID"] == MSGID
    assert msg["In-Reply-To"] == "<CAF=abc+1@mail.gmail.com>"
    assert msg["References"] == "<root@firma.pl> <CAF=abc+1@mail.gmail.com>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["MIME-Version"] == "1.0"
    assert "Importance" not in msg and "X-Priority" not in msg
    assert parsedate_to_datetime(msg["Date"]) == WHEN
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert msg.get_content().replace("\r\n", "\n") == out.body
    assert b"\r\n" in raw and raw.count(b"\n") == raw.count(b"\r\n")
    assert raw.isascii()  # 7-bit clean: RFC 2047 headers, quoted-printable body
    assert b"\r\nSubject: [#123456] Awaria serwera =?utf-8?q?=E2=80=93?= pilne\r\n" in raw


def test_compose_staff_reply_and_urgent() -> None:
    msg = parse(compose(outgoing(kind="staff_reply", auto=False, urgent=True),
                        from_name="Serwis S4E – Anna Nowak"))
    assert "Auto-Submitted" not in msg and "X-Auto-Response-Suppress" not in msg
    assert msg["Importance"] == "high" and msg["X-Priority"] == "1"
    assert msg["From"].addresses[0].display_name == "Serwis S4E – Anna Nowak"
    assert msg["From"].addresses[0].addr_spec == "crm@s4e.pl"


def test_compose_without_thread() -> None:
    msg = parse(compose(outgoing(in_reply_to="", references=())))
    assert "In-Reply-To" not in msg and "References" not in msg


def test_references_are_validated_deduplicated_and_capped() -> None:
    refs = ("<root@x>", "no-brackets@x", "<a b@x>", "<a\r\nBcc: x@evil.example>",
            "<=?utf-8?q?=0A?=@x>", "<parent@x>", "<root@x>") + tuple(
                f"<m{i}@x>" for i in range(20))
    msg = parse(compose(outgoing(references=refs, in_reply_to="<parent@x>")))
    ids = str(msg["References"]).split()
    assert ids[0] == "<root@x>" and ids[-1] == "<parent@x>"
    assert len(ids) == 10 and len(set(ids)) == 10
    assert ids[1:-1] == [f"<m{i}@x>" for i in range(12, 20)]
    assert msg["In-Reply-To"] == "<parent@x>"
    bad = parse(compose(outgoing(in_reply_to="<x@y>\r\nBcc: a@b", references=())))
    assert "In-Reply-To" not in bad and "References" not in bad and "Bcc" not in bad


def test_long_message_ids_are_folded_not_encoded() -> None:
    refs = tuple(f"<{'r' * 100}{i}@x>" for i in range(3))
    parent = "<" + "p" * 200 + "@x>"
    raw = compose(outgoing(references=refs, in_reply_to=parent))
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"=?" not in head.split(b"\r\nReferences:")[1].split(b"\r\nAuto-Submitted")[0]
    msg = parse(raw)
    assert msg["In-Reply-To"] == parent
    assert str(msg["References"]).split() == [*refs, parent]


def test_attachments_round_trip() -> None:
    blob = bytes(range(256)) * 40
    out = outgoing(attachments=(
        OutAttachment("raport_ż.log", "text/plain", b"linia 1\r\nlinia 2\n\x00"),
        OutAttachment("../../etc/passwd", "application/octet-stream", blob),
        OutAttachment("dziwny.bin", "bad type\r\nBcc: x@evil.example", b"x"),
        OutAttachment("", "message/rfc822", b"From: x\r\n\r\nhi"),
    ))
    msg = parse(compose(out))
    assert msg.get_content_type() == "multipart/mixed"
    assert "Bcc" not in msg
    body, *parts = list(msg.iter_parts())
    assert body.get_content().replace("\r\n", "\n") == out.body
    assert [p.get_filename() for p in parts] == [
        "raport_ż.log", "_.._etc_passwd", "dziwny.bin", "attachment"]
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "application/octet-stream", "application/octet-stream",
        "application/octet-stream"]
    assert [p.get_payload(decode=True) for p in parts] == [a.data for a in out.attachments]
    for part in parts:
        assert set(part.keys()) == {"Content-Type", "Content-Transfer-Encoding",
                                    "Content-Disposition"}


def test_clean_filename() -> None:
    assert clean_filename("C:\\Users\\jan\\log.txt") == "C__Users_jan_log.txt"
    assert clean_filename('<a>"b"|c?*.txt') == "_a__b__c__.txt"
    assert clean_filename("a\r\nb.txt") == "a b.txt"
    assert clean_filename(" .. ") == "attachment"
    long = clean_filename("ł" * 500 + ".tar.gz")
    assert len(long) <= 120 and long.endswith("….gz")


@pytest.mark.parametrize("to", [
    "jan@firma.pl\r\nBcc: x@evil.example", "jan@firma.pl\n", "no-at-sign", "", "@firma.pl",
    "jan@", "jan kowalski@firma.pl", "Jan <jan@firma.pl>", "jan@firma.pl, x@evil.example",
    "jan@firma..pl", "jan@-firma.pl", "=?utf-8?q?=0A?=@firma.pl", "jan\x00@firma.pl",
    "jan@firma.pl\u2028", "a@b@c.pl",
])
def test_unusable_to_raises_value_error(to: str) -> None:
    with pytest.raises(ValueError):
        compose(outgoing(to=to))


def test_idn_recipient_is_punycoded() -> None:
    msg = parse(compose(outgoing(to="jan@żółw.pl")))
    assert msg["To"] == "jan@xn--w-uga1v8h.pl"


INJECTIONS = [
    "Awaria\r\nBcc: x@evil.example",
    "Awaria\nBcc: x@evil.example",
    "Awaria\rBcc: x@evil.example",
    "=?UTF-8?Q?=0A?=Bcc: x@evil.example",
    "=?UTF-8?B?CkJjYzogeEBldmlsLmV4YW1wbGU=?=",
    "=?UTF-8?Q?=3D=3FUTF-8=3FQ=3F=3D0A=3F=3D?=Bcc: x@evil.example",
    "\nBcc: x@evil.example",
    "Awaria\x00\r\nBcc: x@evil.example",
    "Awaria\u2028Bcc: x@evil.example",
    "Awaria\x85Bcc: x@evil.example",
    "Awaria\r\n\r\nBcc: x@evil.example",
]


def assert_no_injection(raw: bytes) -> None:
    msg = parse(raw)
    assert "Bcc" not in msg
    assert len(msg.get_all("To")) == 1 and len(msg.get_all("Subject")) == 1
    lines = header_lines(raw)
    assert not any(line.lower().startswith(b"bcc:") for line in raw.split(b"\r\n"))
    assert all(line[:1] in (b" ", b"\t") or b":" in line for line in lines)
    assert not msg.defects


@pytest.mark.parametrize("evil", INJECTIONS)
def test_header_injection_via_subject(evil: str) -> None:
    raw = compose(outgoing(subject=evil))
    assert_no_injection(raw)
    assert parse(raw)["Subject"] == clean_header_text(parse(raw)["Subject"])
    via_reply = compose(outgoing(subject=reply_subject(123456, evil)))
    assert_no_injection(via_reply)
    assert parse(via_reply)["Subject"] == reply_subject(123456, evil)


@pytest.mark.parametrize("evil", INJECTIONS)
def test_header_injection_via_filename_display_name_and_references(evil: str) -> None:
    out = outgoing(attachments=(OutAttachment(evil, "text/plain", b"x"),),
                   references=(evil, f"<{evil}>"), in_reply_to=evil)
    raw = compose(out, from_name=evil)
    assert_no_injection(raw)
    msg = parse(raw)
    assert "In-Reply-To" not in msg and "References" not in msg
    (part,) = [p for p in msg.iter_attachments()]
    assert "\n" not in part.get_filename() and "Bcc" not in part


def test_lines_stay_under_998_octets() -> None:
    out = outgoing(
        subject="S" * 5000,
        body="Szanowni Państwo,\n" + "ż" * 3000 + "\n" + "x" * 3000 + "\n",
        attachments=(OutAttachment("ł" * 400 + ".log", "text/plain", b"y" * 5000),),
        references=tuple(f"<{'r' * 240}{i}@x>" for i in range(30)),
    )
    raw = compose(out, from_name="Serwis " * 200)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    msg = parse(raw)
    assert msg.get_body().get_content().replace("\r\n", "\n") == out.body
    long_subject = compose(outgoing(subject=reply_subject(123456, "ą" * 5000)))
    assert max(len(line) for line in long_subject.split(b"\r\n")) <= 998


# --------------------------------------------------------------------------- properties

TOP_HEADERS = {"date", "from", "reply-to", "to", "subject", "message-id", "in-reply-to",
               "references", "auto-submitted", "x-auto-response-suppress", "mime-version",
               "content-type"}
text = st.text(st.characters(codec="utf-8"), max_size=300)
evil_text = st.one_of(
    text,
    st.lists(st.sampled_from(INJECTIONS + ["=?", "?=", "\r", "\n", "<", ">", " ", "ż",
                                           "=?utf-8?b?", "Bcc:", "\x00", "\u2028"]))
    .map("".join),
    st.text(max_size=300),  # includes lone surrogates
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subject=evil_text, filename=evil_text, refs=st.lists(evil_text, max_size=4),
       in_reply_to=evil_text, body=evil_text, from_name=evil_text)
def test_arbitrary_customer_text_never_adds_headers(subject, filename, refs, in_reply_to,
                                                    body, from_name) -> None:
    out = outgoing(subject=subject, body=body, references=tuple(refs), in_reply_to=in_reply_to,
                   attachments=(OutAttachment(filename, "text/plain", b"data"),))
    raw = compose(out, from_name=from_name)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    msg = parse(raw)
    assert {k.lower() for k in msg.keys()} <= TOP_HEADERS
    assert len(msg.keys()) == len({k.lower() for k in msg.keys()})
    assert msg["To"] == "jan.kowalski@firma.pl"
    parts = list(msg.iter_parts())
    assert len(parts) == 2
    assert set(parts[1].keys()) == {"Content-Type", "Content-Transfer-Encoding",
                                    "Content-Disposition"}
    assert parts[1].get_filename() == clean_filename(filename)
    assert parts[1].get_payload(decode=True) == b"data"
    sent = str(msg["Subject"])
    assert sent == clean_header_text(sent)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(original=evil_text)
def test_reply_subject_survives_composition(original) -> None:
    subject = reply_subject(123456, original)
    assert subject == clean_header_text(subject) and len(subject) <= 200
    assert "#123456" in subject
    assert reply_subject(123456, subject) == subject  # idempotent
    msg = parse(compose(outgoing(subject=subject, attachments=())))
    assert msg["Subject"] == subject
    assert {k.lower() for k in msg.keys()} <= TOP_HEADERS | {"content-transfer-encoding"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(to=st.one_of(evil_text, st.emails()))
def test_compose_raises_only_value_error_for_to(to) -> None:
    try:
        raw = compose(outgoing(to=to))
    except ValueError:
        return
    msg = parse(raw)
    assert len(msg.get_all("To")) == 1
    assert msg["To"].addresses[0].addr_spec.lower() == to.lower() or not to.isascii()
    assert "Bcc" not in msg


def test_render_error_is_a_one_line_gateway_error(tmp_path: Path) -> None:
    from gateway.errors import GatewayError

    with pytest.raises(GatewayError) as info:
        Renderer(tmp_path, "pl")
    assert "\n" not in str(info.value) and "acknowledgement.txt.j2" in str(info.value)


FIELD_KEYS = ("reporter_name", "reporter_email", "reporter_phone", "install_address",
              "serial_number", "commcell_id")
link_text = st.one_of(
    evil_text,
    st.lists(st.sampled_from(["http", "://", "www.", "ＷＷＷ．", "\u200b", "PL61", " 1090",
                              "1014", "0000", "-", ".", "evil.example/", "Jan", " ", "+48",
                              "601234567", "\r\n", "h", "ttp", "s"]), max_size=20).map("".join),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(link_text, min_size=6, max_size=6))
def test_customer_values_never_carry_links_or_long_text(values) -> None:
    import unicodedata

    for language in ("pl", "en"):
        r = RENDERERS[language]
        fields = dict(zip(FIELD_KEYS, values, strict=True))
        for event in CUSTOMER_EVENTS:
            count, logs = attachment_counts(values)
            context = {"fields": Fields(**fields), "attachments": count,
                       "log_attachments": logs, **missing(event, "description")}
            body = r.render(TEXTS[event](Common(number=123456), **context))
            folded = unicodedata.normalize("NFKC", body).casefold()
            assert "http" not in folded and "://" not in folded and "www." not in folded
            assert not re.search(r"pl61[ .-]?1090[ .-]?1014[ .-]?0000", folded)
            for line in body.splitlines():
                if line.startswith("- ") and ": " in line:
                    assert len(line.split(": ", 1)[1]) <= 80, line


RENDERERS = {language: Renderer(TEMPLATES, language) for language in ("pl", "en")}
