"""The web desk over real HTTP (uvicorn on 127.0.0.1:0) on a running gateway's
database: sign-in, sessions, CSRF, headers, downloads, and the actions' effects seen
as the CLI's JSON and the mail that leaves."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email import policy
from pathlib import Path

import pytest

from gateway.config import WebConfig
from gateway.web.app import CSP, TEXT_VIEW_LIMIT
from tests.conftest import CRM, Desk, REPORT_BODY, body_text, make_mail, run_sql, write_lock_held
from tests.webdesk import (EMAIL, JAN, PASSWORD, USER, Web, add_user, csrf_of, form_token,
                           STRANGER, open_ticket, running_web, sign_in, signed_in)

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL


@pytest.fixture
async def web(desk: Desk, tmp_path: Path) -> AsyncIterator[Web]:
    await add_user(desk, tmp_path)
    async with running_web(desk) as running:
        yield running


def mail_with_attachment(filename: str, data: bytes, content_type: str = "text/plain",
                         subject: str = "Awaria serwera", mid: str = "<att@example.com>") -> bytes:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = f"Jan Kowalski <{JAN}>"
    msg["To"] = "serwis@s4e.pl"
    msg["Subject"] = subject
    msg["Message-ID"] = mid
    msg.set_content(REPORT_BODY)
    maintype, subtype = content_type.split("/")
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


# --- nobody without a sign-in sees a byte ---------------------------------------------

async def test_every_page_sends_strangers_to_login(web: Web) -> None:
    number = await open_ticket(web.desk, subject="Tajny temat klienta")
    await web.desk.mail(make_mail(subject=f"Re: [#{number}]", sender=STRANGER, body="x\n",
                                  message_id="<h@example.com>"),
                        mail_from=STRANGER, rcpts=(CRM,))
    (held,) = await web.desk.cli_json("held", "list")
    ticket = await web.desk.ticket(number)
    pages = ["/", "/tickets", f"/tickets?q={number}", f"/tickets/{number}", "/held",
             f"/held/{held['id']}", f"/inbox/{held['inbound_id']}",
             f"/inbox/{held['inbound_id']}/raw", "/outbox",
             f"/tickets/{number}/attachments/{'0' * 64}"]
    async with web.client() as client:
        for path in pages:
            response = await client.get(path)
            assert (response.status_code, response.headers.get("location")) == (303, "/login"), path
            assert "Tajny" not in response.text and number not in response.text, path
        # a forged session cookie is no session
        client.cookies.set("s4e_session", "forged")
        assert (await client.get(f"/tickets/{number}")).status_code == 303
        for path in (f"/tickets/{number}/status", f"/tickets/{number}/reply",
                     f"/held/{held['id']}/release", f"/held/{held['id']}/drop"):
            response = await client.post(path, data={"status": "closed", "text": "x"})
            assert (response.status_code, response.headers.get("location")) == (303, "/login")
    assert (await web.desk.ticket(number))["status"] == ticket["status"]
    assert (await web.desk.cli_json("held", "list"))[0]["status"] == "held"


async def test_sign_in_sets_strict_http_only_cookie_and_sign_out_ends_it(web: Web) -> None:
    async with web.client() as client:
        login = await client.get("/login")
        assert login.status_code == 200 and 'name="username"' in login.text
        assert "Zaloguj się" in login.text and 'lang="pl"' in login.text
        response = await client.post("/login", data={"username": USER, "password": PASSWORD,
                                                     "csrf": csrf_of(login.text)})
        assert (response.status_code, response.headers["location"]) == (303, "/")
        (cookie,) = [c for c in response.headers.get_list("set-cookie")
                     if c.startswith("s4e_session=")]
        flags = {part.strip().lower() for part in cookie.split(";")}
        assert {"httponly", "samesite=strict", "path=/"} <= flags
        assert "secure" not in flags  # secure_cookies = false by default
        home = await client.get("/")
        assert home.status_code == 200 and "Wymagają uwagi" in home.text and USER in home.text
        assert (await client.get("/login")).headers["location"] == "/"  # already signed in
        out = await client.post("/logout", data={"csrf": csrf_of(home.text)})
        assert (out.status_code, out.headers["location"]) == (303, "/login")
        assert (await client.get("/")).status_code == 303


async def test_secure_cookies_option_marks_the_cookie_secure(desk: Desk, tmp_path: Path) -> None:
    await add_user(desk, tmp_path)
    async with running_web(desk, WebConfig(secure_cookies=True)) as web:
        async with web.client() as client:
            response = await client.get("/login")
            # over plain HTTP the browser keeps a Secure cookie to itself: no sign-in
            refused = await client.post("/login", data={
                "username": USER, "password": PASSWORD, "csrf": csrf_of(response.text)})
    (cookie,) = response.headers.get_list("set-cookie")
    assert cookie.startswith("s4e_login=")
    assert "secure" in {p.strip().lower() for p in cookie.split(";")}
    assert refused.status_code == 403


async def test_wrong_password_and_unknown_user_get_the_same_answer(web: Web) -> None:
    async with web.client() as client:
        wrong = await sign_in(client, password="nie-to-hasło")
        unknown = await sign_in(client, name="nikt")
    for response in (wrong, unknown):
        assert response.status_code == 401
        assert "Nieprawidłowa nazwa użytkownika lub hasło." in response.text
        assert "s4e_session=" not in response.headers.get("set-cookie", "")


async def test_sign_in_is_rate_limited_per_user(web: Web) -> None:
    async with web.client() as client:
        for _ in range(web.config.web.login_attempts):
            assert (await sign_in(client, password="zgadywanie-1")).status_code == 401
        blocked = await sign_in(client)  # even the right password, while blocked
        assert blocked.status_code == 429
        assert "Zbyt wiele nieudanych prób logowania" in blocked.text
        web.clock.offset = 16 * 60  # the failures age out of login_window (15m)
        assert (await sign_in(client)).status_code == 303


async def test_sign_in_is_rate_limited_per_client_across_names(desk: Desk,
                                                               tmp_path: Path) -> None:
    await add_user(desk, tmp_path)
    async with running_web(desk, WebConfig(login_attempts=2)) as web:
        async with web.client() as client:
            for i in range(4 * 2):
                response = await sign_in(client, name=f"user{i}", password="x" * 12)
                assert response.status_code == 401
            assert (await sign_in(client)).status_code == 429


async def test_session_expires_after_its_lifetime(web: Web) -> None:
    async with signed_in(web) as client:
        assert (await client.get("/tickets")).status_code == 200
        web.clock.offset = 12 * 3600 + 1  # session_lifetime = "12h"
        response = await client.get("/tickets")
        assert (response.status_code, response.headers["location"]) == (303, "/login")


async def test_pages_are_served_while_the_daemon_holds_the_write_lock(web: Web) -> None:
    """WAL readers: a long write transaction elsewhere (busy_timeout is 10 s) does not
    hold up reading, so these requests finish within the client's 5 s."""
    number = await open_ticket(web.desk)
    async with signed_in(web, timeout=5) as client:
        with write_lock_held(web.desk.db):
            for path in ("/", "/tickets", f"/tickets/{number}", "/held", "/outbox"):
                assert (await client.get(path)).status_code == 200, path


