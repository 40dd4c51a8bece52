"""Field shapes of issue 16: more labels, values without labels, sender names and
addresses, the area code after a phone label. Each case is a real-shaped report."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.parser import parse_report


def mail(body: str, subject: str = "Awaria", sender: str = "Jan Kowalski <jan@firma.pl>") -> bytes:
    return (f"From: {sender}\nTo: serwis@s4e.pl\nSubject: {subject}\n"
            "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
            + body + "\n").encode()


LABELS = [
    ("Site: Serwerownia B, ul. Polna 1, 00-950 Warszawa", "install_address",
     "Serwerownia B, ul. Polna 1, 00-950 Warszawa"),
    ("Lokalizacja: ul. Polna 1, 00-950 Warszawa", "install_address", "ul. Polna 1, 00-950 Warszawa"),
    ("Miejsce instalacji: Hala 3, ul. Fabryczna 7, 90-001 Łódź", "install_address",
     "Hala 3, ul. Fabryczna 7, 90-001 Łódź"),
    ("CommServe ID: 2A3F5", "commcell_id", "2A3F5"),
    ("Nr CommCell: 2A3F5", "commcell_id", "2A3F5"),
    ("Numer CommCell - 2A3F5", "commcell_id", "2A3F5"),
    ("CCID: 2A3F5", "commcell_id", "2A3F5"),
    ("CC ID: 2A3F5", "commcell_id", "2A3F5"),
    ("CC ID 2A3F5", "commcell_id", "2A3F5"),
    ("S/N: AB-1234", "serial_number", "AB-1234"),
    ("S/N AB-1234", "serial_number", "AB-1234"),
    ("SN: AB-1234", "serial_number", "AB-1234"),
    ("SN AB-1234", "serial_number", "AB-1234"),
    ("Nr fabryczny: 0012345", "serial_number", "0012345"),
    ("Numer fabryczny urządzenia: 0012345", "serial_number", "0012345"),
    ("Telefon (0-12) 421 11 22", "reporter_phone", "+48124211122"),
    ("Telefon: (0-12) 421 11 22", "reporter_phone", "+48124211122"),
    ("Tel. (22) 555 66 77", "reporter_phone", "+48225556677"),
    ("Telefon (komórka): 600 100 200", "reporter_phone", "+48600100200"),
]


@pytest.mark.parametrize(("line", "field", "value"), LABELS, ids=[c[0] for c in LABELS])
def test_label_forms(line: str, field: str, value: str) -> None:
    report = parse_report(mail("Dzień dobry,\nOpis: Serwer nie startuje.\n" + line + "\nPozdrawiam\nJan Kowalski"))
    assert getattr(report.fields, field) == value
    assert field in report.labelled


def test_label_word_in_a_sentence_is_not_a_label() -> None:
    fields = parse_report(mail("Site is down since Monday.\nSN nie jest znany.")).fields
    assert (fields.install_address, fields.serial_number) == (None, None)


UNLABELLED = [
    ("one paragraph",
     "Dzień dobry, od rana nie działa serwer kopii zapasowych w naszej siedzibie przy ul. Długiej 5, "
     "31-147 Kraków, numer seryjny SN-7788-AB. Proszę o kontakt pod numerem 600 100 200. Anna Nowak",
     "Awaria", "biuro@firma.pl",
     {"reporter_name": "Anna Nowak", "reporter_phone": "+48600100200",
      "install_address": "ul. Długiej 5, 31-147 Kraków", "serial_number": "SN-7788-AB"}),
    ("address in the signature, serial only in the subject",
     "Nie działa biblioteka taśmowa.\nProszę o kontakt: 501 234 567\n\nPozdrawiam\nPiotr Zieliński\n"
     "Szpital Miejski, al. Jana Pawła II 12, 00-175 Warszawa",
     "Awaria biblioteki S/N: TL-4410", "it@szpital.pl",
     {"reporter_name": "Piotr Zieliński", "reporter_phone": "+48501234567",
      "install_address": "al. Jana Pawła II 12, 00-175 Warszawa", "serial_number": "TL-4410"}),
    ("commcell in a sentence",
     "Nie działa konsola, CommCell ID to 2A3F5, proszę dzwonić 600100200.", "Awaria",
     "Jan Kowalski <jan@firma.pl>",
     {"commcell_id": "2A3F5", "reporter_phone": "+48600100200", "serial_number": None}),
    ("serial only in the subject", "Nie działa.", "Awaria - SN ABC-12345", "Jan Kowalski <jan@firma.pl>",
     {"serial_number": "ABC-12345", "commcell_id": None}),
    ("commcell only in the subject", "Nie działa.", "Awaria CCID 7F3A2", "Jan Kowalski <jan@firma.pl>",
     {"serial_number": None, "commcell_id": "7F3A2"}),
    ("postal code and city only", "Serwer w biurze 80-001 Gdańsk nie działa.", "Awaria", "jan@firma.pl",
     {"install_address": "80-001 Gdańsk"}),
    ("NIP is not a phone", "Faktura na NIP 525 000 12 34. Nie działa serwer.", "Awaria", "jan@firma.pl",
     {"reporter_phone": None}),
]


@pytest.mark.parametrize(("shape", "body", "subject", "sender", "expected"), UNLABELLED,
                         ids=[c[0] for c in UNLABELLED])
def test_values_without_labels(shape: str, body: str, subject: str, sender: str,
                               expected: dict[str, str | None]) -> None:
    report = parse_report(mail(body, subject, sender))
    got = {name: getattr(report.fields, name) for name in expected}
    assert got == expected
    assert report.labelled == frozenset()  # guesses never count as labelled


def test_labelled_value_beats_the_guess() -> None:
    body = ("Serwer przy ul. Starej 1, 00-950 Warszawa stoi, S/N OLD-1 na obudowie.\n"
            "Adres: ul. Nowa 2, 30-001 Kraków\nNumer seryjny: NEW-2")
    fields = parse_report(mail(body, subject="Awaria SN SUBJ-3")).fields
    assert (fields.install_address, fields.serial_number) == ("ul. Nowa 2, 30-001 Kraków", "NEW-2")


SENDERS = [
    ("jan.kowalski@example.com (Jan Kowalski)", "Jan Kowalski", "jan.kowalski@example.com"),
    ('"Kowalski, Jan" <jan.kowalski@example.com>', "Kowalski, Jan", "jan.kowalski@example.com"),
    ("Kowalski, Jan <jan.kowalski@example.com>", "Kowalski, Jan", "jan.kowalski@example.com"),
    ('"Kowalski, Jan (IT)" <jan.kowalski@example.com>', "Kowalski, Jan (IT)", "jan.kowalski@example.com"),
    ("Jan Kowalski <jan.kowalski@example.com.>", "Jan Kowalski", "jan.kowalski@example.com"),
    ("jan.kowalski@example.com.", "", "jan.kowalski@example.com"),
    ("Jan Kowalski <jan.kowalski@example.com", "Jan Kowalski", "jan.kowalski@example.com"),
    ('"Jan Kowalski" jan.kowalski@example.com', "Jan Kowalski", "jan.kowalski@example.com"),
    ("Jan Kowalski <mailto:jan.kowalski@example.com>", "Jan Kowalski", "jan.kowalski@example.com"),
    ("Jan Kowalski [jan.kowalski@example.com]", "Jan Kowalski", "jan.kowalski@example.com"),
    ("<jan.kowalski@example.com> Jan Kowalski", "Jan Kowalski", "jan.kowalski@example.com"),
    ("Jan Kowalski <Jan.Kowalski@Example.COM>>", "Jan Kowalski", "jan.kowalski@example.com"),
    ('"Jan \\"JK\\" Kowalski" <jan.kowalski@example.com>', 'Jan "JK" Kowalski', "jan.kowalski@example.com"),
    ("=?utf-8?q?Kowalski=2C_=C5=81ukasz?= <l.kowalski@example.com>", "Kowalski, Łukasz", "l.kowalski@example.com"),
    ("Jan Kowalski <jan.kowalski@example.com>, Anna Nowak <anna@example.com>", "Jan Kowalski",
     "jan.kowalski@example.com"),
]


@pytest.mark.parametrize(("value", "name", "addr"), SENDERS, ids=[s[0] for s in SENDERS])
def test_sender_name_and_address_kept(value: str, name: str, addr: str) -> None:
    report = parse_report(mail("Opis: Nie działa.", sender=value))
    assert (report.sender_name, report.sender) == (name, addr)
    assert report.fields.reporter_email == addr
    if name and "," not in name and '"' not in name:
        assert report.fields.reporter_name == name


LOG = b"2025-03-10 08:00:01 ERROR JobManager: job 4711 failed (19:1131)\n" * 4


def _uu(data: bytes) -> bytes:
    import binascii
    return b"".join(binascii.b2a_uu(data[i : i + 45]) for i in range(0, len(data), 45))


UUENCODED = [
    ("with begin and end", b"begin 644 job.log\n" + _uu(LOG) + b"`\nend\n", LOG),
    ("without begin", _uu(LOG) + b"`\nend\n", LOG),
    ("without begin and end", _uu(LOG), LOG),
    ("blank lines between", b"begin 644 job.log\n" + _uu(LOG).replace(b"\n", b"\n\n", 1) + b"end\n", LOG),
    # kept as sent (the line break before the boundary belongs to the boundary)
    ("not uuencoded at all", b"plain text, not uuencoded\n", b"plain text, not uuencoded"),
]


@pytest.mark.parametrize(("shape", "body", "data"), UUENCODED, ids=[u[0] for u in UUENCODED])
def test_x_uuencode_part(shape: str, body: bytes, data: bytes) -> None:
    raw = (b"From: a@firma.pl\nContent-Type: multipart/mixed; boundary=B\n\n--B\n\nOpis: x\n--B\n"
           b"Content-Type: text/plain; name=job.log\nContent-Transfer-Encoding: x-uuencode\n\n"
           + body + b"--B--\n")
    [att] = parse_report(raw).attachments
    assert (att.filename, att.data, att.size) == ("job.log", data, len(data))


TWO_REPORTS = [
    ("two serials",
     "1) Opis: Nie działa serwer A.\nNumer seryjny: SRV-A\n\n2) Opis: Nie działa serwer B.\nNumer seryjny: SRV-B",
     "description, serial"),
    ("two addresses and names",
     "Imię i nazwisko: Jan Kowalski\nAdres: ul. Polna 1, 00-950 Warszawa\n\n"
     "Imię i nazwisko: Anna Nowak\nAdres: ul. Lipowa 4, 20-001 Lublin", "address, name"),
    ("same value repeated is one report",
     "Numer seryjny: SRV-A\nOpis: Nie działa.\n\nPS. Numer seryjny: SRV-A", None),
    ("one report", "Opis: Nie działa.\nNumer seryjny: SRV-A", None),
]


@pytest.mark.parametrize(("shape", "body", "keys"), TWO_REPORTS, ids=[t[0] for t in TWO_REPORTS])
def test_two_reports_in_one_mail_are_noted(shape: str, body: str, keys: str | None) -> None:
    report = parse_report(mail(body))
    notes = [n for n in report.notes if n.startswith("two reports in one mail?")]
    if keys is None:
        assert notes == []
    else:
        assert notes == [f"two reports in one mail? fields given twice with different values ({keys}): "
                         "only the first of each was read"]
        assert report.fields.serial_number in (None, "SRV-A")


def _corpus_lines() -> set[str]:
    """Every line of tests/data's messages and of the shared corpus, as text."""
    root = Path(__file__).parent
    files = [*(root / "data").rglob("*.eml"), *(root.parent.parent / "shared" / "corpus").rglob("*")]
    return {line for path in files if path.is_file()
            for line in path.read_bytes().decode("utf-8", "replace").splitlines()}


