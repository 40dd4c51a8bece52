"""parse_report on crafted messages (tests/data/*.eml): fields, headers, attachments,
auto-mail marks, ticket tokens, ratings, limits."""

from __future__ import annotations

import base64
import hashlib
import struct
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from gateway.model import Fields, Report, missing_fields
from gateway.parser import parse_report

DATA = Path(__file__).parent / "data"


def parse_file(name: str) -> Report:
    return parse_report((DATA / name).read_bytes())


def assert_attachments_intact(report: Report) -> None:
    for att in report.attachments:
        assert att.size == len(att.data)
        assert att.sha256 == hashlib.sha256(att.data).hexdigest()


# --- fields of each crafted report ---------------------------------------------------------

FIELDS = [
    ("procedure-utf8-qp.eml", Fields(
        reporter_name="Jan Kowalski",
        reporter_email="jan.kowalski@firma.pl",
        reporter_phone="+48600100200",
        install_address="ul. Długa 5, 31-147 Kraków",
        description="Serwer kopii zapasowych nie uruchamia się po aktualizacji.",
        serial_number="SN-7788-AB",
        commcell_id=None,
    )),
    ("procedure-cp1250-8bit.eml", Fields(
        reporter_name="Anna Nowak",
        reporter_email="anna.nowak@szpital.example.pl",
        reporter_phone="+48501234567",
        install_address="Szpital Wojewódzki, budynek C\nul. Źródlana 12\n40-001 Katowice",
        description="Biblioteka taśmowa zgłasza błąd napędu.\n"
                    "Zadania kopii nocnych kończą się niepowodzeniem.",
        serial_number=None,
        commcell_id="2A3F5",
    )),
    ("procedure-iso88592-base64.eml", Fields(
        reporter_name="Piotr Wiśniewski",
        reporter_email="p.wisniewski@urzad.example.gov.pl",
        reporter_phone="+48124446500",
        install_address="Urząd Miasta, pokój 114\nul. Rynek 1, 30-001 Kraków",
        description="Macierz dyskowa sygnalizuje uszkodzenie dysku w półce 2.\n"
                    "Dioda świeci na pomarańczowo.",
        serial_number="CN-12AB-3344",
        commcell_id=None,
    )),
    ("undeclared-cp1250.eml", Fields(
        reporter_name="Łukasz Żółć",
        reporter_email="lukasz.zolc@example.pl",
        reporter_phone="+48722333444",
        install_address="ul. Świętokrzyska 3, 00-001 Warszawa",
        description="Nie działa agent kopii na serwerze plików, błąd „Brak połączenia z CommServe”.",
        serial_number="ŻK-55",
        commcell_id=None,
    )),
    ("undeclared-utf8.eml", Fields(
        reporter_name="Małgorzata Dąbrowska",
        reporter_email="m.dabrowska@example.com",
        reporter_phone="+48601234567",
        install_address="Centrum Danych, ul. Łąkowa 7, 90-001 Łódź",
        description="Po awarii zasilania urządzenie nie wstaje; na wyświetlaczu „E-204”.",
        serial_number="HX-2024-0091",
        commcell_id=None,
    )),
    ("english-labels.eml", Fields(
        reporter_name="John Smith",
        reporter_email="john.smith@example.co.uk",
        reporter_phone="+442079460958",
        install_address="10 Downing Street\nLondon SW1A 2AA",
        description="Backup jobs fail with error 19:1131 since Monday.",
        serial_number="GB-998877",
        commcell_id="7F3A2",
    )),
    ("separators.eml", Fields(  # "Label - value", "Label – value", "Label; value", label alone
        reporter_name="Tomasz Kowalczyk",  # "Imię" + "Nazwisko"
        reporter_email="t.kowalczyk@example.pl",
        reporter_phone="+48600700800",
        install_address="ul. Polna 1\n00-950 Warszawa",
        description="Drukarka sieciowa nie odpowiada.\n\nPo restarcie nadal brak reakcji.",
        serial_number="PRN-0001",
        commcell_id=None,
    )),
    ("outlook-html-table.eml", Fields(  # HTML only: table rows become "label value" lines
        reporter_name="Katarzyna Lewandowska",
        reporter_email="k.lewandowska@bank.example.pl",
        reporter_phone="+48225556677",
        install_address="ul. Marszałkowska 100, 00-026 Warszawa",
        description="Serwer mediów nie widzi biblioteki taśmowej.",
        serial_number="SN-1",
        commcell_id="12AB3",  # "CCID 12AB3"
    )),
    ("gmail-alternative.eml", Fields(  # text/plain preferred; phone from "tel. ..." signature
        reporter_name="Marek Zieliński",
        reporter_email="marek.zielinski@gmail.com",
        reporter_phone="+48698765432",
        install_address="ul. Ogrodowa 8/2, 80-001 Gdańsk",
        description="Konsola Commvault pokazuje błąd licencji.",
        serial_number=None,
        commcell_id="4B5C6",
    )),
    ("reply-outlook-pl.eml", Fields(  # the Od:/Wysłano: block's values are history
        reporter_name="Ewa Mazur",
        reporter_email="ewa.mazur@firma.example.pl",
        reporter_phone=None,
        install_address=None,
        description="uzupełniam brakujące dane:",
        serial_number="MX-4455",
        commcell_id=None,
    )),
    ("reply-outlook-html.eml", Fields(  # HTML reply: quoted values below the Od: block
        reporter_name="Zofia Krawczyk",
        reporter_email="z.krawczyk@example.pl",
        reporter_phone="+48510600700",
        install_address="ul. Nowa 3, 50-001 Wrocław",
        description="w odpowiedzi przesyłam brakujące informacje:",
        serial_number=None,
        commcell_id=None,
    )),
    ("reply-gmail-attribution.eml", Fields(  # "W dniu ... pisze:" and > quotes are history
        reporter_name="Jan Kowalski",
        reporter_email="jan.kowalski@firma.pl",
        reporter_phone=None,
        install_address=None,
        description="Dziękuję za szybką naprawę.",
        serial_number=None,
        commcell_id=None,
    )),
    ("reply-original-message.eml", Fields(  # "-----Original Message-----" is history
        reporter_name="Adam Nowicki",
        reporter_email="adam@example.com",
        reporter_phone="+48509876543",
        install_address=None,
        description=None,
        serial_number=None,
        commcell_id=None,
    )),
    ("signature-phone.eml", Fields(  # name from the signature, not From ("IT Helpdesk")
        reporter_name="Krzysztof Wójcik",
        reporter_email="helpdesk@example.pl",
        reporter_phone="+48722333444",
        install_address=None,
        description="od wczoraj nie działa backup bazy Oracle na serwerze DB01.",
        serial_number="ORA-DB01",
        commcell_id=None,
    )),
    ("signature-bare-phone.eml", Fields(  # "-- " signature, phone without any label
        reporter_name="Agnieszka Kaczmarek",
        reporter_email="a.kaczmarek@example.pl",
        reporter_phone="+48124446500",
        install_address="ul. Wielicka 28, 30-552 Kraków",
        description="mamy problem z replikacją danych między lokalizacjami. Proszę o kontakt.",
        serial_number=None,
        commcell_id="9E8D7",
    )),
    ("free-text-only.eml", Fields(  # From display name; description = the free text
        reporter_name="Barbara Szymańska",
        reporter_email="b.szymanska@example.pl",
        reporter_phone=None,
        install_address=None,
        description="proszę o pilny kontakt, serwer kopii zapasowych w naszej siedzibie "
                    "przestał odpowiadać dziś rano.",
        serial_number=None,
        commcell_id=None,
    )),
    ("forwarded-rfc822.eml", Fields(  # read from inside the message/rfc822 part
        reporter_name="Robert Lis",
        reporter_email="robert.lis@klient.example.pl",
        reporter_phone="+48605111222",
        install_address="ul. Morska 10, 81-001 Gdynia",
        description="Serwer nie startuje po wymianie płyty głównej.",
        serial_number="SRV-5566",
        commcell_id=None,
    )),
    ("raw8bit-headers.eml", Fields(  # body declared iso-8859-1, really cp1250
        reporter_name="Żaneta Ćwik",
        reporter_email="zaneta@example.pl",
        reporter_phone=None,
        install_address=None,
        description="Zasilacz UPS piszczy, akumulator wymieniony w zeszłym roku.",
        serial_number="UPS-01",
        commcell_id=None,
    )),
]


