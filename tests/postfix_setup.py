"""The pieces the Postfix tests share: a private Postfix from the recipe, the gateway
behind it (the real `Gateway`, restartable on the same port), the customer's side and
the sinks that stand in for other mail servers."""

from __future__ import annotations

import asyncio
import os
import smtplib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.daemon import Gateway
from tests.conftest import Desk, Sink, make_mail, wait_for
from tests.postfix_instance import Postfix, PostfixError, free_port

# Customers connect from another loopback address than the gateway (127.0.0.1), so
# Postfix treats them as the outside world (mynetworks is 127.0.0.1/32).
CUSTOMER_ADDRESS = "127.0.0.2"

# The customer, whose domain example.com Postfix delivers to a sink; the report names
# the sender's own address, so every answer goes to CUSTOMER alone.
CUSTOMER = "jan.kowalski@example.com"
REPORT_BODY = f"""Dzień dobry,

1. Imię i nazwisko osoby zgłaszającej problem: Jan Kowalski
2. Dane kontaktowe osoby zgłaszającej (mail, telefon): {CUSTOMER}, tel. 600 100 200
3. Adres instalacji sprzętu – realizacji naprawy: ul. Prosta 1, 30-001 Kraków
4. Opis problemu: Serwer nie uruchamia się po aktualizacji.
5. Numer seryjny urządzenia / numer Commcell ID: SN-12345

Pozdrawiam
Jan Kowalski
"""


def report(subject: str = "Awaria serwera", body: str = REPORT_BODY, **headers: str) -> bytes:
    return make_mail(subject=subject, body=body, sender=f"Jan Kowalski <{CUSTOMER}>", **headers)


def customer_send(port: int, mail_from: str, rcpts: list[str], raw: bytes,
                  smtputf8: bool = False) -> dict:
    """Blocking: the customer's MTA delivering to the MX. Returns refused recipients."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60,
                      source_address=(CUSTOMER_ADDRESS, 0)) as client:
        return client.sendmail(mail_from, rcpts, raw,
                               mail_options=["SMTPUTF8"] if smtputf8 else [])


async def customer(postfix: Postfix, mail_from: str, rcpts: list[str], raw: bytes,
                   smtputf8: bool = False) -> dict:
    return await asyncio.to_thread(customer_send, postfix.port, mail_from, rcpts, raw,
                                   smtputf8)


async def start_postfix(postfix: Postfix) -> None:
    """Start it; where Postfix cannot start at all, skip with the reason (never in CI,
    where .ci/run installs it and a failure to start is a failure)."""
    try:
        await asyncio.to_thread(postfix.start)
    except PostfixError as err:
        await asyncio.to_thread(postfix.stop)
        if os.environ.get("CI"):
            raise
        pytest.skip(f"postfix cannot start here: {str(err).splitlines()[0]}")


@asynccontextmanager
async def running_postfix(postfix: Postfix) -> AsyncIterator[Postfix]:
    await start_postfix(postfix)
    try:
        yield postfix
    finally:
        await asyncio.to_thread(postfix.stop)


def write_gateway_config(folder: Path, *, port: int, relay_port: int, extra: str = "") -> Path:
    """The gateway behind Postfix: SMTP on loopback, relaying through that Postfix."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gw.toml"
    path.write_text(
        f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "gw.s4e.test"\n'
        f'{extra}'
        f'[storage]\ndatabase = "{folder}/gw.db"\nattachments = "{folder}/att"\n'
        f'[outbound]\nrelay = "127.0.0.1:{relay_port}"\nretry_first = "1s"\n'
        f'retry_max = "2s"\nmaildir = "{folder}/outbox"\n')
    return path


def gateway_config_with(path: Path, section_text: str) -> None:
    """Append TOML (a whole section) to the gateway's config file."""
    path.write_text(path.read_text() + section_text)


@asynccontextmanager
async def running_gateway(config_file: Path) -> AsyncIterator[Desk]:
    gw = Gateway(load_config(config_file))
    await gw.start()
    try:
        yield Desk(gw, config_file)
    finally:
        await gw.stop(grace=2)


async def inbox(desk: Desk) -> list[dict]:
    return await desk.cli_json("inbox", "list")


async def wait_routed(desk: Desk, count: int = 1, timeout: float = 90.0) -> list[dict]:
    """Until `count` inbound messages are stored and routed; the inbox rows."""
    async def routed():
        rows = await inbox(desk)
        return rows if len(rows) >= count and all(r["outcome"] for r in rows) else None
    return await wait_for(routed, timeout=timeout, interval=0.2)


async def wait_mail(sink: Sink, predicate, timeout: float = 90.0) -> EmailMessage:
    """The first mail that reached the sink and satisfies predicate(mail_from, msg)."""
    def found():
        for (mail_from, _, _), msg in zip(sink.messages, sink.parsed(), strict=True):
            if predicate(mail_from, msg):
                return msg
        return None
    return await wait_for(found, timeout=timeout, interval=0.2)


async def wait_queue(postfix: Postfix, predicate, timeout: float = 90.0) -> list[dict]:
    """Until Postfix's queue (postqueue -j) satisfies predicate; the queue."""
    queue: list[dict] = []

    def check():
        nonlocal queue
        queue = postfix.queued()
        return (queue,) if predicate(queue) else None  # an empty queue is a result too
    try:
        await wait_for(lambda: asyncio.to_thread(check), timeout=timeout, interval=0.3)
    except AssertionError as err:
        raise AssertionError(f"{err}; the queue: {queue}\n{postfix.log()[-3000:]}") from None
    return queue


async def wait_deferred(postfix: Postfix, text: str, timeout: float = 90.0) -> list[dict]:
    """Until Postfix keeps the one message after a delivery attempt deferred with a
    reason containing `text` (its log says so; the file is out of the active queue).
    Usually the file is then in the deferred queue; when the queue manager's next scan
    finds it locked ("skipped, still being delivered"), Postfix puts it back into the
    incoming queue to cool down for 60 s (qmgr_active_feed), where a flush still finds it."""
    def kept(queue: list[dict]) -> bool:
        return (len(queue) == 1 and queue[0]["queue_name"] != "active"
                and any("status=deferred" in line and text in line
                        for line in postfix.log().splitlines()))
    return await wait_queue(postfix, kept, timeout=timeout)


__all__ = ["CUSTOMER", "CUSTOMER_ADDRESS", "REPORT_BODY", "report", "customer", "free_port", "gateway_config_with", "inbox",
           "wait_deferred", "running_gateway", "running_postfix",
           "wait_mail", "wait_queue", "wait_routed", "write_gateway_config"]
