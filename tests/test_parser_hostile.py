"""Hostile headers (issue 13): one broken header loses only its own value; loop markers
are read whatever else is broken and however large the header section is."""

from __future__ import annotations

from gateway.model import Fields
from gateway.parser import parse_report

REPORT_BODY = (
    "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    "Imię i nazwisko: Jan Kowalski\nTelefon: 600 100 200\n"
    "Adres: ul. Długa 5, 31-147 Kraków\nOpis: Serwer nie startuje.\nNumer seryjny: SN-1\n"
)
COMPLETE = Fields(
    reporter_name="Jan Kowalski", reporter_email="jan@firma.pl", reporter_phone="+48600100200",
    install_address="ul. Długa 5, 31-147 Kraków", description="Serwer nie startuje.",
    serial_number="SN-1", commcell_id=None,
)


def mail(extra_headers: str, body: str = REPORT_BODY) -> bytes:
    return ("From: Jan Kowalski <jan@firma.pl>\nTo: serwis@s4e.pl\nSubject: Awaria [#123456]\n"
            "Message-ID: <h1@firma.pl>\n" + extra_headers + body).encode()


def test_date_that_breaks_dateutil_loses_only_the_date() -> None:
    # "1:" and 29 digits: dateutil raises decimal.InvalidOperation
    report = parse_report(mail("Date: 1:" + "9" * 29 + "\n"))
    assert report.date is None
    assert report.fields == COMPLETE
    assert report.missing == ()
    assert (report.subject, report.ticket_refs, report.message_id) == (
        "Awaria [#123456]", (123456,), "<h1@firma.pl>")
    assert not any("failed" in n for n in report.notes)


def test_broken_date_on_an_auto_reply_keeps_its_loop_markers() -> None:
    report = parse_report(mail("Date: 1:" + "9" * 29 + "\nAuto-Submitted: auto-replied\n"
                               "Precedence: bulk\nX-Loop: serwis@s4e.pl\n"))
    assert report.auto_reasons == ("auto-submitted:auto-replied", "precedence:bulk", "x-loop")


def test_inline_forward_with_600_parentheses_keeps_the_fields() -> None:
    raw = (
        "From: Sekretariat <sekretariat@firma.pl>\nSubject: PD: Awaria\n"
        "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
        "Przekazuję.\n\nOd: " + "(" * 600 + "Jan Nowak <jan.nowak@klient.pl>\n"
        "Wysłano: wtorek, 11 marca 2025 08:00\nDo: Sekretariat <sekretariat@firma.pl>\n"
        "Temat: Awaria\n\nTelefon: 600 100 200\nAdres: ul. Krótka 1, 00-001 Warszawa\n"
        "Opis: Nie działa.\nS/N: X-1\n"
    ).encode()
    report = parse_report(raw)
    assert report.notes == ()
    f = report.fields
    assert (f.reporter_phone, f.install_address, f.description, f.serial_number) == (
        "+48600100200", "ul. Krótka 1, 00-001 Warszawa", "Nie działa.", "X-1")
    assert f.reporter_email == "jan.nowak@klient.pl"  # the address survives the comment flood


def test_from_with_600_parentheses_keeps_the_rest() -> None:
    raw = ("From: " + "(" * 600 + "jan@firma.pl\nTo: serwis@s4e.pl\nSubject: Awaria\n"
           + REPORT_BODY).encode()
    report = parse_report(raw)
    assert report.sender == "jan@firma.pl"
    assert report.fields.install_address == COMPLETE.install_address
    assert report.missing == ()


def test_auto_reply_with_over_256_kib_of_headers_is_automatic() -> None:
    filler = "".join(f"X-Filler-{n}: " + "y" * 990 + "\n" for n in range(300))  # 300 KiB
    raw = mail("Auto-Submitted: auto-replied\n" + filler + "X-Loop: serwis@s4e.pl\n")
    assert len(raw) > 256 * 1024
    report = parse_report(raw)
    assert report.auto_reasons == ("auto-submitted:auto-replied", "x-loop")
    assert report.sender == "jan@firma.pl"
    assert report.fields == COMPLETE
    assert report.notes == ("headers too large: only the main fields read",)


def test_huge_folded_header_still_finds_markers_after_it() -> None:
    folded = "X-Filler: x\n" + " y\n" * 150_000  # one field of 450 KiB
    report = parse_report(mail(folded + "Precedence: junk\n"))
    assert report.auto_reasons == ("precedence:junk",)
    assert report.fields.serial_number == "SN-1"


def test_every_header_broken_at_once_still_gives_the_body() -> None:
    raw = mail("Date: 1:" + "9" * 29 + "\nCc: " + "(" * 5000 + "\nReply-To: " + '"' * 9000 + "\n"
               "References: " + "<" * 3000 + "\nIn-Reply-To: =?x?b?????=\n")
    report = parse_report(raw)
    assert report.fields == COMPLETE
    assert report.cc == () and report.reply_to == ""
