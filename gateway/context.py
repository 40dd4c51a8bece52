"""What every stage needs besides the database: the configuration, the templates,
the key that signs our Message-IDs, the clock, the sender check (`Context`)."""

from __future__ import annotations


import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from gateway import msgid, store, texts
from gateway.attachment_store import AttachmentStore
from gateway.attachment_store import attachment_store as configured_store
from gateway.config import Config
from gateway.model import (Verdict)
from gateway.sender_auth import verify_sender
from gateway.router import (Policy)

log = logging.getLogger(__name__)


HMAC_SETTING = "message_id_hmac_key"


@dataclass
class Context:
    """What the stages need besides the database; built once by the daemon/CLI."""

    config: Config
    renderer: texts.Renderer
    hmac_key: str
    clock: Callable[[], datetime] = store.utcnow
    wake_mailer: Callable[[], None] = lambda: None
    draw_number: Callable[[], int] = field(
        default=lambda: store.TICKET_MIN + secrets.randbelow(store.TICKET_MAX - store.TICKET_MIN + 1))
    # Who really sent a message (SPEC §10): (raw, peer, envelope sender) -> Verdict.
    # Blocking (DNS): called in a thread.
    verify: Callable[[bytes, str, str], Verdict] | None = None
    # How CPU-bound steps (parsing, hashing attachments) run: in a thread in the SMTP
    # process, so a 25 MB message never stalls a session; inline in a worker process,
    # which has no sessions to protect.
    offload: Callable[..., Awaitable[Any]] = asyncio.to_thread
    # Where attachment bytes are kept and read (files, or the database); None: what the
    # configuration says (`attachments`).
    attachment_store: AttachmentStore | None = None

    @property
    def attachments(self) -> AttachmentStore:
        return self.attachment_store or configured_store(self.config)

    def verdict_for(self, raw: bytes, peer: str, mail_from: str) -> Verdict:
        if self.verify is not None:
            return self.verify(raw, peer, mail_from)
        return check_sender(self.config, raw, peer, mail_from)

    @property
    def crm(self) -> str:
        return self.config.addresses.crm

    @property
    def intake(self) -> str:
        return self.config.addresses.intake

    @property
    def language(self) -> str:
        return self.config.tickets.language

    @property
    def domain(self) -> str:
        return self.crm.rpartition("@")[2]

    def policy(self) -> Policy:
        return Policy(max_auto_replies_per_hour=self.config.tickets.max_auto_replies_per_hour,
                      staff_domains=self.config.addresses.staff_domains)


def load_renderer(config: Config) -> texts.Renderer:
    """The templates shipped with the package, in the configured language, under the
    operator's `[tickets] templates` folder (its files win by name)."""
    from importlib import resources

    templates = Path(str(resources.files("gateway.templates")))
    return texts.Renderer(templates, config.tickets.language,
                          override_dir=config.tickets.templates)


async def make_context(conn: aiosqlite.Connection, config: Config,
                       wake_mailer: Callable[[], None] = lambda: None, *,
                       attachments: AttachmentStore | None = None) -> Context:
    """`attachments`: another attachment store than the configuration's (tests)."""
    key = await store.setting(conn, HMAC_SETTING, msgid.new_key)
    return Context(config, load_renderer(config), key, wake_mailer=wake_mailer,
                   attachment_store=attachments or configured_store(config))


def check_sender(config: Config, raw: bytes, peer: str, mail_from: str) -> Verdict:
    """The sender verdict (SPEC §10): trusted relays, trusted Authentication-Results,
    and with `[auth] verify = "dns"` the gateway's own DKIM/SPF/DMARC checks."""
    return verify_sender(raw, peer=peer, mail_from=mail_from, config=config.auth)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()