@pytest.mark.parametrize(("name", "expected"), FIELDS, ids=[f[0] for f in FIELDS])
def test_fields(name: str, expected: Fields) -> None:
    report = parse_file(name)
    assert report.fields == expected
    assert report.missing == missing_fields(expected)


def test_complete_procedure_report_misses_nothing() -> None:
    report = parse_file("procedure-utf8-qp.eml")
    assert report.missing == ()
    assert report.subject == "Zgłoszenie awarii – serwer kopii"
    assert report.sender == "jan.kowalski@firma.pl"
    assert report.notes == ()


def test_quoted_history_stays_out_of_text() -> None:
    outlook = parse_file("reply-outlook-pl.eml")
    assert outlook.text == (
        "Dzień dobry,\n\nuzupełniam brakujące dane:\nNumer seryjny: MX-4455\n\nPozdrawiam\nEwa Mazur"
    )
    gmail = parse_file("reply-gmail-attribution.eml")
    assert gmail.text == "Ocena: 5\n\nDziękuję za szybką naprawę."
    html = parse_file("reply-outlook-html.eml")
    assert html.text.endswith("Pozdrawiam\n\nZofia Krawczyk")
    assert html.ticket_refs == (246810,)
    english = parse_file("reply-original-message.eml")
    assert "QUOTED" not in english.text and "000 000 000" not in english.text


