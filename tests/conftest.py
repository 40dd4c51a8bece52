"""Real parts: our SMTP edge on 127.0.0.1 with an ephemeral port, a real SQLite file in
tmp_path, and a real aiosmtpd sink standing in for the relay."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP

from gateway.config import (AddressesConfig, Config, OutboundConfig, SmtpConfig,
                            StorageConfig, TicketsConfig)
from gateway.daemon import Gateway

INTAKE = "serwis@s4e.pl"
CRM = "crm@s4e.pl"


def make_config(tmp_path: Path, **sections: object) -> Config:
    config = Config(
        smtp=SmtpConfig(listen="127.0.0.1:0", hostname="gw.test"),
        addresses=AddressesConfig(),
        storage=StorageConfig(database=tmp_path / "gw.db", attachments=tmp_path / "att"),
        outbound=OutboundConfig(maildir=tmp_path / "outbox"),
        tickets=TicketsConfig(),
    )
    return replace(config, **sections)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
async def gateway(config: Config) -> AsyncIterator[Gateway]:
    gw = Gateway(config)
    await gw.start(port=0)
    try:
        yield gw
    finally:
        await gw.stop(grace=2)


def smtp_send(port: int, mail_from: str, rcpts: list[str], raw: bytes) -> dict:
    """Blocking: one SMTP transaction, as an MTA delivers. Returns refused recipients."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail(mail_from, rcpts, raw)


async def send(port: int, mail_from: str, rcpts: list[str], raw: bytes) -> dict:
    return await asyncio.to_thread(smtp_send, port, mail_from, rcpts, raw)


def make_mail(subject: str = "Awaria serwera", body: str = "Dzień dobry,\nserwer nie działa.\n",
              sender: str = "Jan Kowalski <jan.kowalski@example.com>", to: str = INTAKE,
              message_id: str | None = None, **headers: str) -> bytes:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    if message_id is not None:
        msg["Message-ID"] = message_id
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg.as_bytes()


@dataclass
class Sink:
    """A real SMTP server standing in for the relay; can be told to fail."""

    port: int = 0
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    fail_next: list[str] = field(default_factory=list)  # replies to give instead of 250
    attempts: int = 0

    async def handle_DATA(self, server: SMTP, session: object, envelope: object) -> str:
        self.attempts += 1
        if self.fail_next:
            return self.fail_next.pop(0)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),  # type: ignore[attr-defined]
                              envelope.original_content))  # type: ignore[attr-defined]
        return "250 2.0.0 Ok: sunk"

    def parsed(self) -> list[EmailMessage]:
        return [message_from_bytes(raw, policy=policy.default) for _, _, raw in self.messages]


@pytest.fixture
async def smtp_sink() -> AsyncIterator[Sink]:
    sink = Sink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(sink, hostname="sink.test", enable_SMTPUTF8=True), "127.0.0.1", 0)
    sink.port = server.sockets[0].getsockname()[1]
    try:
        yield sink
    finally:
        server.close()
        await server.wait_closed()


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll an async or sync predicate until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
