"""The SMTP edge: RCPT only for the intake and crm addresses, the size limit, and
`250` only once the raw message is committed to the store.

`GatewaySMTP` is aiosmtpd's `SMTP` with a faster DATA reader (chunks instead of
lines, same smuggling rule: only CRLF.CRLF ends DATA) and a 421 for sessions that
arrive while the daemon shuts down. `IntakeHandler` holds the policy.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import ssl
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from gateway.config import Config
from gateway.model import Inbound
from gateway.errors import StoreError
from gateway.store import IntakeWriter

log = logging.getLogger(__name__)

REPLY_QUEUED = "250 2.0.0 Ok: queued as {id}"
REPLY_SENDER_OK = "250 2.1.0 Ok"
REPLY_RCPT_OK = "250 2.1.5 Ok"
REPLY_NO_SUCH_USER = "550 5.1.1 <{addr}>: Recipient address rejected: no such mailbox here"
REPLY_TOO_BIG = "552 5.3.4 Message too big (limit {limit} bytes)"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_TRY_LATER = "451 4.3.0 Temporary failure storing the message, please try again later"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, please try again later"

REPLY_BAD_SENDER = "553 5.1.7 Bad sender address syntax"
REPLY_BAD_RCPT = "553 5.1.3 Bad recipient address syntax"

# RFC 3463 codes for the replies aiosmtpd writes without one (its syntax errors,
# RSET, NOOP, QUIT...). Greeting and EHLO lines never carry one (RFC 2034).
_ENHANCED = {"250": "2.0.0", "221": "2.0.0", "500": "5.5.2", "501": "5.5.4",
             "502": "5.5.1", "503": "5.5.1", "504": "5.5.4", "530": "5.7.0",
             "454": "4.7.0", "554": "5.5.0", "555": "5.5.4", "553": "5.1.3",
             "552": "5.3.4", "421": "4.3.2", "451": "4.3.0", "550": "5.0.0"}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}\b")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def with_enhanced_code(text: str, hostname: str) -> str:
    code = text[:3]
    if (len(text) < 4 or text[3] != " " or code not in _ENHANCED
            or _HAS_ENHANCED.match(text) or text in ("250 HELP", f"250 {hostname}")):
        return text
    return f"{code} {_ENHANCED[code]} {text[4:]}"


DATA_CHUNK = 256 * 1024
DATA_TERMINATOR = b"\r\n.\r\n"

# Decides, from the message's headers alone, whether it must be refused at the end of
# DATA (crm@ mail on a closed ticket with closed_action = "reject"). Gets the message
# and whether the client asked for SMTPUTF8; returns the SMTP reply to send instead of
# 250, or None to accept.
RejectCheck = Callable[[Inbound, bool], Awaitable[str | None]]
OUTCOME_REJECTED = "closed_rejected"


class GatewayEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.rcpt_attempts = 0


def unstuff(data: bytes | bytearray) -> bytes:
    """RFC 5321 §4.5.2: remove the leading dot of every line that has one."""
    body = bytes(data)
    if body.startswith(b"."):
        body = body[1:]
    return body.replace(b"\r\n.", b"\r\n")


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with a chunked DATA reader and shutdown awareness."""

    def __init__(self, handler: IntakeHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.gateway_handler = handler

    def _create_envelope(self) -> Envelope:
        return GatewayEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.gateway_handler.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.gateway_handler.sessions.discard(self)
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = "\r\n".join(with_enhanced_code(line, self.hostname)
                                  for line in status.split("\r\n"))
        await super().push(status)

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    async def close_with(self, reply: str) -> None:
        """Say `reply` (a 421) and hang up; used for idle sessions at shutdown."""
        self.gateway_handler.sessions.discard(self)
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self._writer.write(reply.encode("ascii") + b"\r\n")
        finally:
            self.transport.close()

    async def _handle_client(self) -> None:
        if self.gateway_handler.draining:
            await self.push(REPLY_SHUTTING_DOWN)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data, size = await self._read_data()
        if data is None:
            self._set_post_data_state()
            await self.push(REPLY_TOO_BIG.format(limit=self.gateway_handler.max_size))
            return
        content = unstuff(data)
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> tuple[bytearray | None, int]:
        """Read DATA up to CRLF.CRLF in large chunks.

        Only CRLF "." CRLF ends DATA (bare LF variants never do: no smuggling). The
        stream is treated as if preceded by the DATA command's CRLF so that a lone "."
        on the first line ends an empty message. Bytes read past the terminator (a
        pipelining client's next command) are handed back to the reader. Returns
        (None, size) when the message exceeded the size limit; it is read to its end
        and discarded so the session stays in sync.
        """
        reader = self._reader
        limit = self.gateway_handler.max_size
        # aiosmtpd's reader pauses the socket past 2x its 1001-byte line limit; a
        # larger limit while reading DATA is most of the speed-up.
        reader._limit = DATA_CHUNK  # type: ignore[attr-defined]
        try:
            buf = bytearray(b"\r\n")
            scan = 0
            discarded = 0
            while True:
                end = buf.find(DATA_TERMINATOR, scan)
                if end >= 0:
                    leftover = buf[end + len(DATA_TERMINATOR):]
                    if leftover:
                        # Give a pipelined command back to aiosmtpd's line reader
                        # (aiosmtpd itself touches _buffer for STARTTLS).
                        reader._buffer[:0] = leftover  # type: ignore[attr-defined]
                    size = discarded + end
                    if discarded or (limit and end > limit):
                        return None, size
                    return buf[2:end + 2], size
                scan = max(0, len(buf) - len(DATA_TERMINATOR) + 1)
                if limit and len(buf) - 2 + discarded > limit + 2:
                    # Over the limit: keep only a tail long enough to spot CRLF.CRLF.
                    tail = buf[-(len(DATA_TERMINATOR) - 1):]
                    discarded += len(buf) - len(tail)
                    buf = bytearray(tail)
                    scan = 0
                chunk = await reader.read(DATA_CHUNK)
                if not chunk:
                    # The client went away mid-DATA: nothing is stored.
                    raise ConnectionResetError("connection closed during DATA")
                self._reset_timeout()
                buf += chunk
        finally:
            reader._limit = self.line_length_limit  # type: ignore[attr-defined]


class IntakeHandler:
    """aiosmtpd handler: who may be written to, and commit-then-250."""

    def __init__(self, config: Config, writer: IntakeWriter,
                 reject_check: RejectCheck | None = None,
                 on_reply: Callable[[str], None] | None = None) -> None:
        self.mailboxes = frozenset({config.addresses.intake.lower(), config.addresses.crm.lower()})
        self.max_size = config.smtp.max_message_size
        self.max_recipients = config.smtp.max_recipients
        self.writer = writer
        self.reject_check = reject_check
        self.on_reply = on_reply
        self.draining = False
        self.sessions: set[GatewaySMTP] = set()

    def _reply(self, text: str) -> str:
        if self.on_reply:
            self.on_reply(text[:3])
        return text

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        # aiosmtpd's data_size_limit is off (we enforce our own, with an RFC 3463
        # code), so SIZE is advertised here.
        session.host_name = hostname
        return [responses[0], f"250-SIZE {self.max_size}", "250-ENHANCEDSTATUSCODES",
                *responses[1:]]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.draining:
            return self._reply(REPLY_SHUTTING_DOWN)
        if _CONTROL.search(address):
            return self._reply(REPLY_BAD_SENDER)
        for option in mail_options:
            name, _, value = option.partition("=")
            if name == "SIZE" and value.isdigit() and int(value) > self.max_size:
                return self._reply(REPLY_TOO_BIG.format(limit=self.max_size))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return self._reply(REPLY_SENDER_OK)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        assert isinstance(envelope, GatewayEnvelope)
        envelope.rcpt_attempts += 1
        if envelope.rcpt_attempts > self.max_recipients:
            return self._reply(REPLY_TOO_MANY_RCPTS)
        if _CONTROL.search(address):
            return self._reply(REPLY_BAD_RCPT)
        normal = address.strip().lower()
        if normal not in self.mailboxes:
            log.info("rcpt rejected: %r from %r", address, session.peer)
            return self._reply(REPLY_NO_SUCH_USER.format(addr=_printable(address)))
        if normal not in envelope.rcpt_tos:
            envelope.rcpt_tos.append(normal)
            envelope.rcpt_options.extend(rcpt_options)
        return self._reply(REPLY_RCPT_OK)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(raw, str):  # not with decode_data=False, but be safe
            raw = raw.encode("utf-8", "surrogateescape")
        mail_from = envelope.mail_from or ""
        inbound = Inbound(
            peer=_peer_text(session.peer),
            mail_from="" if mail_from == "<>" else mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            raw=raw,
            received_at=datetime.now(timezone.utc),
        )
        refusal = await self._refusal(inbound, bool(envelope.smtp_utf8))
        try:
            stored = await self.writer.store(inbound, OUTCOME_REJECTED if refusal else None)
        except (sqlite3.OperationalError, StoreError) as err:
            # Locked or full database: expected in operation, no traceback.
            log.error("storing message from %s failed, answered 451: %s",
                      inbound.peer, err)
            return self._reply(REPLY_TRY_LATER)
        except Exception:  # noqa: BLE001 - any failure must make the sender retry
            log.exception("storing message from %s failed, answered 451", inbound.peer)
            return self._reply(REPLY_TRY_LATER)
        if refusal:
            log.info("inbound %d refused: mail on a closed ticket", stored.id)
            return self._reply(refusal)
        log.info("inbound %d queued (%d bytes)%s", stored.id, len(inbound.raw),
                 " duplicate delivery" if stored.duplicate else "")
        return self._reply(REPLY_QUEUED.format(id=stored.id))

    async def _refusal(self, inbound: Inbound, utf8: bool) -> str | None:
        if self.reject_check is None:
            return None
        try:
            return await self.reject_check(inbound, utf8)
        except Exception:  # noqa: BLE001 - when in doubt accept: the router decides later
            log.exception("closed-ticket check failed; message accepted")
            return None

    async def handle_exception(self, error: Exception) -> str:
        # Never aiosmtpd's "500 Error: (Exception) ...": permanent and leaks internals.
        log.error("SMTP session error: %s: %s", type(error).__name__, error)
        return self._reply(REPLY_TRY_LATER)


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "")