def test_bottom_posted_reply_keeps_text_below_the_quote() -> None:
    raw = (
        b"From: a@example.pl\nSubject: Re: x\nContent-Type: text/plain; charset=utf-8\n\n"
        b"On Mon, 10 Mar 2025 Jan <jan@x.pl> wrote:\n> Telefon: 111 111 111\n>\n"
        b"Telefon: 600 100 200\n"
    )
    report = parse_report(raw)
    assert report.text == "Telefon: 600 100 200"
    assert report.fields.reporter_phone == "+48600100200"


def test_html_table_rows_become_label_value_lines() -> None:
    report = parse_file("outlook-html-table.eml")
    lines = report.text.split("\n")
    assert "Numer seryjny      SN-1" in lines
    assert "Imię i nazwisko:   Katarzyna Lewandowska" in lines
    assert report.subject == "Zgłoszenie - serwer mediów"


def test_forwarded_message_text_and_attachments() -> None:
    report = parse_file("forwarded-rfc822.eml")
    assert report.text.startswith(
        "Przesyłam zgłoszenie od klienta.\n\nDzień dobry,\n\nImię i nazwisko: Robert Lis"
    )
    assert report.sender == "recepcja@firma.example.pl"
    [log] = report.attachments
    assert (log.filename, log.content_type, log.is_log) == ("job4711.log", "text/x-log", True)
    assert log.data == b"2025-03-19 07:00:01 ERROR JobManager: job 4711 failed (19:1131)\n" * 3
    assert_attachments_intact(report)


def test_inline_outlook_forward_is_read_from_inside() -> None:
    raw = (
        "From: Sekretariat <sekretariat@firma.pl>\nSubject: PD: Awaria\n"
        "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
        "Przekazuję.\n\nOd: Jan Nowak <jan.nowak@klient.pl>\nWysłano: wtorek, 11 marca 2025 08:00\n"
        "Do: Sekretariat <sekretariat@firma.pl>\nTemat: Awaria\n\n"
        "Telefon: 600 100 200\nAdres: ul. Krótka 1, 00-001 Warszawa\nOpis: Nie działa.\nS/N: X-1\n"
    ).encode()
    report = parse_report(raw)
    assert report.fields == Fields(
        reporter_name="Jan Nowak", reporter_email="jan.nowak@klient.pl",
        reporter_phone="+48600100200", install_address="ul. Krótka 1, 00-001 Warszawa",
        description="Nie działa.", serial_number="X-1", commcell_id=None,
    )


