"""Rendering stage: templates (pl/en), reply subjects, and MIME composition."""

from __future__ import annotations

import email
import email.policy
import shutil
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.model import REQUIRED_FIELDS, Fields, OutAttachment, Outgoing, Status
from gateway.render import (
    EVENTS,
    MISSING_LABELS,
    STATUS_LABELS,
    Renderer,
    RenderError,
    clean_filename,
    clean_header_text,
    compose_message,
    reply_subject,
    short_text,
)

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
WHEN = datetime(2025, 3, 14, 9, 26, 53, tzinfo=timezone(timedelta(hours=1)))
MSGID = "<123456.abcdef0123@crm.s4e.pl>"

FIELDS = {
    "reporter_name": "Jan Kowalski",
    "reporter_email": "jan.kowalski@firma.pl",
    "reporter_phone": "+48124446500",
    "install_address": "ul. Długa 5, 31-147 Kraków",
    "description": "Serwer nie startuje po aktualizacji, na ekranie błąd 0x1F.",
    "serial_number": "SN-4711-XZ",
    "commcell_id": None,
}

# A representative context per event (the common keys come from `render_all`).
CONTEXTS: dict[str, dict] = {
    "acknowledgement": {"fields": FIELDS, "attachments": ["cvlt.log", "zrzut ekranu.png"],
                        "phone_confirmation_required": True},
    "missing_fields": {"fields": {"reporter_name": "Jan Kowalski"},
                       "missing": ["reporter_phone", "install_address", "device_id"]},
    "status_changed": {"status": "in_progress", "note": "Wymiana dysku zaplanowana na jutro."},
    "resolved": {"note": None},
    "closed": {"rating": 5, "reason": "rating"},
    "closed_ticket_guidance": {},
    "unknown_ticket_guidance": {},
    "staff_reply": {"message": "Dzień dobry,\nprosimy o przesłanie logów.\n\nAnna Nowak",
                    "status": "in_progress"},
    "held_notice": {},
    "staff_copy": {"fields": FIELDS, "missing": [], "phone_confirmation_required": True,
                   "reporter": "jan.kowalski@firma.pl", "attachments": ["cvlt.log"]},
}

# Concrete wording the Polish mails must carry.
PL_PHRASES: dict[str, list[str]] = {
    "acknowledgement": ["Szanowni Państwo,", "#123456", "Przyjęte", "zostało przyjęte",
                        "z zachowaniem numeru #123456 w temacie", "serwis@s4e.pl",
                        "telefoniczne potwierdzenie", "(0-12) 444-65-00 lub 801 090 101",
                        "Jan Kowalski", "ul. Długa 5, 31-147 Kraków", "SN-4711-XZ", "cvlt.log",
                        "Z poważaniem,\nSerwis S4E\ncrm@s4e.pl"],
    "missing_fields": ["Szanowni Państwo,", "#123456", "Oczekuje na uzupełnienie",
                       "Dane kontaktowe osoby zgłaszającej (telefon)",
                       "Adres instalacji sprzętu – realizacji naprawy",
                       "Numer seryjny urządzenia / numer Commcell ID",
                       "w odpowiedzi na tę wiadomość, z zachowaniem numeru #123456 w temacie",
                       "Z poważaniem,"],
    "status_changed": ["Szanowni Państwo,", "#123456", "W realizacji",
                       "Wymiana dysku zaplanowana na jutro.", "Z poważaniem,"],
    "resolved": ["Szanowni Państwo,", "#123456", "Rozwiązane", "Ocena: 5", "od 1 do 5",
                 "problem nadal występuje", "Z poważaniem,"],
    "closed": ["Szanowni Państwo,", "#123456", "Zamknięte", "Dziękujemy za ocenę",
               "nie będą już trafiały do systemu zgłoszeń serwisowych",
               "wyłącznie na adres serwis@s4e.pl", "Z poważaniem,"],
    "closed_ticket_guidance": ["Szanowni Państwo,", "#123456", "zostało zamknięte",
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
                                "w temacie wiadomości"],
    "staff_reply": ["prosimy o przesłanie logów", "Zgłoszenie #123456", "W realizacji",
                    "z zachowaniem numeru #123456 w temacie", "\n-- \n"],
    "held_notice": ["Szanowni Państwo,", "nie mogła zostać automatycznie dodana",
                    "serwis@s4e.pl", "Z poważaniem,\nSerwis S4E\ncrm@s4e.pl"],
    "staff_copy": ["PILNE", "#123456", "Przyjęte", "jan.kowalski@firma.pl",
                   "Serwer nie startuje po aktualizacji", "cvlt.log"],
}

