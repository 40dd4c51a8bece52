"""The web desk in a real browser: Debian's chromium driven by Playwright (never
`playwright install`), against a running gateway whose mailer relays to a real SMTP
sink. On failure a screenshot is saved under tests/artifacts/ and its path printed."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.conftest import CRM, Desk, Sink, body_text, make_mail, wait_for
from tests.webdesk import (JAN, PASSWORD, STRANGER, USER, Web, add_user, open_ticket,
                           running_web)

CHROMIUM = os.environ.get("S4E_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

try:
    from playwright.async_api import Page, async_playwright, expect
except ImportError:  # pragma: no cover - CI installs it with the test extras
    pytest.skip("playwright (the Python package) is not installed", allow_module_level=True)
if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture
async def web(desk_with_relay: Desk, tmp_path: Path) -> AsyncIterator[Web]:
    await add_user(desk_with_relay, tmp_path)
    async with running_web(desk_with_relay) as running:
        yield running


@pytest.fixture
async def page(request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = await browser.new_context(locale="pl-PL", accept_downloads=True)
        context.set_default_timeout(30_000)
        # expect() has a default of its own (5 s): every one here waits for something
        # to show, which after a form post on a loaded CI machine may take longer.
        expect.set_options(timeout=30_000)
        tab = await context.new_page()
        try:
            yield tab
        finally:
            await browser.close()


@asynccontextmanager
async def screenshot_on_failure(page: Page, name: str) -> AsyncIterator[None]:
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        try:
            await page.screenshot(path=str(path), full_page=True)
            print(f"\nscreenshot of the failure: {path} (at {page.url})")
        except Exception as err:  # noqa: BLE001 - the original failure matters more
            print(f"\nno screenshot: {err}")
        raise


async def sign_in(page: Page, web: Web) -> None:
    await page.goto(web.url + "/")
    assert page.url == web.url + "/login"  # 303 to the sign-in page
    await page.fill("input[name=username]", USER)
    await page.fill("input[name=password]", PASSWORD)
    await page.click("form.login button[type=submit]")
    await expect(page.locator("h1")).to_contain_text("Wymagają uwagi")


async def test_engineer_finds_reads_replies_and_changes_status(
        web: Web, page: Page, smtp_sink: Sink, tmp_path: Path) -> None:
    desk = web.desk
    number = await open_ticket(desk)
    other = await open_ticket(desk, body="Opis problemu: drukarka\nNumer seryjny: SN-55555\n",
                              mid="<other@example.com>", subject="Drukarka")
    await wait_for(lambda: len(smtp_sink.messages) == 2)  # the two acknowledgements
    attachment = tmp_path / "procedura-naprawy.txt"
    attachment.write_text("Krok 1: zrestartuj kontroler.\n", "utf-8")

    async with screenshot_on_failure(page, "engineer_works_a_ticket"):
        await sign_in(page, web)
        # find the ticket by its serial number
        await page.click("nav >> text=Zgłoszenia")
        await page.fill("input[name=q]", "SN-12345")
        await page.click("form.search button[type=submit]")
        await expect(page.locator("table.list")).to_contain_text(f"#{number}")
        await expect(page.locator("table.list")).not_to_contain_text(f"#{other}")
        await page.click(f"text=#{number}")
        await expect(page.locator("h1")).to_contain_text(f"#{number}")
        # the thread: the customer's report as text
        thread = page.locator("article.kind-customer pre.body")
        await expect(thread).to_contain_text("Serwer nie uruchamia się po aktualizacji.")
        await expect(page.locator("dd.field-serial_number")).to_have_text("SN-12345")

        # reply with an attachment
        await page.fill("textarea[name=text]", "Dzień dobry,\nw załączniku procedura.\n")
        await page.set_input_files("input[name=attachments]", str(attachment))
        await page.click("form[action$='/reply'] button[type=submit]")
        await expect(page.locator("p.done")).to_contain_text("Odpowiedź czeka na wysłanie")

        # the relay receives it from the running gateway's mailer
        await wait_for(lambda: len(smtp_sink.messages) == 3, timeout=30)
        mail = smtp_sink.parsed()[-1]
        assert smtp_sink.messages[-1][1] == [JAN]
        assert mail["Subject"] == f"[#{number}] Awaria serwera"
        assert mail["From"].addresses[0].addr_spec == CRM
        assert "w załączniku procedura." in body_text(mail)
        (part,) = list(mail.iter_attachments())
        assert part.get_filename() == "procedura-naprawy.txt"
        assert part.get_payload(decode=True) == attachment.read_bytes()
        await expect(page.locator("article.kind-staff_reply")).to_contain_text(
            "w załączniku procedura.")

        # change the status with a note for the customer
        await page.select_option("select[name=status]", "in_progress")
        await page.fill("textarea[name=note]", "Technik jest w drodze.")
        await page.click("form[action$='/status'] button[type=submit]")
        await expect(page.locator("h1 .status")).to_have_text("W realizacji")
        await expect(page.locator("p.done")).to_contain_text("klient został powiadomiony")

    ticket = await desk.ticket(number)
    assert ticket["status"] == "in_progress"
    await wait_for(lambda: len(smtp_sink.messages) == 4, timeout=30)
    assert "Technik jest w drodze." in body_text(smtp_sink.parsed()[-1])


async def test_engineer_releases_a_held_message(web: Web, page: Page) -> None:
    desk = web.desk
    number = await open_ticket(desk)
    await desk.mail(make_mail(subject=f"Re: [#{number}] Awaria", sender=STRANGER,
                              body="Jestem technikiem klienta, serwer znów działa.\n",
                              message_id="<held@example.com>"),
                    mail_from=STRANGER, rcpts=(CRM,))
    (held,) = await desk.cli_json("held", "list")

    async with screenshot_on_failure(page, "engineer_releases_held"):
        await sign_in(page, web)
        await page.click("nav >> text=Wstrzymane")
        await expect(page.locator("table.list")).to_contain_text(STRANGER)
        await page.click(f"a[href='/held/{held['id']}']")
        await expect(page.locator("pre.body")).to_contain_text("serwer znów działa")
        await page.click("text=Dołącz do zgłoszenia")
        await expect(page.locator("p.done")).to_contain_text("Wiadomość dołączona do zgłoszenia.")
        await expect(page.locator("article.kind-customer").last).to_contain_text(
            "serwer znów działa")
        await page.click("nav >> text=Wstrzymane")
        await expect(page.locator("main")).to_contain_text("Brak wstrzymanych wiadomości.")

    ticket = await desk.ticket(number)
    assert ticket["messages"][-1]["from"] == STRANGER
    assert await desk.cli_json("held", "list") == []