def test_name_label_with_contact_data() -> None:
    raw = (b"From: Biuro <biuro@firma.pl>\nSubject: Awaria\nContent-Type: text/plain; charset=utf-8\n\n"
           b"Osoba kontaktowa: Jan Kowalski, tel. 600 100 200, jan@firma.pl\nOpis: Brak zasilania.\n")
    fields = parse_report(raw).fields
    assert (fields.reporter_name, fields.reporter_phone, fields.reporter_email) == (
        "Jan Kowalski", "+48600100200", "jan@firma.pl")


# --- headers ---------------------------------------------------------------------------------

def test_encoded_and_duplicate_headers() -> None:
    report = parse_file("headers-encoded.eml")
    assert report.subject == "Re: Odp: AW: PD: Fwd: [#123456] Awaria serwera Łódź!!"
    assert report.ticket_refs == (123456,)
    assert report.sender == "lukasz@example.pl"
    assert report.sender_name == "Łukasz Żółć"
    assert report.reply_to == "biuro@example.pl"
    assert report.to == ("serwis@s4e.pl", "jan@firma.pl")
    assert report.cc == ("a@example.pl", "b@example.pl")  # Cc: and CC: merged
    assert report.message_id == "<hdr-1@example.pl>"
    assert report.in_reply_to == ("<t123456.aa.bb@s4e.pl>",)
    assert report.references == ("<first@example.pl>", "<t123456.aa.bb@s4e.pl>")
    assert report.date == datetime(2025, 3, 21, 7, 59, 58, tzinfo=timezone(timedelta(hours=1)))
    assert report.rating == 4


def test_raw_8bit_headers_and_impossible_date() -> None:
    report = parse_file("raw8bit-headers.eml")
    assert report.sender_name == "Żaneta Ćwik"
    assert report.subject == "Błąd zasilacza – pilne"
    assert report.date is None  # hour 27
    assert report.notes == ("charset iso-8859-1: decoded as cp1250",)


@pytest.mark.parametrize(("name", "subject"), [
    ("undeclared-cp1250.eml", "Awaria – serwer plików"),
    ("undeclared-utf8.eml", "Zgłoszenie awarii – Łódź"),
    ("procedure-cp1250-8bit.eml", "Zgłoszenie awarii biblioteki taśmowej"),
    ("procedure-iso88592-base64.eml", "Uszkodzenie dysku"),
    ("gmail-alternative.eml", "Błąd licencji Commvault"),
])
def test_subjects_decoded(name: str, subject: str) -> None:
    assert parse_file(name).subject == subject


def test_subject_on_one_line() -> None:
    raw = b"From: a@b.pl\nSubject: one\n two\tthree\n\nx\n"
    assert parse_report(raw).subject == "one two three"


def test_date_without_zone_is_utc() -> None:
    raw = b"From: a@b.pl\nDate: Mon, 10 Mar 2025 10:15:00\n\nx\n"
    assert parse_report(raw).date == datetime(2025, 3, 10, 10, 15, tzinfo=UTC)


# --- attachments -----------------------------------------------------------------------------