def test_the_label_prefilter_turns_away_only_lines_the_label_regex_would() -> None:
    """_LABEL_START is a quick test before the label regex's hundred alternatives: it
    may let through lines the regex refuses, never refuse one the regex takes. Every
    label (bare, bulleted, numbered) passes it, and over every line of tests/data and
    the shared corpus the label regex alone finds exactly what the two together find."""
    from gateway import parse_fields
    from gateway.parse_text import fold

    for labels in parse_fields._LABELS.values():
        for label in labels:
            for line in (label, f"  - {label}:", f"3. {label}", f"(b) {label}"):
                assert parse_fields._LABEL_START.match(fold(line)), line
    lines = {"5. numer seryjny / commcell id: 2A9F4", "s/n: X1", "sn lub ccid: 1", "Nr seryjny 12",
             *_corpus_lines()}
    from tests.conftest import REPORT_BODY
    lines.update(REPORT_BODY.splitlines())
    assert len(lines) > 3_000
    taken = 0
    for line in lines:
        folded = fold(line)
        unfiltered = parse_fields._LABEL_LINE.match(folded) if len(line) <= 1000 else None
        found = parse_fields._match_label(line, folded)
        if unfiltered is None or unfiltered.lastgroup not in parse_fields._LABEL_GROUPS:
            assert found is None, line
        else:
            assert parse_fields._LABEL_START.match(folded), line
            taken += 1
    assert taken > 50


