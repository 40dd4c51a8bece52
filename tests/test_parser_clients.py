"""Quoted and forwarded history in the shapes real mail clients write (issue 16, class 1):
the new text ends where the history starts, and nothing quoted lands on the ticket.

The messages are our own text in the markup shapes of each client (taken from how the
clients write, and from other reply parsers' fixtures): Outlook.com/Hotmail, new Outlook,
Outlook desktop / Windows Mail, Lotus Notes/Domino, mail.ru, Yahoo, Zimbra, Apple Mail,
Thunderbird, Gmail (web and Android) in Polish and English."""

from __future__ import annotations

import pytest

from gateway.parser import parse_report

NEW = "Dzień dobry,<br>w załączeniu brakujący numer.<br>Numer seryjny: NEW-123<br>Pozdrawiam<br>Jan Kowalski"
NEW_TEXT = "Numer seryjny: NEW-123"
# What the history holds and must never reach the ticket.
OLD_VALUES = ("111 222 333", "ul. Stara 1", "00-950 Warszawa", "9Z9Z9", "OLD-999")
OLD_BODY = ("Telefon: 111 222 333<br>Adres: ul. Stara 1, 00-950 Warszawa<br>"
            "CommCell ID: 9Z9Z9<br>Numer seryjny: OLD-999")


def html_mail(html: str, subject: str = "Re: [#123456] Awaria") -> bytes:
    return ("From: Jan Kowalski <jan@firma.pl>\nTo: serwis@s4e.pl\nSubject: " + subject + "\n"
            "MIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n"
            "Content-Transfer-Encoding: 8bit\n\n<html><body>" + html + "</body></html>\n").encode()


def text_mail(text: str, subject: str = "Re: [#123456] Awaria") -> bytes:
    return ("From: Jan Kowalski <jan@firma.pl>\nTo: serwis@s4e.pl\nSubject: " + subject + "\n"
            "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
            + text + "\n").encode()