def test_attachment_names_types_and_data() -> None:
    report = parse_file("attachment-names.eml")
    got = [(a.filename, a.content_type, a.size, a.is_log) for a in report.attachments]
    assert got == [
        ("dziennik_błędów.log.gz", "application/gzip", 1024, True),  # RFC 2231
        ("raport końcowy.pdf", "application/pdf", 51, False),  # RFC 2231 continuations
        ("zdjęcie ekranu.png", "image/png", 48, False),  # RFC 2047 split over a fold
        ("../../etc/passwd", "application/octet-stream", 32, False),  # display data only
        ("attachment-5.jpg", "image/jpeg", 66, False),  # no name: generated
        ("config.txt", "text/plain", 32, True),
    ]
    data = [a.data for a in report.attachments]
    assert data[0] == bytes(range(256)) * 4
    assert data[3] == b"root:x:0:0:root:/root:/bin/bash\n"
    assert data[5] == b"backup.retention=30\nserwer=DB01\n"
    assert_attachments_intact(report)
    assert report.text == "W załączeniu logi."


@pytest.mark.parametrize("charset", ["utf-8", "cp1250"])
def test_raw_8bit_attachment_name(charset: str) -> None:
    raw = (
        "From: a@example.pl\nContent-Type: multipart/mixed; boundary=B\n\n--B\n\nx\n--B\n"
        'Content-Type: application/pdf\nContent-Disposition: attachment; filename="zażółć gęślą.pdf"\n\n'
        "%PDF-1.4\n--B--\n"
    ).encode(charset)
    [pdf] = parse_report(raw).attachments
    assert (pdf.filename, pdf.data) == ("zażółć gęślą.pdf", b"%PDF-1.4")


def _tnef_attr(level: int, attr_id: int, attr_type: int, data: bytes) -> bytes:
    checksum = sum(data) & 0xFFFF
    return struct.pack("<BHHI", level, attr_id, attr_type, len(data)) + data + struct.pack("<H", checksum)


def _tnef_blob(body: str, files: list[tuple[str, str | None, bytes]]) -> bytes:
    """A minimal TNEF stream as Outlook writes it (MS-OXTNEF): signature, key, message
    attributes (version, OEM code page, class, body), then per file attAttachRendData,
    attAttachTitle (8.3 name), attAttachData and optionally attAttachment with the MAPI
    long file name (PidTagAttachLongFilename, 0x3707, PT_UNICODE)."""
    out = struct.pack("<IH", 0x223E9F78, 0x0001)
    out += _tnef_attr(1, 0x9006, 0x0008, struct.pack("<I", 0x00010000))
    out += _tnef_attr(1, 0x9007, 0x0006, struct.pack("<II", 1250, 0))
    out += _tnef_attr(1, 0x8008, 0x0007, b"IPM.Note\0")
    out += _tnef_attr(1, 0x800C, 0x0002, body.encode("cp1250"))
    for short, long, data in files:
        out += _tnef_attr(2, 0x9002, 0x0006, bytes(14))
        out += _tnef_attr(2, 0x8010, 0x0001, short.encode("ascii") + b"\0")
        out += _tnef_attr(2, 0x800F, 0x0006, data)
        if long:
            name = (long + "\0").encode("utf-16-le")
            prop = struct.pack("<HHII", 0x001F, 0x3707, 1, len(name)) + name + bytes(-len(name) % 4)
            out += _tnef_attr(2, 0x9005, 0x0006, struct.pack("<I", 1) + prop)
    return out


