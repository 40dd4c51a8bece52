"""The SMTP edge: RCPT only for the intake and crm addresses, the size limit, and
`250` only once the raw message is committed to the store.

`GatewaySMTP` is aiosmtpd's `SMTP` with a faster DATA reader (chunks instead of
lines, same smuggling rule: only CRLF.CRLF ends DATA) and a 421 for sessions that
arrive while the daemon shuts down. `IntakeHandler` holds the policy.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket
import sqlite3
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from gateway.config import Config
from gateway.model import Inbound
from gateway.errors import StoreError
from gateway.mailer import one_line
from gateway.store import IntakeWriter, Spool

log = logging.getLogger(__name__)

REPLY_QUEUED = "250 2.0.0 Ok: queued as {id}"
REPLY_SENDER_OK = "250 2.1.0 Ok"
REPLY_RCPT_OK = "250 2.1.5 Ok"
REPLY_NO_SUCH_USER = "550 5.1.1 <{addr}>: Recipient address rejected: no such mailbox here"
REPLY_TOO_BIG = "552 5.3.4 Message too big (limit {limit} bytes)"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_TRY_LATER = "451 4.3.0 Temporary failure storing the message, please try again later"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, please try again later"
REPLY_BUSY = "421 4.7.0 Too many connections, please try again later"
REPLY_BUSY_IP = "421 4.7.0 Too many connections from your address, please try again later"
REPLY_NO_RESOURCES = "421 4.3.2 Service temporarily unavailable, please try again later"
REPLY_DATA_TIMEOUT = "421 4.4.2 {host} Error: DATA took longer than {limit}s, closing"
REPLY_SPOOL_FAILED = "451 4.3.0 Temporary failure storing the message, please try again later"

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
        # Set for a message larger than spool_threshold: `content` is then only its
        # head, the whole message is in this file.
        self.spool: Spool | None = None


def unstuff(data: bytes | bytearray) -> bytes:
    """RFC 5321 §4.5.2: remove the leading dot of every line that has one."""
    body = bytes(data)
    if body.startswith(b"."):
        body = body[1:]
    return body.replace(b"\r\n.", b"\r\n")


def safe_cut(buf: bytes | bytearray, keep: int) -> int:
    """Where `buf` may be cut, leaving at least `keep` bytes, so that no CRLF "." and
    no CRLF.CRLF straddles the cut (both halves can then be unstuffed apart)."""
    cut = max(len(buf) - keep, 0)
    while cut > 0 and (buf[cut - 1:cut + 2] == b"\r\n." or buf[cut - 2:cut + 1] == b"\r\n."):
        cut -= 1
    return cut


class DataSink:
    """Where the unstuffed message goes while it arrives: memory up to `threshold`
    bytes, then a spool file in `spool_dir` (memory stays bounded however many large
    messages are in flight). Past `limit` only the size is counted (as stored, i.e.
    after unstuffing: what Postfix measured). A spool file that cannot be written
    (disk full) turns the message into a 451 once DATA has ended."""

    def __init__(self, limit: int, threshold: int, spool_dir: Path) -> None:
        self.limit = limit
        self.threshold = threshold
        self.spool_dir = spool_dir
        self.size = 0
        self.error: OSError | None = None
        self._memory = bytearray()
        self._file: Any = None
        self.path: Path | None = None

    @property
    def too_big(self) -> bool:
        return bool(self.limit) and self.size > self.limit

    async def write(self, data: bytes | bytearray) -> None:
        self.size += len(data)
        if self.error is not None:
            return
        if self.too_big:
            await self.discard()
            return
        if self._file is None:
            self._memory += data
            if len(self._memory) > self.threshold:
                memory, self._memory = self._memory, bytearray()
                await self._spool(self._open, memory)
            return
        await self._spool(self._file.write, data)

    async def _spool(self, action: Callable[..., Any], *args: Any) -> None:
        try:
            await asyncio.to_thread(action, *args)
        except OSError as err:
            self.error = err
            await self.discard()

    def _open(self, first: bytes | bytearray) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="data-", suffix=".eml", dir=self.spool_dir)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._file.write(first)

    async def finish(self) -> bytes | Spool:
        """The message: bytes, or the closed spool file holding it."""
        if self._file is None:
            return bytes(self._memory)
        file, self._file = self._file, None
        await asyncio.to_thread(file.close)
        assert self.path is not None
        return Spool(self.path, self.size)

    async def discard(self) -> None:
        self._memory = bytearray()
        file, self._file = self._file, None
        path, self.path = self.path, None
        if file is not None or path is not None:
            await asyncio.to_thread(_remove, file, path)


def _remove(file: Any, path: Path | None) -> None:
    try:
        if file is not None:
            file.close()
    except OSError:
        pass
    if path is not None:
        path.unlink(missing_ok=True)


# The header block of a spooled message as far as checks before the commit read it.
HEAD_BYTES = 256 * 1024 + 4


def clear_spool(spool_dir: Path) -> int:
    """Spool files a crash left mid-DATA: never answered 250, so never needed."""
    removed = 0
    for path in spool_dir.glob("data-*.eml"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with a chunked DATA reader and shutdown awareness."""

    def __init__(self, handler: IntakeHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.gateway_handler = handler
        # The connection slot taken at accept (EdgeServer), given back when it ends.
        self.limit_slot: str | None = None

    def _create_envelope(self) -> Envelope:
        return GatewayEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.gateway_handler.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.gateway_handler.sessions.discard(self)
        if self.limit_slot is not None:
            self.gateway_handler.limits.release(self.limit_slot)
            self.limit_slot = None
        super().connection_lost(error)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # email's address parser raises IndexError on "MAIL FROM:<" and AttributeError
        # on "<a@ [x" (found by fuzz/fuzz_smtp.py): a malformed address (553), not a
        # 451 the client retries for days.
        try:
            return super()._getaddr(arg)
        except Exception:  # noqa: BLE001 - whatever the parser trips over
            return None, None

    async def smtp_AUTH(self, arg: str) -> None:
        # The gateway has no accounts: AUTH is never advertised, before or after
        # STARTTLS, and never answered 535.
        await self.push("502 5.5.1 Error: command not implemented")

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            # aiosmtpd quotes the client's command in some replies ('500 Error: command
            # "\r." not recognized', '502 Could not VRFY ...'): no control character and
            # no undecodable byte of theirs (a lone surrogate) goes back out.
            status = "\r\n".join(
                with_enhanced_code(_CONTROL.sub("?", line).encode("utf-8", "replace").decode(),
                                   self.hostname)
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
        handler = self.gateway_handler
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        sink = DataSink(handler.max_size, handler.spool_threshold, handler.spool_dir)
        try:
            try:
                async with asyncio.timeout(handler.data_timeout):
                    await self._read_data(sink)
            except TimeoutError:
                await handler.data_timed_out(self, sink.size)
                return
            assert self.session is not None  # aiosmtpd sets it when the connection opens
            if sink.too_big:
                self._set_post_data_state()
                await self.push(handler.too_big(self.session, sink.size))
                return
            if sink.error is not None:
                self._set_post_data_state()
                log.error("spooling a message from %s failed, answered 451: %s",
                          _peer_text(self.session.peer), sink.error)
                await self.push(handler._reply(REPLY_SPOOL_FAILED))
                return
            content = await sink.finish()
            assert isinstance(self.envelope, GatewayEnvelope)
            if isinstance(content, Spool):
                # The handler sees the head (for its checks); the writer copies the
                # whole file into the database before the 250.
                self.envelope.spool = content
                content = await asyncio.to_thread(_read_head, content.path)
            self.envelope.content = self.envelope.original_content = content
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            await self.push("250 OK" if status is MISSING else status)
        finally:
            await sink.discard()

    async def _read_data(self, sink: DataSink) -> None:
        """Read DATA up to CRLF.CRLF in large chunks into `sink`, unstuffed.

        Only CRLF "." CRLF ends DATA (bare LF variants never do: no smuggling). The
        stream is treated as if preceded by the DATA command's CRLF so that a lone "."
        on the first line ends an empty message. Bytes read past the terminator (a
        pipelining client's next command) are handed back to the reader. Whatever
        the size, the message is read to its end so the session stays in sync.
        """
        reader = self._reader
        # aiosmtpd's reader pauses the socket past 2x its 1001-byte line limit; a
        # larger limit while reading DATA is most of the speed-up.
        reader._limit = DATA_CHUNK  # type: ignore[attr-defined]
        keep = len(DATA_TERMINATOR) - 1
        try:
            buf = bytearray(b"\r\n")
            first = True  # buf still starts with that virtual CRLF
            scan = 0
            while True:
                end = buf.find(DATA_TERMINATOR, scan)
                if end >= 0:
                    leftover = buf[end + len(DATA_TERMINATOR):]
                    if leftover:
                        # Give a pipelined command back to aiosmtpd's line reader
                        # (aiosmtpd itself touches _buffer for STARTTLS).
                        reader._buffer[:0] = leftover  # type: ignore[attr-defined]
                    await sink.write(_unstuffed(buf, end + 2, first))
                    return
                if len(buf) > DATA_CHUNK:
                    cut = safe_cut(buf, keep)
                    await sink.write(_unstuffed(buf, cut, first))
                    first = False
                    del buf[:cut]
                scan = max(0, len(buf) - keep)
                chunk = await reader.read(DATA_CHUNK)
                if not chunk:
                    # The client went away mid-DATA: nothing is stored.
                    raise ConnectionResetError("connection closed during DATA")
                self._reset_timeout()
                buf += chunk
        finally:
            reader._limit = self.line_length_limit  # type: ignore[attr-defined]


def _unstuffed(buf: bytearray, cut: int, first: bool) -> bytes | bytearray:
    """buf[:cut] unstuffed; without the virtual leading CRLF when `first`."""
    part = buf[:cut].replace(b"\r\n.", b"\r\n")
    return part[2:] if first else part


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(HEAD_BYTES)


class IntakeHandler:
    """aiosmtpd handler: who may be written to, and commit-then-250."""

    def __init__(self, config: Config, writer: IntakeWriter,
                 reject_check: RejectCheck | None = None,
                 on_reply: Callable[[str], None] | None = None) -> None:
        self.mailboxes = frozenset({config.addresses.intake.lower(), config.addresses.crm.lower()})
        self.max_size = config.smtp.max_message_size
        self.max_recipients = config.smtp.max_recipients
        self.spool_threshold = config.smtp.spool_threshold
        self.spool_dir = spool_dir_for(config)
        self.data_timeout = config.smtp.data_timeout_seconds
        self.hostname = config.smtp.hostname
        self.limits = ConnectionLimits(config.smtp.max_connections,
                                       config.smtp.max_connections_per_ip)
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
        # No AUTH line, before or after STARTTLS: the gateway has no accounts.
        kept = [r for r in responses[1:] if not r[4:].upper().startswith("AUTH")]
        return [responses[0], f"250-SIZE {self.max_size}", "250-ENHANCEDSTATUSCODES", *kept]

    def too_big(self, session: Session, size: int) -> str:
        """The 552 for a message over max_message_size (counted as stored), logged."""
        log.warning("message from %s refused with 552: %d bytes after unstuffing, limit %d",
                    _peer_text(session.peer), size, self.max_size)
        return self._reply(REPLY_TOO_BIG.format(limit=self.max_size))

    async def data_timed_out(self, server: GatewaySMTP, size: int) -> None:
        """The DATA deadline passed: 421 4.4.2 and hang up; nothing is stored."""
        log.warning("session from %s: DATA not finished within %ds (%d bytes so far), "
                    "closed with 421", _peer_text(server.session.peer if server.session else None),
                    self.data_timeout, size)
        await server.close_with(self._reply(
            REPLY_DATA_TIMEOUT.format(host=self.hostname, limit=self.data_timeout)))

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.draining:
            return self._reply(REPLY_SHUTTING_DOWN)
        if _CONTROL.search(address) or not _is_utf8(address):
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
        if _CONTROL.search(address) or not _is_utf8(address):
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
        spool = envelope.spool if isinstance(envelope, GatewayEnvelope) else None
        inbound = Inbound(
            peer=_peer_text(session.peer),
            mail_from="" if mail_from == "<>" else mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            raw=raw,
            received_at=datetime.now(UTC),
        )
        refusal = await self._refusal(inbound, bool(envelope.smtp_utf8))
        try:
            stored = await self.writer.store(inbound, OUTCOME_REJECTED if refusal else None,
                                             spool=spool)
        except (sqlite3.OperationalError, StoreError) as err:
            # Locked or full database: expected in operation, no traceback.
            log.error("storing message from %s failed, answered 451: %s",
                      inbound.peer, err)
            return self._reply(REPLY_TRY_LATER)
        except Exception:  # noqa: BLE001 - any failure must make the sender retry
            log.exception("storing message from %s failed, answered 451", inbound.peer)
            return self._reply(REPLY_TRY_LATER)
        size = spool.size if spool else len(inbound.raw)
        message_id = one_line(stored.message_id[:300]) or "<no-id>"
        envelope_text = (f"from=<{one_line(inbound.mail_from[:300])}> "
                         f"to=<{one_line(','.join(inbound.rcpt_tos)[:1000])}> size={size}")
        if refusal:
            log.info("%s inbound %d refused (mail on a closed ticket): %s", message_id,
                     stored.id, envelope_text)
            return self._reply(refusal)
        log.info("%s inbound %d queued: %s%s", message_id, stored.id, envelope_text,
                 " (duplicate delivery)" if stored.duplicate else "")
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


def spool_dir_for(config: Config) -> Path:
    """Spool files live beside the database: the same disk, so a message that fits
    the spool also fits the commit, and a full disk is one condition, not two."""
    return config.storage.database.parent / "spool"


class ConnectionLimits:
    """max_connections in total and max_connections_per_ip, counted from accept to
    connection_lost."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self.open = 0
        self._by_ip: Counter[str] = Counter()

    def admit(self, ip: str) -> str | None:
        """Take a slot for `ip`, or return the 421 that refuses the connection."""
        if self.open >= self.total:
            return REPLY_BUSY
        if self._by_ip[ip] >= self.per_ip:
            return REPLY_BUSY_IP
        self.open += 1
        self._by_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.open -= 1
        self._by_ip[ip] -= 1
        if self._by_ip[ip] <= 0:
            del self._by_ip[ip]


class QuietLog:
    """One log line per `every` seconds for a condition that can repeat thousands of
    times a second (refused connections, no descriptors), with the count since."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._count: Counter[str] = Counter()

    def note(self, key: str, level: int, message: str) -> None:
        self._count[key] += 1
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.every:
            more = self._count.pop(key) - 1
            self._last[key] = now
            log.log(level, "%s%s", message,
                    f" ({more} more since the last such line)" if more else "")


_NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_BATCH = 64


def _reserve_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


def _refuse(conn: socket.socket, reply: str) -> None:
    """Say a 421 greeting and close; never blocks (a fresh socket's buffer is empty)."""
    try:
        conn.send(reply.encode("ascii") + b"\r\n")
    except OSError:
        pass
    finally:
        conn.close()


class EdgeServer:
    """The SMTP listener with its own accept loop, so that the limits apply before any
    session exists: over max_connections (or per IP) a connection gets a 421 greeting
    and is closed at once. When the process runs out of file descriptors (EMFILE)
    a reserved descriptor is freed to accept the waiting connections and answer them
    421 too, with one log line a minute instead of asyncio's traceback per accept.

    Looks like asyncio.Server where the daemon uses it: `sockets`, `close()`,
    `wait_closed()`.
    """

    def __init__(self, sockets: list[socket.socket], factory: Callable[[], GatewaySMTP],
                 handler: IntakeHandler) -> None:
        self.sockets = sockets
        self._factory = factory
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._reserve = _reserve_fd()
        self._quiet = QuietLog()
        self._tasks: set[asyncio.Task[None]] = set()
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in _NO_DESCRIPTORS:
                    self._out_of_descriptors(sock, err)
                else:
                    self._quiet.note("accept", logging.WARNING, f"accept failed: {err}")
                return
            conn.setblocking(False)
            ip = str(addr[0]) if isinstance(addr, tuple) else ""
            refusal = self._handler.limits.admit(ip)
            if refusal is not None:
                self._quiet.note(refusal, logging.WARNING,
                                 f"connection from {ip} refused: {refusal[10:]}")
                self._handler._reply(refusal)
                _refuse(conn, refusal)
                continue
            task = self._loop.create_task(self._start(conn, ip))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _start(self, conn: socket.socket, ip: str) -> None:
        protocol = self._factory()
        protocol.limit_slot = ip
        try:
            await self._loop.connect_accepted_socket(lambda: protocol, conn)
        except OSError as err:
            if protocol.limit_slot is not None:
                self._handler.limits.release(ip)
                protocol.limit_slot = None
            conn.close()
            self._quiet.note("start", logging.WARNING, f"session from {ip} not started: {err}")

    def _out_of_descriptors(self, sock: socket.socket, err: OSError) -> None:
        """Free the reserve descriptor, accept, say 421, close; while others wait."""
        refused = 0
        while self._reserve is not None and refused < ACCEPT_BATCH:
            os.close(self._reserve)
            self._reserve = None
            try:
                conn, _ = sock.accept()
            except OSError:
                conn = None
            if conn is not None:
                self._handler._reply(REPLY_NO_RESOURCES)
                _refuse(conn, REPLY_NO_RESOURCES)
                refused += 1
            self._reserve = _reserve_fd()
            if conn is None:
                break
        self._quiet.note("emfile", logging.ERROR,
                         f"out of file descriptors ({os.strerror(err.errno or 0)}): new "
                         "connections answered 421 until sessions end")
        if self._reserve is None or refused == 0:
            # Nothing could be accepted: stop polling the socket for a moment rather
            # than spin on a readable socket (what asyncio does too).
            for listening in self.sockets:
                self._loop.remove_reader(listening.fileno())
            self._loop.call_later(0.1, self._resume)

    def _resume(self) -> None:
        if self._reserve is None:
            self._reserve = _reserve_fd()
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    async def wait_closed(self) -> None:
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)


async def start_edge_server(factory: Callable[[], GatewaySMTP], handler: IntakeHandler,
                            host: str, port: int) -> EdgeServer:
    """Bind `host:port` (every address it resolves to, as asyncio does) and serve."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(
                (i[0], i[1], i[2], i[3], i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return EdgeServer(sockets, factory, handler)


def _is_utf8(text: str) -> bool:
    """False for an address aiosmtpd decoded from invalid UTF-8 (lone surrogates):
    refused at once rather than answered 451 for ever at the commit."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "")


def _printable(text: str) -> str:
    return "".join(c if 32 < ord(c) < 127 else "?" for c in text)[:254]


def smtp_factory(handler: IntakeHandler, config: Config,
                 tls_context: ssl.SSLContext | None = None,
                 lmtp: bool = False) -> Callable[[], GatewaySMTP]:
    """A protocol factory for loop.create_server / create_unix_server."""
    cls = GatewayLMTP if lmtp else GatewaySMTP

    def factory() -> GatewaySMTP:
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