# --- CSRF and headers --------------------------------------------------------------------

async def test_posts_without_the_session_token_are_refused(web: Web) -> None:
    number = await open_ticket(web.desk)
    async with signed_in(web) as client:
        for data in ({"status": "in_progress"}, {"status": "in_progress", "csrf": "guess"}):
            response = await client.post(f"/tickets/{number}/status", data=data)
            assert response.status_code == 403
            assert "Formularz wygasł" in response.text
        token = await form_token(client, f"/tickets/{number}")
        response = await client.post(f"/tickets/{number}/status",
                                     data={"status": "in_progress", "csrf": token})
        assert response.status_code == 303
    assert (await web.desk.ticket(number))["status"] == "in_progress"


async def test_login_form_needs_its_token_too(web: Web) -> None:
    async with web.client() as client:
        response = await client.post("/login", data={"username": USER, "password": PASSWORD})
        assert response.status_code == 403 and "s4e_session=" not in str(response.headers)


async def test_security_headers_on_every_response(web: Web) -> None:
    number = await open_ticket(web.desk)
    async with signed_in(web) as client:
        for path in ("/login", "/", f"/tickets/{number}", "/nothing-here", "/static/desk.css"):
            response = await client.get(path)
            headers = response.headers
            assert headers["content-security-policy"] == CSP, path
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["x-frame-options"] == "DENY"
            assert headers["referrer-policy"] == "no-referrer"
            assert "<script" not in response.text.lower()
            if path != "/static/desk.css":
                assert headers["cache-control"] == "no-store"
    assert "script-src" not in CSP and "unsafe-inline" not in CSP
    assert "default-src 'none'" in CSP