def test_tnef_winmail_dat_unpacked() -> None:
    log = b"2025-03-10 ERROR disk 2 failed\n" * 4
    png = b"\x89PNG\r\n\x1a\n" + bytes(16)
    blob = _tnef_blob(
        "Imię i nazwisko: Paweł Grabowski\r\nTelefon: 600 200 300\r\n"
        "Adres: ul. Zielona 3, 60-001 Poznań\r\nOpis problemu: Dysk 2 uszkodzony.\r\n"
        "Numer seryjny: TN-42\r\n",
        [("AWARIA~1.LOG", "awaria serwera.log", log), ("zrzut.png", None, png)],
    )
    raw = (
        b"From: Pawel Grabowski <p.grabowski@example.pl>\r\nTo: serwis@s4e.pl\r\nSubject: Awaria\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"tnef-b\"\r\n\r\n"
        b"--tnef-b\r\nContent-Type: text/plain; charset=\"us-ascii\"\r\n\r\n\r\n"
        b"--tnef-b\r\nContent-Type: application/ms-tnef; name=\"winmail.dat\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=\"winmail.dat\"\r\n\r\n"
        + base64.encodebytes(blob).replace(b"\n", b"\r\n") + b"\r\n--tnef-b--\r\n"
    )
    report = parse_report(raw)
    assert report.fields == Fields(
        reporter_name="Paweł Grabowski", reporter_email="p.grabowski@example.pl",
        reporter_phone="+48600200300", install_address="ul. Zielona 3, 60-001 Poznań",
        description="Dysk 2 uszkodzony.", serial_number="TN-42", commcell_id=None,
    )
    got = [(a.filename, a.content_type, a.data, a.is_log) for a in report.attachments]
    assert got == [("awaria serwera.log", "text/plain", log, True), ("zrzut.png", "image/png", png, False)]
    assert_attachments_intact(report)


def test_broken_winmail_dat_kept_as_attachment() -> None:
    report = parse_file("winmail-broken.eml")
    [winmail] = report.attachments
    assert (winmail.filename, winmail.content_type) == ("winmail.dat", "application/ms-tnef")
    assert winmail.size == 24
    assert report.notes == ("winmail.dat could not be unpacked: kept as attachment",)
    assert report.text == "Opis problemu: szczegóły w załączniku."
    assert_attachments_intact(report)


# --- machine-generated mail ------------------------------------------------------------------

def test_dsn_names_the_bounced_message() -> None:
    report = parse_file("dsn-bounce.eml")
    assert report.bounced_ids == ("<t123456.abc.def@s4e.pl>",)
    assert report.auto_reasons == ("auto-submitted:auto-replied", "mailer-daemon", "dsn")
    assert report.auto_generated


def test_out_of_office_reply() -> None:
    report = parse_file("auto-reply-ooo.eml")
    assert report.auto_reasons == ("auto-submitted:auto-replied", "auto-reply subject")
    assert report.ticket_refs == (123456,)
    assert report.bounced_ids == ()


AUTO_HEADERS = [
    ("Auto-Submitted: auto-generated", ("auto-submitted:auto-generated",)),
    ("Auto-Submitted: auto-replied", ("auto-submitted:auto-replied",)),
    ("Auto-Submitted: no", ()),
    ("Auto-Submitted: No (manually sent)", ()),
    ("Precedence: bulk", ("precedence:bulk",)),
    ("Precedence: junk", ("precedence:junk",)),
    ("Precedence: list", ("precedence:list",)),
    ("Precedence: first-class", ()),
    ("List-Id: Ogloszenia <ogloszenia.example.pl>", ("list-id",)),
    ("X-Autoreply: yes", ("x-autoreply",)),
    ("X-Autorespond: on", ("x-autorespond",)),
    ("X-Autoresponder: 1", ("x-autoresponder",)),
    ("X-Auto-Response-Suppress: All", ()),
    ("Content-Type: multipart/report; report-type=delivery-status; boundary=x", ("dsn",)),
    ("Content-Type: message/delivery-status", ("dsn",)),
]


@pytest.mark.parametrize(("header", "reasons"), AUTO_HEADERS, ids=[h for h, _ in AUTO_HEADERS])
def test_auto_reasons(header: str, reasons: tuple[str, ...]) -> None:
    raw = f"From: Jan <jan@example.pl>\nTo: serwis@s4e.pl\nSubject: x\n{header}\n\nhello\n".encode()
    assert parse_report(raw).auto_reasons == reasons


@pytest.mark.parametrize(("sender", "reasons"), [
    ("MAILER-DAEMON@mx.example.com", ("mailer-daemon",)),
    ("Mailer-Daemon@mx.example.com", ("mailer-daemon",)),
    ("postmaster@example.com", ("postmaster",)),
    ("postmaster.kowalski@example.com", ()),
])
def test_daemon_senders(sender: str, reasons: tuple[str, ...]) -> None:
    raw = f"From: {sender}\nSubject: x\n\nhello\n".encode()
    assert parse_report(raw).auto_reasons == reasons


