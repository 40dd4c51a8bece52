"""The hourly digest of held mail to the `notify` addresses (SPEC §9): operators learn
that something waits for them without getting one mail per held message."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import aiosqlite

from gateway import store, texts
from gateway.compose import reply_subject
from gateway.model import HeldStatus, Outgoing
from gateway.context import Context
from gateway.answers import queue, template_context
from gateway.store import Tx

log = logging.getLogger(__name__)

DIGEST_EVERY = timedelta(hours=1)
DIGEST_KIND = texts.HeldDigest.event
MAX_LISTED = 50


async def send_held_digest(conn: aiosqlite.Connection, ctx: Context) -> int:
    """One digest per notify address listing the held messages not yet announced, at
    most once per DIGEST_EVERY. Returns how many messages it announced."""
    notify = ctx.config.addresses.notify
    if not notify:
        return 0
    now = ctx.clock()
    async with Tx(conn):
        rows = list(await conn.execute_fetchall(
            "SELECT h.*, i.received_at FROM held h JOIN inbound i ON i.id = h.inbound_id"
            f" WHERE h.status = '{HeldStatus.HELD}' AND h.announced_at IS NULL ORDER BY h.id"))
        if not rows:
            return 0
        last = list(await conn.execute_fetchall(
            "SELECT max(created_at) FROM outbox WHERE kind = ?", (DIGEST_KIND,)))
        if last and last[0][0] and datetime.fromisoformat(last[0][0]) > now - DIGEST_EVERY:
            return 0
        zone = ZoneInfo(ctx.config.tickets.timezone)
        held = tuple(texts.HeldItem(
            id=r["id"], sender=r["sender"], subject=r["subject"], reason=r["reason"],
            ticket=r["ticket"] or None,
            received=datetime.fromisoformat(r["received_at"]).astimezone(zone)
            .strftime("%Y-%m-%d %H:%M")) for r in rows[:MAX_LISTED])
        body = ctx.renderer.render(texts.HeldDigest(template_context(ctx, None), held=held))
        subject = reply_subject(None, ("Wstrzymane wiadomości: " if ctx.language == "pl"
                                       else "Held messages: ") + str(len(rows)),
                                language=ctx.language)
        for address in notify:
            out = Outgoing(kind=DIGEST_KIND, ticket=None, to=address, subject=subject,
                           body=body, auto=True, auto_submitted="auto-generated")
            await queue(conn, ctx, out, now, inbound_id=None, record_ticket=None)
        await conn.execute(
            f"UPDATE held SET announced_at = ? WHERE id IN ({', '.join('?' * len(rows))})",
            (store.iso(now), *(r["id"] for r in rows)))
    log.info("held digest: %d message(s) announced to %s", len(rows), ", ".join(notify))
    ctx.wake_mailer()
    return len(rows)