# --- customer data: escaped, downloadable, never another ticket's -------------------------

async def test_customer_text_is_escaped_never_rendered(web: Web) -> None:
    evil = "<script>alert(1)</script><b>gruby</b><img src=x onerror=alert(2)>"
    body = f"Imię i nazwisko: Jan Kowalski\nTelefon: 600 100 200\nAdres instalacji: ul. {evil}\n" \
           f"Opis problemu: {evil}\nNumer seryjny: SN-777\n"
    number = await open_ticket(web.desk, body=body, subject=f"Awaria {evil}")
    async with signed_in(web) as client:
        for path in (f"/tickets/{number}", "/tickets", "/"):
            html = (await client.get(path)).text
            assert "<script>" not in html and "<b>gruby" not in html and "<img" not in html, path
        html = (await client.get(f"/tickets/{number}")).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


async def test_customer_html_mail_is_never_rendered(web: Web) -> None:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = f"Jan Kowalski <{JAN}>"
    msg["To"] = "serwis@s4e.pl"
    msg["Subject"] = "Awaria"
    msg["Message-ID"] = "<html@example.com>"
    msg.set_content("<html><body><p>Opis problemu: <b>dysk</b> pełny</p>"
                    "<script>alert(1)</script><iframe src='http://evil.example'></iframe>"
                    "<p>Numer seryjny: SN-4242</p></body></html>", subtype="html")
    number = await open_ticket(web.desk, raw=msg.as_bytes())
    (row,) = await web.desk.inbox()
    async with signed_in(web) as client:
        for path in (f"/tickets/{number}", f"/inbox/{row['id']}"):
            html = (await client.get(path)).text
            assert "dysk" in html, path
            assert "<b>dysk" not in html and "<iframe" not in html and "<script" not in html


async def test_attachment_download_and_text_view(web: Web) -> None:
    log_text = "ERROR <b>disk</b> full\nzażółć gęślą jaźń\n" * 3
    raw = mail_with_attachment('serwer "01".log', log_text.encode())
    number = await open_ticket(web.desk, raw=raw)
    (attachment,) = (await web.desk.ticket(number))["attachments"]
    url = f"/tickets/{number}/attachments/{attachment['sha256']}"
    async with signed_in(web) as client:
        download = await client.get(url)
        assert download.status_code == 200 and download.content == log_text.encode()
        assert download.headers["content-type"] == "application/octet-stream"
        assert download.headers["x-content-type-options"] == "nosniff"
        disposition = download.headers["content-disposition"]
        assert disposition.startswith("attachment;")
        assert "filename*=UTF-8''serwer%20%2201%22.log" in disposition
        assert '"serwer_01_.log"' in disposition  # the quoted fallback holds no quotes
        view = await client.get(url + "?view=text")
        assert view.status_code == 200
        assert "ERROR &lt;b&gt;disk&lt;/b&gt; full" in view.text and "zażółć gęślą jaźń" in view.text
        assert "<b>disk" not in view.text
        # a hash that exists, asked for under another ticket, is not found there
        other = await open_ticket(web.desk, mid="<other@example.com>")
        refused = await client.get(f"/tickets/{other}/attachments/{attachment['sha256']}")
        assert refused.status_code == 404 and log_text[:10] not in refused.text
        assert (await client.get(f"/tickets/{number}/attachments/..%2F..%2Fgw.db")).status_code == 404
        assert (await client.get("/tickets/12345/attachments/" + "a" * 64)).status_code == 404