# --- ticket tokens and ratings ---------------------------------------------------------------

TOKENS = [
    ("Re: Odp: AW: PD: Fwd: [#123456]", (123456,)),
    ("[#123456] Awaria", (123456,)),
    ("#123456 i #654321", (123456, 654321)),
    ("#1234567", ()),
    ("#12345", ()),
    ("9#123456", ()),  # a digit before "#" makes it part of a longer number (model.TICKET_REF)
    ("Zgłoszenie#123456:", (123456,)),
    ("#１２３４５６", ()),  # full-width digits
    ("nr 123456", ()),
    ("=?utf-8?q?Odp=3A_=5B=23123456=5D?=", (123456,)),
]


@pytest.mark.parametrize(("subject", "refs"), TOKENS, ids=[t[0] for t in TOKENS])
def test_ticket_refs(subject: str, refs: tuple[int, ...]) -> None:
    raw = f"From: a@example.pl\nSubject: {subject}\nContent-Type: text/plain; charset=utf-8\n\nx\n"
    assert parse_report(raw.encode()).ticket_refs == refs


RATINGS = [
    ("Ocena: 4", 4),
    ("Ocena 4", 4),
    ("ocena 4/5", 4),
    ("OCENA: 5\n\nDziękuję", 5),
    ("Rating: 4", 4),
    ("Rating 4/5", 4),
    ("Dziękuję, moja ocena: 3.", 3),
    ("4/5", 4),
    ("Dzień dobry,\n3/5\nPozdrawiam", 3),
    ("5", 5),
    ("\n  2  \nDziękuję", 2),
    ("1", 1),
    ("0", None),
    ("6", None),
    ("12", None),
    ("Ocena: 0", None),
    ("Ocena: 6", None),
    ("Ocena: 10", None),
    ("Ocena: 4/10", None),
    ("Ocena: 4.5", None),
    ("Dzień dobry,\n5", None),  # a lone digit counts only as the first line
    ("W dniu 1.03.2025 serwis <crm@s4e.pl> pisze:\n> Ocena: 4", None),  # quoted
    ("Dziękuję.\n\n> Ocena: 5", None),
    ("Serwer ma 5 dysków", None),
]


@pytest.mark.parametrize(("body", "rating"), RATINGS, ids=[r[0][:30] for r in RATINGS])
def test_rating(body: str, rating: int | None) -> None:
    raw = ("From: a@example.pl\nSubject: Re: [#123456]\nContent-Type: text/plain; charset=utf-8\n"
           "Content-Transfer-Encoding: 8bit\n\n" + body + "\n").encode()
    assert parse_report(raw).rating == rating


# --- limits: never raises, always in bounds --------------------------------------------------

def test_headers_too_large() -> None:
    folded = b"X-Filler: " + b"x" * 70 + b"\n" + (b" " + b"y" * 70 + b"\n") * 4000  # 284 KiB
    raw = b"From: a@example.pl\n" + folded + b"\nhi\n"
    report = parse_report(raw)
    assert report.notes == ("headers too large: only the main fields read",)
    assert (report.sender, report.text, report.attachments) == ("a@example.pl", "hi", ())


def _nested(depth: int) -> bytes:
    head = [b"From: a@example.pl\nSubject: deep\n"]
    for i in range(depth):
        head.append(b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i))
    head.append(b"Content-Type: text/plain\n\nOpis: na samym dnie\n")
    head += [b"--b%d--\n" % i for i in reversed(range(depth))]
    return b"".join(head)


def test_mime_tree_cut_at_depth_20() -> None:
    assert parse_report(_nested(19)).text == "Opis: na samym dnie"
    deep = parse_report(_nested(50))
    assert deep.text == ""
    assert "MIME tree cut at depth 20" in deep.notes


