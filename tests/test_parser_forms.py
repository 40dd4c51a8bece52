"""Filled-in forms attached as PDF or .docx (issue 16, class 4): read like body text,
below the body's labelled values; hostile files cost bounded work and never raise."""

from __future__ import annotations

import base64
import io
import zipfile

import docx
import pytest

from gateway.parser import parse_report

FORM_LINES = [
    "Formularz zgłoszenia serwisowego",
    "Imię i nazwisko: Anna Nowak",
    "Telefon: 601 202 303",
    "Adres instalacji: ul. Lipowa 4, 20-001 Lublin",
    "Opis problemu: Macierz nie widzi półki 2.",
    "Numer seryjny: FORM-77",
]


def pdf_form(lines: list[str]) -> bytes:
    """A one-page PDF as form generators write it: Helvetica, WinAnsi text lines."""
    def text(line: str) -> bytes:
        raw = line.encode("cp1252", "replace")
        return b"(" + raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b") Tj"
    content = b"BT /F1 11 Tf 50 780 Td 14 TL " + b" T* ".join(text(x) for x in lines) + b" ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def docx_form(table: bool) -> bytes:
    document = docx.Document()
    document.add_paragraph(FORM_LINES[0])
    if table:  # Word forms are mostly a two-column table: label | value
        grid = document.add_table(rows=0, cols=2)
        for line in FORM_LINES[1:]:
            label, value = line.split(": ", 1)
            row = grid.add_row().cells
            row[0].text, row[1].text = label, value
    else:
        for line in FORM_LINES[1:]:
            document.add_paragraph(line)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def mail_with(attachment: bytes, name: str, ctype: str, body: str = "Dzień dobry,\nw załączeniu formularz.\n") -> bytes:
    return (b"From: Biuro Firmy <biuro@firma.pl>\nTo: serwis@s4e.pl\nSubject: Awaria\nMIME-Version: 1.0\n"
            b"Content-Type: multipart/mixed; boundary=F\n\n--F\nContent-Type: text/plain; charset=utf-8\n"
            b"Content-Transfer-Encoding: 8bit\n\n" + body.encode() + b"\n--F\nContent-Type: " + ctype.encode()
            + b"; name=\"" + name.encode() + b"\"\nContent-Disposition: attachment; filename=\"" + name.encode()
            + b"\"\nContent-Transfer-Encoding: base64\n\n" + base64.encodebytes(attachment) + b"--F--\n")


DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
FORMS = [
    ("pdf", lambda: pdf_form([line.replace("ę", "e").replace("ł", "l").replace("ó", "ó") for line in FORM_LINES]),
     "zgloszenie.pdf", "application/pdf"),
    ("docx paragraphs", lambda: docx_form(table=False), "zgłoszenie.docx", DOCX),
    ("docx table", lambda: docx_form(table=True), "zgłoszenie.docx", DOCX),
    ("docx as octet-stream", lambda: docx_form(table=True), "formularz.docx", "application/octet-stream"),
]


@pytest.mark.parametrize(("kind", "make", "name", "ctype"), FORMS, ids=[f[0] for f in FORMS])
def test_form_in_attachment_fills_the_report(kind, make, name, ctype) -> None:
    report = parse_report(mail_with(make(), name, ctype))
    f = report.fields
    assert f.reporter_name == "Anna Nowak"  # the form beats the From name "Biuro Firmy"
    assert f.reporter_phone == "+48601202303"
    assert f.install_address == "ul. Lipowa 4, 20-001 Lublin"
    assert f.description in ("Macierz nie widzi półki 2.", "Macierz nie widzi pólki 2.")
    assert f.serial_number == "FORM-77"
    assert f.reporter_email == "biuro@firma.pl"
    assert report.missing == ()
    assert {"reporter_name", "reporter_phone", "install_address", "serial_number"} <= report.labelled
    assert any(n.startswith(f"fields read from attachment {name}") for n in report.notes)
    assert [a.filename for a in report.attachments] == [name]  # still attached as sent


def test_body_values_win_over_the_form() -> None:
    body = "Telefon: 500 600 700\nNumer seryjny: BODY-1\n"
    report = parse_report(mail_with(docx_form(table=True), "f.docx", DOCX, body))
    f = report.fields
    assert (f.reporter_phone, f.serial_number) == ("+48500600700", "BODY-1")
    assert f.install_address == "ul. Lipowa 4, 20-001 Lublin"  # the body had none


def _zip_bomb() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", b"<w:document>" + b" " * (50 * 1024 * 1024))
    return out.getvalue()


HOSTILE = [
    ("not a pdf", b"%PDF-1.4\n" + b"\x00\xff" * 500, "a.pdf", "application/pdf"),
    ("truncated pdf", pdf_form(FORM_LINES)[:200], "a.pdf", "application/pdf"),
    ("deeply nested pdf", b"%PDF-1.4\n1 0 obj\n" + b"[" * 50_000 + b"\nendobj\ntrailer<</Root 1 0 R>>\n%%EOF",
     "a.pdf", "application/pdf"),
    ("many pages", pdf_form(FORM_LINES).replace(b"/Count 1", b"/Count 100000000"), "a.pdf", "application/pdf"),
    ("docx zip bomb", _zip_bomb(), "a.docx", DOCX),
    ("docx not a zip", b"PK\x03\x04" + b"\x00" * 100, "a.docx", DOCX),
]


@pytest.mark.parametrize(("kind", "data", "name", "ctype"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_form_files_are_kept_and_never_raise(kind, data, name, ctype) -> None:
    report = parse_report(mail_with(data, name, ctype, "Opis: Nie działa.\n"))
    assert report.fields.description == "Nie działa."
    [att] = report.attachments
    assert (att.filename, att.data) == (name, data)
    assert not any("could not be read" in n or "failed" in n for n in report.notes)