async def test_text_view_of_a_large_log_is_capped(web: Web) -> None:
    data = b"0123456789abcdef" * (TEXT_VIEW_LIMIT // 16 + 4096)
    number = await open_ticket(web.desk, raw=mail_with_attachment("big.log", data))
    (attachment,) = (await web.desk.ticket(number))["attachments"]
    async with signed_in(web) as client:
        view = await client.get(f"/tickets/{number}/attachments/{attachment['sha256']}?view=text")
    assert "Pokazano początek pliku" in view.text
    assert len(view.content) < TEXT_VIEW_LIMIT + 64 * 1024


async def test_inbound_message_headers_text_and_raw(web: Web) -> None:
    await open_ticket(web.desk, subject="Awaria <serwera>")
    (row,) = await web.desk.inbox()
    async with signed_in(web) as client:
        page = await client.get(f"/inbox/{row['id']}")
        assert page.status_code == 200
        assert "<dt>Message-ID</dt><dd>&lt;r1@example.com&gt;</dd>" in page.text
        assert "<dt>Subject</dt><dd>Awaria &lt;serwera&gt;</dd>" in page.text
        assert "Serwer nie uruchamia się po aktualizacji." in page.text
        raw = await client.get(f"/inbox/{row['id']}/raw")
        assert raw.headers["content-disposition"].startswith("attachment;")
        assert b"Subject: Awaria <serwera>" in raw.content
        assert (await client.get("/inbox/999999")).status_code == 404


# --- actions: the CLI's code path ----------------------------------------------------------

async def test_status_change_notifies_the_reporter_and_records_the_engineer(web: Web) -> None:
    number = await open_ticket(web.desk)
    async with signed_in(web) as client:
        token = await form_token(client, f"/tickets/{number}")
        response = await client.post(f"/tickets/{number}/status", data={
            "status": "in_progress", "note": "Technik przyjedzie jutro.", "csrf": token})
        assert (response.status_code, response.headers["location"]) == (
            303, f"/tickets/{number}?done=status")
        page = await client.get(response.headers["location"])
        assert "Status zmieniony; klient został powiadomiony." in page.text
        options = re.findall(r'<option value="(\w+)">', page.text.split('name="status"')[1].split("</select>")[0])
        assert options[0] == "resolved" and options[-1] == "closed"  # closing is never preset
        assert "W realizacji" in page.text
        refused = await client.post(f"/tickets/{number}/status",
                                    data={"status": "accepted", "csrf": token})
        assert refused.status_code == 409 and "cannot go from in_progress to accepted" in refused.text
    ticket = await web.desk.ticket(number)
    assert ticket["status"] == "in_progress"
    assert ticket["history"][-1]["actor"] == EMAIL
    notice = web.desk.mails_to(JAN)[-1]
    assert "Technik przyjedzie jutro." in body_text(notice)


async def test_web_reply_is_the_same_mail_as_a_cli_reply(web: Web, tmp_path: Path) -> None:
    number = await open_ticket(web.desk)
    text = "Dzień dobry,\nproszę o zrzut ekranu błędu.\n"
    attachment = b"instrukcja: krok 1, krok 2\n"
    async with signed_in(web) as client:
        token = await form_token(client, f"/tickets/{number}")
        response = await client.post(
            f"/tickets/{number}/reply", data={"text": text.replace("\n", "\r\n"), "csrf": token},
            files=[("attachments", ("instrukcja.txt", attachment, "text/plain"))])
        assert (response.status_code, response.headers["location"]) == (
            303, f"/tickets/{number}?done=reply")
    (tmp_path / "msg.txt").write_text(text, "utf-8")
    (tmp_path / "instrukcja.txt").write_bytes(attachment)
    await web.desk.cli("tickets", "reply", number, "--message-file", str(tmp_path / "msg.txt"),
                       "--attach", str(tmp_path / "instrukcja.txt"))
    web_mail, cli_mail = web.desk.mails_to(JAN)[-2:]
    for header in ("From", "To", "Subject", "Reply-To", "Auto-Submitted"):
        assert web_mail[header] == cli_mail[header], header
    assert web_mail.get_content_type() == cli_mail.get_content_type()
    assert web_mail["In-Reply-To"] in cli_mail["References"]  # the thread goes on
    assert body_text(web_mail) == body_text(cli_mail) and "zrzut ekranu" in body_text(web_mail)
    parts = [[(p.get_filename(), p.get_content_type(), p.get_payload(decode=True))
              for p in m.iter_attachments()] for m in (web_mail, cli_mail)]
    assert parts[0] == parts[1] == [("instrukcja.txt", "text/plain", attachment)]
    history = (await web.desk.ticket(number))["history"]
    assert [h["actor"] for h in history if "reply sent" in (h["note"] or "")][0] == EMAIL


async def test_note_assign_and_field_edit_go_through_the_staff_code(web: Web) -> None:
    number = await open_ticket(web.desk)
    mails_before = len(web.desk.outbox())
    async with signed_in(web) as client:
        token = await form_token(client, f"/tickets/{number}")
        note = await client.post(f"/tickets/{number}/note", data={
            "text": "Klient <b>prosi</b> o telefon po 15:00.", "csrf": token})
        assert note.headers["location"] == f"/tickets/{number}?done=note"
        assign = await client.post(f"/tickets/{number}/assign", data={
            "engineer": "Piotr.Serwis@s4e.pl", "csrf": token})
        assert assign.headers["location"] == f"/tickets/{number}?done=assign"
        field = await client.post(f"/tickets/{number}/field", data={
            "field": "serial_number", "value": "SN-54321", "csrf": token})
        assert field.headers["location"] == f"/tickets/{number}?done=field"
        page = (await client.get(field.headers["location"])).text
        assert "Pole poprawione." in page and "SN-54321" in page
        assert "piotr.serwis@s4e.pl" in page
        assert "Klient &lt;b&gt;prosi&lt;/b&gt; o telefon po 15:00." in page
        for path, data, message in (
                ("assign", {"engineer": "obcy@example.com"}, "is not a staff address"),
                ("field", {"field": "color", "value": "x"}, "unknown field"),
                ("note", {"text": " "}, "the note is empty")):
            refused = await client.post(f"/tickets/{number}/{path}", data={**data, "csrf": token})
            assert refused.status_code == 400 and message in refused.text, path
    ticket = await web.desk.ticket(number)
    assert ticket["assignee"] == "piotr.serwis@s4e.pl" and ticket["serial_number"] == "SN-54321"
    assert ticket["messages"][-1]["kind"] == "staff_note"
    assert {h["actor"] for h in ticket["history"][-3:]} == {EMAIL}
    assert len(web.desk.outbox()) == mails_before  # a note, an assignment, a field: no mail
    (found,) = await web.desk.cli_json("tickets", "list", "--search", "SN-54321")
    assert found["number"] == number


async def test_empty_reply_and_bad_number_get_a_clear_answer(web: Web) -> None:
    number = await open_ticket(web.desk)
    async with signed_in(web) as client:
        token = await form_token(client, f"/tickets/{number}")
        empty = await client.post(f"/tickets/{number}/reply", data={"text": "  ", "csrf": token})
        assert empty.status_code == 400 and "the message is empty" in empty.text
        assert (await client.get("/tickets/12ab56")).status_code == 404
        assert (await client.get("/tickets/123456")).status_code == 404
    assert len(web.desk.mails_to(JAN)) == 1  # the acknowledgement only


async def test_search_by_serial_and_status_filter(web: Web) -> None:
    first = await open_ticket(web.desk)
    other_body = REPORT_BODY.replace("SN-12345", "SN-99999")
    second = await open_ticket(web.desk, body=other_body, mid="<second@example.com>")
    async with signed_in(web) as client:
        page = (await client.get("/tickets", params={"q": "SN-99999"})).text
        assert f"#{second}" in page and f"#{first}" not in page
        page = (await client.get("/tickets", params={"q": first})).text
        assert f"#{first}" in page and f"#{second}" not in page
        page = (await client.get("/tickets", params={"status": "closed"})).text
        assert f"#{first}" not in page and "Brak zgłoszeń." in page
        page = (await client.get("/tickets")).text
        assert "2 zgłoszenia" in page


async def test_attention_lists_waiting_customers_oldest_first(web: Web) -> None:
    first = await open_ticket(web.desk)
    second = await open_ticket(web.desk, mid="<second@example.com>")
    async with signed_in(web) as client:
        page = (await client.get("/")).text
        assert page.index(f"#{first}") < page.index(f"#{second}")
        assert "2 zgłoszenia" in page
        token = csrf_of(page)
        await client.post(f"/tickets/{first}/reply", data={"text": "Już sprawdzamy.", "csrf": token})
        page = (await client.get("/")).text
        assert f"#{first}" not in page and f"#{second}" in page and "1 zgłoszenie" in page


async def test_held_release_and_drop(web: Web) -> None:
    number = await open_ticket(web.desk)
    for mid in ("<h1@example.com>", "<h2@example.com>"):
        await web.desk.mail(make_mail(subject=f"Re: [#{number}] Awaria", sender=STRANGER,
                                      body="Dopisuję <i>informację</i>.\n", message_id=mid),
                            mail_from=STRANGER, rcpts=(CRM,))
    first, second = await web.desk.cli_json("held", "list")
    async with signed_in(web) as client:
        listing = (await client.get("/held")).text
        assert STRANGER in listing and "2 wiadomości" in listing
        page = await client.get(f"/held/{first['id']}")
        assert "Dopisuję &lt;i&gt;informację&lt;/i&gt;." in page.text
        token = csrf_of(page.text)
        released = await client.post(f"/held/{first['id']}/release", data={"csrf": token})
        assert (released.status_code, released.headers["location"]) == (
            303, f"/tickets/{number}?done=release")
        again = await client.post(f"/held/{first['id']}/release", data={"csrf": token})
        assert again.status_code == 400 and "already released" in again.text
        dropped = await client.post(f"/held/{second['id']}/drop", data={"csrf": token})
        assert (dropped.status_code, dropped.headers["location"]) == (303, "/held?done=drop")
        assert "Brak wstrzymanych wiadomości." in (await client.get("/held")).text
    ticket = await web.desk.ticket(number)
    assert [m["from"] for m in ticket["messages"]].count(STRANGER) == 1
    assert await web.desk.cli_json("held", "list") == []


async def test_held_release_as_a_new_ticket_records_the_engineer(web: Web) -> None:
    number = await open_ticket(web.desk)
    await web.desk.mail(make_mail(subject=f"Re: [#{number}] Nowa awaria", sender=STRANGER,
                                  body=REPORT_BODY, message_id="<new@example.com>"),
                        mail_from=STRANGER, rcpts=(CRM,))
    (held,) = await web.desk.cli_json("held", "list")
    async with signed_in(web) as client:
        token = await form_token(client, f"/held/{held['id']}")
        response = await client.post(f"/held/{held['id']}/release",
                                     data={"csrf": token, "new_ticket": "1"})
        assert response.status_code == 303
        new_number = re.search(r"/tickets/(\d{6})\?done=release", response.headers["location"])[1]
    assert new_number != number
    assert (await web.desk.ticket(new_number))["messages"][0]["from"] == STRANGER
    (decided,) = await web.desk.cli_json("held", "list", "--all")
    assert (decided["status"], decided["decided_by"]) == ("released", EMAIL)


async def test_confirm_phone(desk: Desk, tmp_path: Path) -> None:
    contracts = tmp_path / "contracts.csv"
    contracts.write_text("device_id,customer,repair_hours\nSN-12345,ACME,8\n", "utf-8")
    await desk.cli("contracts", "import", str(contracts))
    await add_user(desk, tmp_path)
    async with running_web(desk) as web:
        number = await open_ticket(desk)
        async with signed_in(web) as client:
            page = (await client.get("/")).text
            assert "telefon do potwierdzenia" in page and f"#{number}" in page
            token = await form_token(client, f"/tickets/{number}")
            response = await client.post(f"/tickets/{number}/confirm-phone", data={"csrf": token})
            assert response.status_code == 303
            again = await client.post(f"/tickets/{number}/confirm-phone", data={"csrf": token})
            assert again.status_code == 400 and "already recorded" in again.text
    assert (await desk.ticket(number))["phone_confirmed"] is True


# --- SSO header ---------------------------------------------------------------------------

async def test_sso_header_counts_only_from_trusted_proxies(desk: Desk, tmp_path: Path) -> None:
    await add_user(desk, tmp_path)
    number = await open_ticket(desk)
    trusted = WebConfig(trusted_proxies=("127.0.0.0/8",), remote_user_header="X-Remote-User")
    async with running_web(desk, trusted) as web:
        async with web.client(headers={"X-Remote-User": USER}) as client:
            page = await client.get(f"/tickets/{number}")
            assert page.status_code == 200 and "Awaria serwera" in page.text
            response = await client.post(f"/tickets/{number}/status", data={
                "status": "in_progress", "csrf": csrf_of(page.text)})
            assert response.status_code == 303
        async with web.client(headers={"X-Remote-User": "nieznany"}) as client:
            assert (await client.get("/")).status_code == 303
    assert (await desk.ticket(number))["history"][-1]["actor"] == EMAIL
    untrusted = WebConfig(trusted_proxies=("10.0.0.1",), remote_user_header="X-Remote-User")
    async with running_web(desk, untrusted) as web:
        async with web.client(headers={"X-Remote-User": USER}) as client:
            response = await client.get(f"/tickets/{number}")
            assert (response.status_code, response.headers["location"]) == (303, "/login")


async def test_behind_a_trusted_proxy_the_forwarded_client_is_rate_limited(
        desk: Desk, tmp_path: Path) -> None:
    await add_user(desk, tmp_path)
    proxy = WebConfig(trusted_proxies=("127.0.0.1",), login_attempts=1)
    async with running_web(desk, proxy) as web:
        async with web.client(headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}) as client:
            for i in range(4):
                assert (await sign_in(client, name=f"u{i}", password="x" * 12)).status_code == 401
            assert (await sign_in(client)).status_code == 429
        async with web.client(headers={"X-Forwarded-For": "203.0.113.8"}) as other:
            assert (await sign_in(other)).status_code == 303  # another client behind it
    clients = {r[0] for r in run_sql(desk.db, "SELECT client FROM login_attempts")}
    assert clients == {"203.0.113.7"}