EN_PHRASES: dict[str, list[str]] = {
    "acknowledgement": ["Dear Sir or Madam,", "#123456", "Accepted", "serwis@s4e.pl",
                        "keep the number #123456 in the subject",
                        "(0-12) 444-65-00 or 801 090 101", "Kind regards,\nS4E Service Desk"],
    "missing_fields": ["Dear Sir or Madam,", "Awaiting information",
                       "Serial number of the device / CommCell ID"],
    "status_changed": ["Dear Sir or Madam,", "In progress"],
    "resolved": ["Resolved", "Rating: 5", "If the problem persists"],
    "closed": ["Closed", "Thank you for your rating", "serwis@s4e.pl only"],
    "closed_ticket_guidance": ["Ticket #123456 has been closed", "has not been added",
                               "serwis@s4e.pl only"],
    "unknown_ticket_guidance": ["could not match", "serwis@s4e.pl", "6. Logs from the device"],
    "staff_reply": ["Ticket #123456", "In progress", "keep the number #123456"],
    "held_notice": ["Dear Sir or Madam,", "could not be added", "serwis@s4e.pl"],
    "staff_copy": ["URGENT", "#123456", "Serwer nie startuje"],
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


def render(r: Renderer, event: str, **extra) -> str:
    context = {"number": "123456", "subject": "Awaria serwera", **CONTEXTS[event], **extra}
    return r.render(event, **context)


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
    body = render(pl, "missing_fields", missing=list(REQUIRED_FIELDS), fields=None)
    for label in ("Imię i nazwisko osoby zgłaszającej problem",
                  "Dane kontaktowe osoby zgłaszającej (telefon)",
                  "Adres instalacji sprzętu – realizacji naprawy", "Opis problemu",
                  "Numer seryjny urządzenia / numer Commcell ID"):
        assert f"- {label}\n" in body
    assert "Otrzymane dotychczas dane" not in body  # nothing received: no empty list


def test_acknowledgement_never_carries_the_description(renderer: Renderer) -> None:
    secret = "KLIKNIJ http://evil.example/login i podaj hasło " * 50
    fields = dict(FIELDS, description=secret)
    for event in ("acknowledgement", "missing_fields"):
        body = render(renderer, event, fields=fields, missing=["device_id"])
        assert "KLIKNIJ" not in body and "evil.example" not in body


def test_acknowledgement_cuts_a_malicious_field_to_one_short_line(renderer: Renderer) -> None:
    evil = ("Jan\r\nBcc: x@evil.example\n\nZapłać na konto http://evil.example/pay\u2028"
            + "A" * 5000)
    fields = dict(FIELDS, reporter_name=evil, install_address=evil)
    body = render(renderer, "acknowledgement", fields=fields,
                  attachments=[evil] * 3)
    assert "\nBcc:" not in body and "\u2028" not in body
    assert "AAAA" * 25 not in body
    lines = [line for line in body.splitlines() if "Jan" in line]
    assert lines and all(len(line) <= 120 for line in lines)
    assert all(line.endswith("…") for line in lines)


def test_short_filter() -> None:
    assert short_text("  a\r\n\tb\x00c  ") == "a b c"
    assert short_text(None) == ""
    assert short_text("x" * 500) == "x" * 79 + "…"
    assert len(short_text("x" * 500, 40)) == 40
    # a combining mark is never separated from its letter
    assert short_text("a" * 78 + "e\u0301" + "b" * 10) == "a" * 78 + "…"


def test_acknowledgement_accepts_model_fields(pl: Renderer) -> None:
    body = pl.render("acknowledgement", number=123456, fields=Fields(reporter_name="Ewa Nowak"))
    assert "Ewa Nowak" in body and "#123456" in body and "None" not in body


def test_acknowledgement_lists_at_most_ten_attachments(pl: Renderer) -> None:
    names = [f"log{i:02d}.txt" for i in range(25)]
    body = render(pl, "acknowledgement", attachments=names)
    assert "log09.txt" in body and "log10.txt" not in body
    assert "łącznie załączników: 25" in body


def test_phone_confirmation_only_when_required(pl: Renderer) -> None:
    asked = render(pl, "acknowledgement", phone_confirmation_required=True,
                   phone_numbers=["(0-12) 444-65-00", "801 090 101"])
    assert "telefoniczne potwierdzenie" in asked and "801 090 101" in asked
    quiet = render(pl, "acknowledgement", phone_confirmation_required=False)
    assert "telefoniczne" not in quiet and "801 090 101" not in quiet
    no_numbers = render(pl, "acknowledgement", phone_numbers=[])
    assert "telefoniczne potwierdzenie, z podaniem numeru" in no_numbers


def test_held_notice_is_content_free(renderer: Renderer) -> None:
    base = renderer.render("held_notice")
    variants = [
        {"number": 123456},
        {"number": None, "ticket": None, "subject": "Re: [#123456] Awaria"},
        {"number": "654321", "status": "closed", "fields": FIELDS, "note": "tajne",
         "message": "tajne", "rating": 5, "reporter": "a@b.pl", "attachments": ["x.log"]},
    ]
    for context in variants:
        assert renderer.render("held_notice", **context) == base
    assert "#" not in base and "123456" not in base
    for label in STATUS_LABELS[renderer.language].values():
        assert label not in base


def test_unknown_ticket_guidance_never_names_a_ticket(renderer: Renderer) -> None:
    body = renderer.render("unknown_ticket_guidance", number=654321, subject="[#654321] x")
    assert "654321" not in body
    assert body == renderer.render("unknown_ticket_guidance")


def test_closed_ticket_guidance_without_a_number(pl: Renderer) -> None:
    body = pl.render("closed_ticket_guidance", number=None)
    assert "#" not in body and "zostało zamknięte" in body and "serwis@s4e.pl" in body


@pytest.mark.parametrize("reason, phrase", [
    ("staff", "zamknięte przez serwis S4E"),
    ("rating_window", "po upływie terminu"),
    (None, "Zamknięte"),
])
def test_closed_without_rating(pl: Renderer, reason, phrase) -> None:
    body = render(pl, "closed", rating=None, reason=reason, note=None)
    assert phrase in body and "Dziękujemy za ocenę" not in body and "None" not in body


def test_staff_text_is_rendered_as_is(pl: Renderer) -> None:
    note = "Linia 1\nLinia 2 <b>nie HTML</b> & {{ nie szablon }}"
    body = render(pl, "status_changed", note=note)
    assert note in body
    body = render(pl, "staff_reply", message=note)
    assert body.startswith(note + "\n")


def test_staff_copy_without_urgency(pl: Renderer) -> None:
    body = render(pl, "staff_copy", phone_confirmation_required=False, missing=["device_id"])
    assert "PILNE" not in body and "Oczekuje na uzupełnienie" in body
    assert "Numer seryjny urządzenia / numer Commcell ID" in body


@pytest.mark.parametrize("event, context", [
    ("nope", {}),
    ("acknowledgement", {"number": None}),
    ("acknowledgement", {"number": "12345"}),
    ("acknowledgement", {"number": 123456, "phone_confirmation_requried": True}),
    ("acknowledgement", {"number": 123456, "fields": {"password": "x"}}),
    ("status_changed", {"number": 123456}),
    ("status_changed", {"number": 123456, "status": "lost"}),
    ("missing_fields", {"number": 123456, "missing": []}),
    ("missing_fields", {"number": 123456, "missing": ["shoe_size"]}),
    ("closed", {"number": 123456, "rating": 6}),
    ("closed", {"number": 123456, "reason": "bored"}),
    ("staff_reply", {"number": 123456, "message": "  "}),
    ("resolved", {"number": 123456, "ticket": "#654321"}),
])
def test_bad_context_is_refused(pl: Renderer, event, context) -> None:
    with pytest.raises(RenderError):
        pl.render(event, **context)


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


@settings(max_examples=300, deadline=None)
@given(original=evil_text)
def test_reply_subject_survives_composition(original) -> None:
    subject = reply_subject(123456, original)
    assert subject == clean_header_text(subject) and len(subject) <= 200
    assert "#123456" in subject
    assert reply_subject(123456, subject) == subject  # idempotent
    msg = parse(compose(outgoing(subject=subject, attachments=())))
    assert msg["Subject"] == subject
    assert {k.lower() for k in msg.keys()} <= TOP_HEADERS | {"content-transfer-encoding"}


@settings(max_examples=300, deadline=None)
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
