"""The SMTP edge: RCPT only for the intake and crm addresses, the size limit, and
`250` only once the raw message is committed to the store.

`IntakeHandler` holds the policy (aiosmtpd's handle_* hooks and what
`gateway.aiosmtpd_fork.GatewaySMTP` asks of it), `SpoolingSink` where DATA goes,
`ConnectionLimits` and `EdgeServer` the connection caps. Everything that depends on
aiosmtpd's internals (the chunked DATA reader, shutdown awareness, RFC 3463 codes on
aiosmtpd's own replies, LMTP) is in `gateway.aiosmtpd_fork`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
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

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.aiosmtpd_fork import CONTROL_CHARS, GatewayEnvelope, GatewayLMTP, GatewaySMTP
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

# Decides, from the message's headers alone, whether it must be refused at the end of
# DATA (crm@ mail on a closed ticket with closed_action = "reject"). Gets the message
# and whether the client asked for SMTPUTF8; returns the SMTP reply to send instead of
# 250, or None to accept.
RejectCheck = Callable[[Inbound, bool], Awaitable[str | None]]
OUTCOME_REJECTED = "closed_rejected"


class SpoolingSink:
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

    async def finish(self) -> tuple[bytes, Spool | None]:
        """The message's bytes, or the head of the closed spool file holding it and
        that file."""
        if self._file is None:
            return bytes(self._memory), None
        file, self._file = self._file, None
        await asyncio.to_thread(file.close)
        assert self.path is not None
        spool = Spool(self.path, self.size)
        return await asyncio.to_thread(_read_head, spool.path), spool

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

    # What GatewaySMTP asks (gateway.aiosmtpd_fork.EdgePolicy).

    def session_opened(self, server: GatewaySMTP) -> None:
        self.sessions.add(server)

    def session_closed(self, server: GatewaySMTP) -> None:
        self.sessions.discard(server)
        if server.limit_slot is not None:
            self.limits.release(server.limit_slot)
            server.limit_slot = None

    def refusal_at_greeting(self) -> str | None:
        return REPLY_SHUTTING_DOWN if self.draining else None

    def new_sink(self) -> SpoolingSink:
        return SpoolingSink(self.max_size, self.spool_threshold, self.spool_dir)

    def spool_failed(self, session: Session, error: OSError) -> str:
        log.error("spooling a message from %s failed, answered 451: %s",
                  _peer_text(session.peer), error)
        return self._reply(REPLY_SPOOL_FAILED)

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
        if CONTROL_CHARS.search(address) or not _is_utf8(address):
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
        if CONTROL_CHARS.search(address) or not _is_utf8(address):
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
    return config.storage.sqlite_path.parent / "spool"


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