HTML_REPLIES = [
    ("outlook.com appendonsend + divRplyFwdMsg",
     f'<div dir="ltr">{NEW}</div><div id="appendonsend"></div>'
     '<hr style="display:inline-block;width:98%" tabindex="-1">'
     '<div id="divRplyFwdMsg" dir="ltr"><font face="Calibri" style="font-size:11pt">'
     "<b>Od:</b> Serwis S4E &lt;crm@s4e.pl&gt;<br><b>Wysłane:</b> poniedziałek, 10 marca 2025 08:00<br>"
     "<b>Do:</b> Jan Kowalski &lt;jan@firma.pl&gt;<br><b>Temat:</b> [#123456] Awaria</font>"
     f"<div>&nbsp;</div></div><div>{OLD_BODY}</div>"),
    ("outlook.com divRplyFwdMsg without header labels",
     f'<div>{NEW}</div><div id="divRplyFwdMsg"><b>Von:</b> crm@s4e.pl<br></div><div>{OLD_BODY}</div>'),
    ("new outlook reference container",
     f'<div>{NEW}</div><div id="mail-editor-reference-message-container"><div>'
     f"<b>From: </b>crm@s4e.pl<br><b>Date: </b>Monday, 10 March 2025<br></div><p>{OLD_BODY}</p></div>"),
    ("outlook desktop / windows mail border-top header div",
     f'<div class="WordSection1"><p class="MsoNormal">{NEW}</p>'
     '<div style="border:none;border-top:solid #E1E1E1 1.0pt;padding:3.0pt 0cm 0cm 0cm">'
     '<p class="MsoNormal"><b>From:</b> crm@s4e.pl<br><b>Sent:</b> Monday, March 10, 2025 8:00 AM<br>'
     f"<b>To:</b> jan@firma.pl<br><b>Subject:</b> Awaria</p></div><p>{OLD_BODY}</p></div>"),
    ("outlook 2010 blue border-top",
     f'<p>{NEW}</p><div style="border:none; border-top: solid #B5C4DF 1.0pt; padding:3.0pt 0cm 0cm 0cm">'
     f"<p><b>Od:</b> crm@s4e.pl <b>Wysłano:</b> 10 marca 2025</p></div><p>{OLD_BODY}</p>"),
    ("windows mail plain header block",
     f"<div>{NEW}</div><div><br></div>"
     "<div>Od: <a href='mailto:crm@s4e.pl'>Serwis</a><br>Wysłano: 10 marca 2025 08:00<br>"
     f"Do: jan@firma.pl<br>Temat: Awaria</div><div><br></div><div>{OLD_BODY}</div>"),
    ("lotus notes wrote-dashes line",
     f"<div>{NEW}</div><br><font size=2 color=#5F5F5F>-----\"Serwis S4E\" &lt;crm@s4e.pl&gt; wrote: -----"
     f"</font><br><table><tr><td>To:</td><td>jan@firma.pl</td></tr></table><div>{OLD_BODY}</div>"),
    ("lotus notes wrote on",
     f"<div>{NEW}</div><br>Serwis S4E/S4E wrote on 10.03.2025 08:00:00:<br><br>"
     f"<table><tr><td>{OLD_BODY}</td></tr></table>"),
    ("lotus notes domino section",
     f'<div>{NEW}</div><div class="domino-section"><table><tr><td>From:</td><td>crm@s4e.pl</td></tr>'
     f"</table>{OLD_BODY}</div>"),
    ("mail.ru border-left blockquote",
     f"<div>{NEW}</div><div>Понедельник, 10 марта 2025, 8:00 +01:00 от Serwis &lt;crm@s4e.pl&gt;:<br>"
     '<blockquote style="border-left:1px solid #0857A6; margin:10px; padding:0 0 0 10px;">'
     f"<div id=\"17416\"><div class=\"js-helper js-readmsg-msg\">{OLD_BODY}</div></div></blockquote></div>"),
    ("mail.ru attribution only",
     f"<div>{NEW}</div><div>Понедельник, 10 марта 2025, 8:00 +01:00 от Serwis &lt;crm@s4e.pl&gt;:"
     f"</div><div>{OLD_BODY}</div>"),
    ("yahoo_quoted div",
     f'<div class="yahoo-style-wrap">{NEW}</div><div id="yahoo_quoted_1234567" class="yahoo_quoted">'
     '<div style="font-size:13px;color:#26282a;"><div>W poniedziałek, 10 marca 2025 08:00:00 CET, '
     f"Serwis &lt;crm@s4e.pl&gt; napisał(a):</div><div><br></div><div>{OLD_BODY}</div></div></div>"),
    ("zimbra hr zwchr",
     f'<div style="font-family: arial">{NEW}</div><hr id="zwchr"><div><b>Od: </b>"Serwis" &lt;crm@s4e.pl&gt;'
     "<br><b>Do: </b>jan@firma.pl<br><b>Wysłane: </b>poniedziałek, 10 marzec 2025 8:00:00<br>"
     f'<b>Temat: </b>Awaria<br></div><br><blockquote style="border-left:2px solid #1010FF">{OLD_BODY}</blockquote>'),
    ("zimbra hr without header labels",
     f'<div>{NEW}</div><hr id="zwchr"><div>{OLD_BODY}</div>'),
    ("apple mail cite nested in divs",
     f"<div>{NEW}</div><div><br><div><blockquote type=\"cite\"><div>Wiadomość napisana przez Serwis "
     f"&lt;crm@s4e.pl&gt; w dniu 10.03.2025, o godz. 08:00:</div><br><div><div>{OLD_BODY}</div></div>"
     "</blockquote></div></div>"),
    ("apple mail attribution outside the cite",
     f"<div>{NEW}</div><div><br><div>Wiadomość napisana przez Serwis &lt;crm@s4e.pl&gt; w dniu 10.03.2025,"
     f" o godz. 08:00:</div><br><blockquote type=\"Cite\"><div>{OLD_BODY}</div></blockquote></div>"),
    ("thunderbird moz-cite-prefix",
     f'<p>{NEW}</p><div class="moz-cite-prefix">W dniu 10.03.2025 o 08:00, Serwis S4E pisze:<br></div>'
     f'<blockquote type="cite" cite="mid:t1@s4e.pl">{OLD_BODY}</blockquote>'),
    ("gmail web polish attribution",
     f'<div dir="ltr">{NEW}</div><br><div class="gmail_quote gmail_quote_container"><div dir="ltr" '
     'class="gmail_attr">pon., 10 mar 2025 o 08:00 Serwis &lt;crm@s4e.pl&gt; napisał(a):<br></div>'
     f'<blockquote class="gmail_quote" style="margin:0px 0px 0px 0.8ex">{OLD_BODY}</blockquote></div>'),
    ("original message line in html",
     f"<p>{NEW}</p><p>-----Wiadomość oryginalna-----<br>Od: crm@s4e.pl<br>Wysłano: 10 marca 2025<br>"
     f"Do: jan@firma.pl<br>Temat: Awaria</p><p>{OLD_BODY}</p>"),
]