def test_mime_tree_cut_at_500_parts() -> None:
    part = b"--p\nContent-Type: application/octet-stream; name=f%d.bin\n\n%d\n"
    parts = b"".join(part % (i, i) for i in range(2000))
    raw = b"From: a@example.pl\nContent-Type: multipart/mixed; boundary=p\n\n" + parts + b"--p--\n"
    report = parse_report(raw)
    assert len(report.attachments) == 499  # 500 parts with the multipart itself
    assert report.attachments[-1].filename == "f498.bin"
    assert "MIME tree cut at 500 parts" in report.notes


@pytest.mark.parametrize("raw", [
    b"", b"\n", b"\r\n\r\n", b"\x00" * 100, b"From:", b":::\n\n", b"Content-Type: multipart/mixed\n\n--",
    b"Content-Type: multipart/mixed; boundary=\"\"\n\n--\n--\n", b"Subject: =?utf-8?b?=?= =?x?q?=ZZ?=\n\n",
    b"Content-Type: text/plain; charset=x-unknown\n\n\xb3\xb9\xbf\n", b"From: " + b"(" * 5000 + b"a@b\n\n",
    b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n!!!!\n",
    b"Content-Type: text/html\n\n<html><body>" + b"<div>" * 3000 + b"x",
])
def test_odd_input_never_raises(raw: bytes) -> None:
    report = parse_report(raw)
    assert not any("failed" in n or "could not be read" in n for n in report.notes)
    assert_attachments_intact(report)


def test_unknown_charset_noted() -> None:
    raw = "Content-Type: text/plain; charset=x-unknown\n\nOpis: Błąd zapisu\n".encode("cp1250")
    report = parse_report(raw)
    assert report.text == "Opis: Błąd zapisu"
    assert report.notes == ("charset x-unknown: decoded as cp1250",)


@pytest.mark.parametrize("kind", ["short-lines", "many-parts", "big-header-lines", "big-html", "big-base64"])
def test_large_hostile_messages_parse(kind: str) -> None:
    """Huge hostile structures parse without raising and keep their attachments. (How
    long they take is a benchmark's question, bench/bench_parse.py, not a test's: a timed
    assertion fails on a loaded machine and proves nothing on a fast one.)"""
    if kind == "short-lines":
        raw = b"From: a@b.pl\n\n" + b"a\n" * 15_000_000
    elif kind == "many-parts":
        raw = b"From: a@b.pl\nContent-Type: multipart/mixed; boundary=X\n\n" + b"--X\n\nx\n" * 3_000_000
    elif kind == "big-header-lines":
        raw = b"From: a@b.pl\n" + b"X-A: b\n" * 4_000_000 + b"\nbody\n"
    elif kind == "big-html":
        raw = b"Content-Type: text/html\n\n<table>" + b"<tr><td>a</td><td>b</td></tr>" * 1_000_000
    else:
        raw = (b"From: a@b.pl\nContent-Type: multipart/mixed; boundary=B\n\n--B\n\nOpis: x\n--B\n"
               b"Content-Type: application/gzip; name=log.gz\nContent-Transfer-Encoding: base64\n\n"
               + base64.encodebytes(bytes(range(256)) * 80_000) + b"--B--\n")
    report = parse_report(raw)
    assert_attachments_intact(report)


@pytest.mark.parametrize("value, serial, commcell", [
    ("SN-7F3K-0005, CommCell ID 2A9F4", "SN-7F3K-0005", "2A9F4"),
    ("S/N: ABC-1, CommCell ID 2A9F4", "ABC-1", "2A9F4"),
    ("CCID 2A9F4", None, "2A9F4"),
])
def test_combined_device_label_keeps_the_serial_whole(value: str, serial, commcell) -> None:
    raw = ("From: a@b.pl\r\nSubject: x\r\n\r\n"
           f"5. Numer seryjny urządzenia / numer Commcell ID: {value}\r\n").encode()
    fields = parse_report(raw).fields
    assert (fields.serial_number, fields.commcell_id) == (serial, commcell)