# --- English ------------------------------------------------------------------------------

@pytest.mark.parametrize("desk_options", ['[tickets]\nlanguage = "en"\ntimezone = "UTC"\n'])
async def test_english_interface_and_local_times(web: Web) -> None:
    number = await open_ticket(web.desk)
    async with signed_in(web) as client:
        page = (await client.get(f"/tickets/{number}")).text
    assert 'lang="en"' in page and "Change status" in page and "Accepted" in page
    created = (await web.desk.ticket(number))["created_at"]
    assert created[:16].replace("T", " ") in page  # UTC as configured


async def test_times_are_shown_in_warsaw_time_by_default(web: Web) -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    number = await open_ticket(web.desk)
    created = (await web.desk.ticket(number))["created_at"]
    local = datetime.fromisoformat(created).astimezone(ZoneInfo("Europe/Warsaw"))
    async with signed_in(web) as client:
        page = (await client.get(f"/tickets/{number}")).text
    assert local.strftime("%Y-%m-%d %H:%M") in page


def test_polish_plurals() -> None:
    from gateway.web.i18n import Language

    lang = Language("pl", "Europe/Warsaw")
    assert [lang.count(n, "ticket") for n in (0, 1, 2, 4, 5, 11, 12, 21, 22, 25, 104, 112)] == [
        "0 zgłoszeń", "1 zgłoszenie", "2 zgłoszenia", "4 zgłoszenia", "5 zgłoszeń",
        "11 zgłoszeń", "12 zgłoszeń", "21 zgłoszeń", "22 zgłoszenia", "25 zgłoszeń",
        "104 zgłoszenia", "112 zgłoszeń"]
    assert Language("en", "UTC").count(1, "message") == "1 message"


async def test_outbox_lists_failed_mail_and_retries_it(desk_with_relay: Desk, smtp_sink,
                                                       tmp_path: Path) -> None:
    desk = desk_with_relay
    smtp_sink.fail_next.append("550 5.1.1 Mailbox unavailable")
    await add_user(desk, tmp_path)
    number = await open_ticket(desk)

    from tests.conftest import wait_for

    failed = await wait_for(lambda: desk.cli_json("outbox", "list", "--status", "failed"))
    async with running_web(desk) as web:
        async with signed_in(web) as client:
            page = await client.get("/outbox")
            assert "Mailbox unavailable" in page.text and f"#{number}" in page.text
            response = await client.post(f"/outbox/{failed[0]['id']}/retry",
                                         data={"csrf": csrf_of(page.text)})
            assert (response.status_code, response.headers["location"]) == (303, "/outbox?done=retry")
            again = await client.post(f"/outbox/{failed[0]['id']}/retry",
                                      data={"csrf": csrf_of(page.text)})
            assert again.status_code == 400 and "only failed or bounced" in again.text
    await wait_for(lambda: len(smtp_sink.messages) == 1)
    assert re.search(rf"\[#{number}\]", smtp_sink.parsed()[0]["Subject"])