@pytest.mark.parametrize(("client", "html"), HTML_REPLIES, ids=[c for c, _ in HTML_REPLIES])
def test_html_reply_history_never_reaches_the_ticket(client: str, html: str) -> None:
    report = parse_report(html_mail(html))
    assert NEW_TEXT in report.text
    assert report.text.rstrip().endswith("Jan Kowalski"), report.text
    for old in OLD_VALUES:
        assert old not in report.text, (client, report.text)
    f = report.fields
    assert f.serial_number == "NEW-123"
    assert (f.reporter_phone, f.install_address, f.commcell_id) == (None, None, None)
    assert report.labelled == frozenset({"serial_number"})


PLAIN = "Dzień dobry,\nw załączeniu brakujący numer.\nNumer seryjny: NEW-123\nPozdrawiam\nJan Kowalski"
OLD_PLAIN = ("Telefon: 111 222 333\nAdres: ul. Stara 1, 00-950 Warszawa\nCommCell ID: 9Z9Z9\n"
             "Numer seryjny: OLD-999")
TEXT_REPLIES = [
    ("outlook pl header block", f"{PLAIN}\n\nOd: Serwis <crm@s4e.pl>\nWysłano: poniedziałek, 10 marca 2025 08:00\n"
     f"Do: Jan Kowalski\nTemat: Awaria\n\n{OLD_PLAIN}"),
    ("outlook en header block", f"{PLAIN}\n\nFrom: Serwis <crm@s4e.pl>\nSent: Monday, March 10, 2025 8:00 AM\n"
     f"To: Jan Kowalski\nSubject: Awaria\n\n{OLD_PLAIN}"),
    ("outlook.com wysłane", f"{PLAIN}\n________________________________\nOd: Serwis <crm@s4e.pl>\n"
     f"Wysłane: poniedziałek, 10 marca 2025 08:00\nDo: jan@firma.pl\nTemat: Awaria\n\n{OLD_PLAIN}"),
    ("wiadomość oryginalna", f"{PLAIN}\n\n-----Wiadomość oryginalna-----\nOd: crm@s4e.pl\n\n{OLD_PLAIN}"),
    ("original message", f"{PLAIN}\n\n-----Original Message-----\nFrom: crm@s4e.pl\n\n{OLD_PLAIN}"),
    ("w dniu o napisał(a)", f"{PLAIN}\n\nW dniu 10.03.2025 o 08:00 Serwis <crm@s4e.pl> napisał(a):\n\n{OLD_PLAIN}"),
    ("w dniu wrapped", f"{PLAIN}\n\nW dniu pon., 10 mar 2025 o 08:00 Serwis S4E <crm@s4e.pl>\nnapisał(a):\n\n{OLD_PLAIN}"),
    ("dnia pisze", f"{PLAIN}\n\nDnia 10.03.2025 o godz. 08:00 Serwis <crm@s4e.pl> pisze:\n{OLD_PLAIN}"),
    ("gmail pl weekday attribution", f"{PLAIN}\n\npon., 10 mar 2025 o 08:00 Serwis <crm@s4e.pl> napisał(a):\n\n{OLD_PLAIN}"),
    ("on wrote", f"{PLAIN}\n\nOn Mon, 10 Mar 2025 at 08:00, Serwis <crm@s4e.pl> wrote:\n\n{OLD_PLAIN}"),
    ("lotus notes forwarded by", f"{PLAIN}\n\n----- Forwarded by Serwis/S4E on 10.03.2025 08:00 -----\n\n{OLD_PLAIN}"),
    ("lotus notes wrote dashes", f"{PLAIN}\n\n-----\"Serwis\" <crm@s4e.pl> wrote: -----\n\n{OLD_PLAIN}"),
    ("apple mail pl", f"{PLAIN}\n\nWiadomość napisana przez Serwis <crm@s4e.pl> w dniu 10.03.2025, o godz. 08:00:\n\n{OLD_PLAIN}"),
    ("gmail android wrapped quote lines",
     f"{PLAIN}\n\nW dniu pon., 10 mar 2025, 08:00 użytkownik Serwis <crm@s4e.pl> napisał:\n\n"
     "> Prosimy o numer. Ostatnio podany telefon kontaktowy 111 222 333 oraz adres\nul. Stara 1,"
     " 00-950 Warszawa i CommCell ID 9Z9Z9.\n>\n> Pozdrawiamy\n"),
]