def test_every_rating_word_holds_a_stem_the_quick_test_looks_for() -> None:
    """find_rating skips _RATING_LABEL when no stem is in the text: each of its words
    must hold one, or a rating would go unread."""
    import re

    from gateway import parse_fields

    words = re.findall(r"[a-z]+(?: [a-z]+)?", parse_fields._RATING_WORD.replace("(?: na)?", " na"))
    assert {"ocena", "rating", "rate", "score"} <= set(words)
    for word in words:
        assert any(stem in word for stem in parse_fields._RATING_STEMS), word


def test_the_attribution_prefilter_answers_as_the_attribution_regex() -> None:
    """_ends_attribution skips the regex for a text not ending in ":" (after white space):
    over every line of tests/data and the shared corpus, folded, and over endings in
    white space of every kind the regex's \\s knows, it answers exactly as the regex."""
    from gateway import parse_text

    lines = _corpus_lines()
    spaces = [chr(c) for c in range(0x3000 + 1) if chr(c).isspace()]
    for ending in ("wrote:", "napisal(a) :", "pisze :", "schrieb:", "wrote"):
        lines.update(f"On Monday Jan {ending}{space}" for space in spaces)
        lines.update(f"Jan {ending}{space}:{space}" for space in spaces)
    matched = 0
    for line in lines:
        folded = parse_text.fold(line)
        expected = parse_text._ATTRIBUTION_END.search(folded) is not None
        assert parse_text._ends_attribution(folded) == expected, line
        matched += expected
    assert matched > 100