def _printable(text: str) -> str:
    return "".join(c if 32 < ord(c) < 127 else "?" for c in text)[:254]


def smtp_factory(handler: IntakeHandler, config: Config,
                 tls_context: ssl.SSLContext | None = None,
                 lmtp: bool = False) -> Callable[[], SMTP]:
    """A protocol factory for loop.create_server / create_unix_server."""
    cls = GatewayLMTP if lmtp else GatewaySMTP

    def factory() -> SMTP:
        return cls(
            handler,
            data_size_limit=None,  # ours: see handle_EHLO and _read_data
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.smtp.hostname,
            ident="s4e-gateway",
            tls_context=None if lmtp else tls_context,
            timeout=config.smtp.timeout_seconds,
        )

    return factory


class GatewayLMTP(GatewaySMTP, LMTP):
    """LMTP for a Postfix on the same host: the same policy over a unix socket.

    LMTP answers DATA once per recipient; every recipient here shares one stored
    message, so each gets the same reply.
    """

    async def smtp_DATA(self, arg: str) -> None:
        assert self.envelope is not None
        recipients = len(self.envelope.rcpt_tos)
        if recipients <= 1 or arg:
            await super().smtp_DATA(arg)
            return
        replies: list[str] = []
        original_push = self.push

        async def capture(status: Any) -> None:
            text = status.decode() if isinstance(status, bytes) else status
            if text.startswith("354"):
                await original_push(status)
            else:
                replies.append(text)

        self.push = capture  # type: ignore[method-assign]
        try:
            await super().smtp_DATA(arg)
        finally:
            self.push = original_push  # type: ignore[method-assign]
        for text in replies:
            for _ in range(recipients):
                await self.push(text)