@pytest.mark.parametrize(("shape", "text"), TEXT_REPLIES, ids=[s for s, _ in TEXT_REPLIES])
def test_plain_reply_history_never_reaches_the_ticket(shape: str, text: str) -> None:
    report = parse_report(text_mail(text))
    assert report.text == PLAIN
    f = report.fields
    assert (f.serial_number, f.reporter_phone, f.install_address, f.commcell_id) == (
        "NEW-123", None, None, None)


def test_gmail_android_wrapped_quote_under_bottom_posted_text() -> None:
    text = ("W dniu pon., 10 mar 2025, 08:00 Serwis <crm@s4e.pl> napisał(a):\n"
            "> Prosimy o numer. Ostatnio podany telefon kontaktowy 111 222 333 oraz adres\n"
            "ul. Stara 1, 00-950 Warszawa.\n> Pozdrawiamy\n\nNumer seryjny: NEW-123\n")
    report = parse_report(text_mail(text))
    assert report.text == "Numer seryjny: NEW-123"
    assert report.fields.install_address is None


def test_outlook_html_forward_is_read_from_inside() -> None:
    html = ('<div>Przekazuję zgłoszenie.</div><div id="appendonsend"></div><hr>'
            '<div id="divRplyFwdMsg"><b>Od:</b> Anna Nowak &lt;anna@klient.pl&gt;<br>'
            "<b>Wysłane:</b> poniedziałek, 10 marca 2025 08:00<br><b>Do:</b> biuro@firma.pl<br>"
            "<b>Temat:</b> Awaria</div><div><br></div>"
            "<div>Telefon: 600 100 200<br>Adres: ul. Nowa 2, 30-001 Kraków<br>Opis: Nie działa.<br>"
            "Numer seryjny: FWD-1</div>")
    report = parse_report(html_mail(html, subject="PD: Awaria"))
    f = report.fields
    assert (f.reporter_name, f.reporter_email, f.reporter_phone, f.install_address, f.serial_number) == (
        "Anna Nowak", "anna@klient.pl", "+48600100200", "ul. Nowa 2, 30-001 Kraków", "FWD-1")
