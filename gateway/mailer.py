"""The outbox worker and its two transports: `SmtpRelay` (aiosmtplib to the relay) and
`MaildirDrop` (complete `.eml` files in a maildir-style folder).

The worker claims one due outbox row at a time, sends its stored bytes and marks the
row: `sent`; back to `pending` with a later `next_attempt_at` after a temporary failure
(retry_first, doubling, capped at retry_max); `failed` after a permanent one (a 5xx about
this mail) or once the row has been retried for `give_up_after`. Rows a crash left
`sending` go back to `pending` on start. Delivery is at least once: if the process dies
between the relay's 250 and `mark_outbox_sent`, the same bytes (same Message-ID) go again.

The Mailer needs a connection of its own: every mark is a statement in autocommit mode,
and on a connection shared with the processor it would land inside the processor's
open transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

import aiosmtplib
import aiosqlite

from gateway import store
from gateway.cluster import Cluster, ExpiryWatch, keep_renewed
from gateway.store.dialect import is_postgres
from gateway.store.notify import CommitWatch
from gateway.store.postgres import OUTBOX_CHANNEL
from gateway.config import OutboundConfig, parse_duration, parse_hostport
from gateway.group_write import GroupWriter
from gateway.errors import ConfigError, GatewayError
from gateway.processor import is_environmental
from gateway.store import OutboxRow

log = logging.getLogger(__name__)

# Rows queued by another process (the CLI's staff replies, status changes, `outbox
# retry`, the web desk, worker processes) cannot wake() us: while idle, the mailer reads
# SQLite's `PRAGMA data_version` this often (it changes when any other connection
# commits; one cheap read, no query of the outbox) and looks at the outbox only when
# it changed or the next retry is due...
COMMIT_CHECK_SECONDS = 0.05
# ...and, as a fallback, looks anyway at least this often.
IDLE_POLL_SECONDS = 30.0
MIN_IDLE_SECONDS = 0.25  # a due row we could not claim (another process, clock skew)
ERROR_PAUSE_SECONDS = 5.0  # after the database itself failed (locked, disk full)
STOP_GRACE_SECONDS = 15.0  # stop(): how long the send in hand may take to finish
SMTP_TIMEOUT_SECONDS = 60.0  # per SMTP command (connect, each reply, DATA)
# The whole relay session: a relay that answers every command just in time (or
# trickles) cannot hold a connection for longer than this.
SESSION_TIMEOUT_SECONDS = 600.0
# A kept relay session is QUIT once this old, however busy: a relay swapped behind the
# same address (or a load balancer) gets the new sessions within minutes (Postfix's
# smtp_connection_reuse_time_limit is the same 300 s).
MAX_CONNECTION_AGE_SECONDS = 300.0

RESULT_SENT = "sent"
RESULT_RETRY = "retry"
RESULT_FAILED = "failed"


class TemporaryFailure(Exception):
    """Connection refused/reset/timed out, TLS failure, a 4xx: try again later."""


class PermanentFailure(Exception):
    """The relay refused this mail for good (5xx on MAIL, RCPT or DATA)."""


class Transport(Protocol):
    async def send(self, mail_from: str, rcpt_to: str, raw: bytes, message_id: str) -> None:
        """Deliver `raw` or raise TemporaryFailure / PermanentFailure."""


@runtime_checkable
class ClosingTransport(Protocol):
    """A transport holding something open between mails (SmtpRelay's sessions)."""

    async def aclose(self) -> None:
        """Release it; called once by Mailer.stop() after the last send."""


# --- log hygiene ------------------------------------------------------------------

# C0 and C1 controls, DEL and the Unicode line/paragraph separators: anything a log
# reader might take for the end of a line.
_ESCAPES = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7f, 0xa0)]} | {
    0x2028: "\\u2028", 0x2029: "\\u2029",
    ord("\r"): "\\r", ord("\n"): "\\n", ord("\t"): "\\t"}


def one_line(value: object) -> str:
    """`value` on one line: CR, LF and other controls escaped (for logs and last_error)."""
    return str(value).translate(_ESCAPES)


def format_delay(seconds: float) -> str:
    """90 -> "1m30s", 3600 -> "1h", 0 -> "0s"."""
    rest = max(int(round(seconds)), 0)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def next_retry(attempts: int, first: int, maximum: int) -> int:
    """Seconds to wait after the `attempts`-th failed attempt: first, doubling, capped."""
    if attempts <= 1:
        return min(first, maximum)
    if attempts > 64:  # 2**63 * first is beyond any cap; do not build huge ints
        return maximum
    return min(first * 2 ** (attempts - 1), maximum)


# --- SMTP relay -------------------------------------------------------------------

def _read_password(path: Path | None) -> str:
    if path is None:
        raise ConfigError("outbound.password_file: required when username is set")
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise GatewayError(f"outbound.password_file: {path}: file not found") from None
    except PermissionError:
        raise GatewayError(
            f"outbound.password_file: {path}: not readable (permission denied)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GatewayError(
            f"outbound.password_file: {path}: cannot read: {one_line(err)}") from None
    password = text.rstrip("\r\n")
    if not password:
        raise GatewayError(f"outbound.password_file: {path}: is empty")
    return password


def _reply(err: aiosmtplib.SMTPResponseException) -> str:
    return one_line(f"{err.code} {err.message}")


def classify_smtp_error(err: BaseException, relay: str) -> TemporaryFailure | PermanentFailure:
    """An aiosmtplib (or socket) error as a retry decision.

    Only a 5xx about *this mail* (MAIL FROM, RCPT TO, DATA) is permanent. A 5xx on the
    greeting, EHLO or AUTH says the relay or our credentials are wrong, not the mail:
    failing every queued row at once for it would lose the queue to a typo in the
    password, so those retry like a 4xx (and end `failed` after give_up_after).
    """
    if isinstance(err, aiosmtplib.SMTPRecipientsRefused):
        text = "; ".join(f"{r.recipient}: {_reply(r)}" for r in err.recipients)
        if err.recipients and all(r.code >= 500 for r in err.recipients):
            return PermanentFailure(f"recipient refused: {text}")
        return TemporaryFailure(f"recipient refused: {text}")
    if isinstance(err, (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPRecipientRefused,
                        aiosmtplib.SMTPDataError)):
        stage = {aiosmtplib.SMTPSenderRefused: "sender refused",
                 aiosmtplib.SMTPRecipientRefused: "recipient refused",
                 aiosmtplib.SMTPDataError: "message refused"}[type(err)]
        cls = PermanentFailure if err.code >= 500 else TemporaryFailure
        return cls(f"{stage}: {_reply(err)}")
    if isinstance(err, aiosmtplib.SMTPAuthenticationError):
        return TemporaryFailure(f"relay {relay}: authentication failed: {_reply(err)}")
    if isinstance(err, aiosmtplib.SMTPResponseException):
        return TemporaryFailure(f"relay {relay}: {_reply(err)}")
    if isinstance(err, aiosmtplib.SMTPNotSupported):
        # SMTPUTF8 needed for a non-ASCII address and the relay lacks it: it never will.
        return PermanentFailure(f"relay {relay}: {one_line(err)}")
    if isinstance(err, ssl.SSLError):  # before ValueError: certificate errors are both
        return TemporaryFailure(f"relay {relay}: TLS failed: {one_line(err)}")
    if isinstance(err, ValueError) and not isinstance(err, OSError):
        return PermanentFailure(f"unusable address: {one_line(err)}")  # aiosmtplib refused it
    if isinstance(err, (TimeoutError, aiosmtplib.SMTPTimeoutError)):
        return TemporaryFailure(f"relay {relay}: timed out: {one_line(err) or 'no answer'}")
    if isinstance(err, aiosmtplib.SMTPConnectError):
        cause = err.__cause__
        if isinstance(cause, OSError) and cause.errno:
            # "Connection refused", not asyncio's "Connect call failed ('127.0.0.1', 25)"
            return TemporaryFailure(f"relay {relay}: cannot connect: {os.strerror(cause.errno)}")
    # SMTPConnectError, SMTPServerDisconnected, ConnectionError, other OSError, other
    # SMTPException (e.g. "AUTH not supported"): the relay, not the mail.
    return TemporaryFailure(f"relay {relay}: {one_line(err) or type(err).__name__}")


@dataclass(eq=False)
class _Connection:
    """One relay session kept open between mails."""

    smtp: aiosmtplib.SMTP
    opened: float  # loop.time() at connect
    idle_timer: asyncio.TimerHandle | None = None


def _relay_closed(err: BaseException) -> bool:
    """Did the relay end the session (dropped, reset, silent, 421) rather than answer
    about the mail? On a kept connection that is no verdict on the mail."""
    if isinstance(err, aiosmtplib.SMTPRecipientsRefused):
        return any(r.code == 421 for r in err.recipients)
    if isinstance(err, aiosmtplib.SMTPResponseException):
        return err.code == 421
    return isinstance(err, (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError,
                            ConnectionError))


class _KeptConnectionLost(Exception):
    """Internal: a kept connection turned out dead; the mail goes on a new one."""


class SmtpRelay:
    """Sends through the configured relay with aiosmtplib.

    Connections are kept: after a mail its session goes back to a pool (one per
    parallel sender at most) and the next mail is MAIL/RCPT/DATA on it again, with no
    new TCP, TLS or AUTH. A transaction the relay refused was reset (RSET, by
    aiosmtplib) and the session stays usable. A session idle for `keep_alive` seconds,
    or older than MAX_CONNECTION_AGE_SECONDS, is closed with QUIT; `keep_alive = 0`
    opens a new session per mail. A kept session the relay closed meanwhile (dropped,
    reset, timed out, 421) costs nothing: the mail is tried once more on a new one
    before it counts as a temporary failure. Each mail, connecting included, must be
    done within `session_timeout`, so a black-hole relay holds one sender at most that
    long and never the queue.

    With `starttls` the session is upgraded right after EHLO and the certificate is
    verified against `tls_context` (default: the system's trust store); a relay that
    does not offer STARTTLS gets no MAIL command at all (TemporaryFailure), so nothing
    goes out in clear text. AUTH (when `username` is set) happens after the upgrade.
    """

    def __init__(self, config: OutboundConfig, *, tls_context: ssl.SSLContext | None = None,
                 timeout: float = SMTP_TIMEOUT_SECONDS,
                 session_timeout: float = SESSION_TIMEOUT_SECONDS,
                 local_hostname: str | None = None,
                 keep_alive: float | None = None) -> None:
        try:
            self._host, self._port = parse_hostport(config.relay)
        except ValueError as err:
            raise ConfigError(f"outbound.relay: {err}") from None
        self._relay = config.relay
        self._starttls = config.starttls
        self._username = config.username
        self._password = _read_password(config.password_file) if config.username else ""
        self._tls_context = tls_context
        if config.starttls and tls_context is None:
            self._tls_context = relay_tls_context(config)
        self._timeout = timeout
        self._session_timeout = session_timeout
        self._local_hostname = local_hostname
        self._keep_alive = float(keep_alive if keep_alive is not None
                                 else keep_alive_seconds(config))
        self._idle: list[_Connection] = []  # last used on top: the others age out
        self._closing: set[asyncio.Task[None]] = set()

    async def send(self, mail_from: str, rcpt_to: str, raw: bytes, message_id: str) -> None:
        try:
            async with asyncio.timeout(self._session_timeout):
                await self._send(mail_from, rcpt_to, raw)
        except TimeoutError:
            raise TemporaryFailure(
                f"relay {self._relay}: session not finished within "
                f"{format_delay(self._session_timeout)}") from None

    async def aclose(self) -> None:
        """QUIT every kept session (stop)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self._quit_later(conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _send(self, mail_from: str, rcpt_to: str, raw: bytes) -> None:
        conn = self._take()
        if conn is not None:
            try:
                await self._transaction(conn, mail_from, rcpt_to, raw, kept=True)
                return
            except _KeptConnectionLost as err:
                log.info("relay %s closed a kept session (%s): sending on a new one",
                         self._relay, one_line(err))
        conn = await self._open()
        await self._transaction(conn, mail_from, rcpt_to, raw, kept=False)

    def _take(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if conn.smtp.is_connected:
                return conn
            conn.smtp.close()  # the relay hung up while it waited: noticed for free
        return None

    async def _open(self) -> _Connection:
        if self._local_hostname is None:  # the EHLO name; getfqdn may ask DNS: once
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        smtp = aiosmtplib.SMTP(hostname=self._host, port=self._port, timeout=self._timeout,
                               start_tls=False, local_hostname=self._local_hostname)
        try:
            await smtp.connect()
            if self._starttls:
                await smtp.ehlo()
                if not smtp.supports_extension("starttls"):
                    raise TemporaryFailure(
                        f"relay {self._relay} does not offer STARTTLS and outbound.starttls"
                        " is on: not sending in clear text")
                await smtp.starttls(tls_context=self._tls_context, server_hostname=self._host)
            await _greet(smtp)
            if self._username:
                await smtp.login(self._username, self._password)
        except (TemporaryFailure, PermanentFailure):
            smtp.close()
            raise
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as err:
            smtp.close()
            raise classify_smtp_error(err, self._relay) from err
        except BaseException:  # cancelled (stop, session timeout): just drop it
            smtp.close()
            raise
        return _Connection(smtp, asyncio.get_running_loop().time())

    async def _transaction(self, conn: _Connection, mail_from: str, rcpt_to: str, raw: bytes,
                           *, kept: bool) -> None:
        smtp = conn.smtp
        options = []
        if not raw.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if not (mail_from + rcpt_to).isascii():
            options.append("SMTPUTF8")
        try:
            await smtp.sendmail(mail_from, [rcpt_to], raw, mail_options=options)
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as err:
            if kept and _relay_closed(err):
                smtp.close()
                raise _KeptConnectionLost(one_line(err) or type(err).__name__) from err
            # A refusal about this mail: aiosmtplib sent RSET and the session goes on.
            self._release(conn)
            raise classify_smtp_error(err, self._relay) from err
        except BaseException:  # cancelled (stop, session timeout): just drop it
            smtp.close()
            raise
        self._release(conn)

    def _release(self, conn: _Connection) -> None:
        """After a transaction: keep the session for the next mail, or QUIT it."""
        loop = asyncio.get_running_loop()
        if not conn.smtp.is_connected:
            conn.smtp.close()
            return
        if self._keep_alive <= 0 or loop.time() - conn.opened >= MAX_CONNECTION_AGE_SECONDS:
            self._quit_later(conn)  # the mail's fate is decided: nobody waits for the 221
            return
        conn.idle_timer = loop.call_later(self._keep_alive, self._expire, conn)
        self._idle.append(conn)

    def _expire(self, conn: _Connection) -> None:
        """Idle for keep_alive: QUIT it (in the background; nobody waits for it)."""
        conn.idle_timer = None
        if conn in self._idle:
            self._idle.remove(conn)
            self._quit_later(conn)

    def _quit_later(self, conn: _Connection) -> None:
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None
        task = asyncio.get_running_loop().create_task(_quit(conn.smtp))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def relay_tls_context(config: OutboundConfig) -> ssl.SSLContext:
    """Verification of the relay's certificate: against `ca_file` (a private CA) when
    set, else the system's trust store."""
    if config.ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(config.ca_file))
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"outbound.ca_file: {config.ca_file}: cannot load: "
                          f"{one_line(err)}") from None


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    """EHLO (again after STARTTLS), falling back to HELO for a relay without ESMTP."""
    if not smtp.is_ehlo_or_helo_needed:
        return
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo()


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    """QUIT politely; the relay took the mail already, so nothing here may fail it."""
    try:
        if smtp.is_connected:
            await smtp.quit(timeout=5)
    except Exception:  # noqa: BLE001 - the mail's fate is decided
        pass
    finally:
        smtp.close()


# --- maildir ----------------------------------------------------------------------

class MaildirDrop:
    """Writes each mail as a complete `.eml` file into `<maildir>/new/`.

    Written to `tmp/<name>`, fsync'd, renamed into `new/`, and the directory fsync'd:
    whatever reads `new/` only ever sees complete files. `<name>` comes from the
    Message-ID, so sending the same row again (after a crash before `mark_outbox_sent`)
    replaces its file instead of adding a second one.
    """

    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        try:
            for sub in ("tmp", "new", "cur"):
                (maildir / sub).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise GatewayError(
                f"outbound.maildir: cannot create {maildir}: {one_line(err)}") from None

    @staticmethod
    def file_name(message_id: str) -> str:
        return hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()[:32] + ".eml"

    async def send(self, mail_from: str, rcpt_to: str, raw: bytes, message_id: str) -> None:
        try:
            await asyncio.to_thread(self._write, self.file_name(message_id), raw)
        except OSError as err:
            raise TemporaryFailure(f"maildir {self.maildir}: {one_line(err)}") from err

    def _write(self, name: str, raw: bytes) -> None:
        tmp = self.maildir / "tmp" / name
        new = self.maildir / "new" / name
        with open(tmp, "wb") as fh:  # truncates what a crash mid-write left behind
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, new)
        fd = os.open(self.maildir / "new", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def keep_alive_seconds(config: OutboundConfig) -> int:
    """`[outbound] keep_alive` in seconds; 0: a new relay session per mail."""
    try:
        return parse_duration(config.keep_alive)
    except ValueError as err:
        raise ConfigError(f"outbound.keep_alive: {err}") from None


def make_transport(config: OutboundConfig, *, local_hostname: str | None = None) -> Transport:
    if config.effective_transport == "smtp":
        return SmtpRelay(config, local_hostname=local_hostname)
    return MaildirDrop(config.maildir)


# --- the worker -------------------------------------------------------------------

def _duration(config: OutboundConfig, key: str) -> int:
    try:
        seconds = parse_duration(getattr(config, key))
    except ValueError as err:
        raise ConfigError(f"outbound.{key}: {err}") from None
    if seconds <= 0:
        raise ConfigError(f"outbound.{key}: must be longer than 0")
    return seconds


def _describe(row: OutboxRow) -> str:
    ticket = f"ticket #{row.ticket:06d}" if row.ticket is not None else "no ticket"
    return f"{one_line(row.rcpt_to)} ({ticket})"


class Mailer:
    """The outbox worker: `connections` senders, each one row at a time, woken by
    `wake()` when rows are queued in this process, by another connection's commit
    (`PRAGMA data_version`, read every COMMIT_CHECK_SECONDS while idle: the CLI, the
    web desk, other processes), by the earliest `next_attempt_at`, or by the slow poll.

    `clock` is injectable so tests move time instead of sleeping; `on_result` gets
    "sent", "retry" or "failed" after each attempt (metrics).
    """

    def __init__(self, conn: aiosqlite.Connection, transport: Transport,
                 config: OutboundConfig, clock: Callable[[], datetime] = store.utcnow,
                 on_result: Callable[[str], None] | None = None, *,
                 poll_interval: float = IDLE_POLL_SECONDS,
                 cluster: Cluster | None = None) -> None:
        """`cluster` (PostgreSQL): claims name this node and carry a lease; mails of a
        node whose lease ran out are taken back; commits are noticed by LISTEN."""
        self._conn = conn
        self._cluster = cluster
        self._commits = CommitWatch(conn, (OUTBOX_CHANNEL,)) if is_postgres(conn) else None
        self._expiry = ExpiryWatch(cluster) if cluster else None
        self._poll_interval = poll_interval
        self._transport = transport
        self._config = config
        self._clock = clock
        self._on_result = on_result
        self._retry_first = _duration(config, "retry_first")
        self._retry_max = max(_duration(config, "retry_max"), self._retry_first)
        self._give_up_after = timedelta(seconds=_duration(config, "give_up_after"))
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._sessions = max(config.connections, 1)
        # The first worker polls; the others look only when there is work (a row was
        # claimed, or wake()): idle, the outbox costs one query per poll, not N.
        self._helpers = [asyncio.Event() for _ in range(self._sessions - 1)]
        # The sessions' sent marks, several to one write (one turn at the write lock).
        self._sent_marks: GroupWriter[int] = GroupWriter(
            lambda ids: store.mark_outbox_sent(self._conn, ids, self._clock()))

    def wake(self) -> None:
        """New rows are due: look now instead of at the next poll."""
        self._wake.set()
        self._wake_helpers()

    def _wake_helpers(self) -> None:
        for event in self._helpers:
            event.set()

    async def start(self) -> None:
        if self._tasks:
            raise RuntimeError("mailer already started")
        recovered = await store.recover_outbox(
            self._conn, self._cluster.node if self._cluster else None)
        if self._commits:
            self._commits.start()
        if recovered:
            log.warning("outbox: %d mail(s) left mid-send by an earlier stop go again "
                        "(same Message-ID)", recovered)
        self._stopping = False
        loop = asyncio.get_running_loop()
        # `connections` workers, each one relay session at a time: a session that
        # hangs holds one worker (until the session timeout), never the queue.
        self._tasks = [loop.create_task(self._run(), name="mailer-0")]
        self._tasks += [loop.create_task(self._help(event), name=f"mailer-{n + 1}")
                        for n, event in enumerate(self._helpers)]

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Finish the sends in hand (at most `grace` seconds), then stop. A send cut off
        leaves its row `sending`; the next start sends it again."""
        self._stopping = True
        self.wake()
        tasks, self._tasks = self._tasks, []
        if tasks:
            await self._finish(tasks, grace)
        await self._sent_marks.drain()
        if self._commits:
            await self._commits.stop()
        if isinstance(self._transport, ClosingTransport):
            try:
                await self._transport.aclose()  # QUIT the kept relay sessions
            except Exception:  # noqa: BLE001 - stopping goes on
                log.exception("outbox: closing the transport failed")

    @staticmethod
    async def _finish(tasks: list[asyncio.Task[None]], grace: float) -> None:
        _, pending = await asyncio.wait(tasks, timeout=grace)
        if pending:
            log.warning("outbox: %d send(s) still in progress after %.0fs; cut off, those "
                        "the relay had not accepted go again on the next start",
                        len(pending), grace)
            for task in pending:
                task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("outbox: a mailer worker had stopped with an error: %s",
                          one_line(f"{type(result).__name__}: {result}"))

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            self._wake.clear()
            # Read before the claim: a commit after it changes what _idle compares.
            version = await self._data_version()
            try:
                worked = await self.run_once()
            except Exception as err:  # noqa: BLE001 - e.g. database locked: the loop goes on
                failures += 1
                delay = min(ERROR_PAUSE_SECONDS * 2 ** min(failures - 1, 8), 300.0)
                if is_environmental(err):
                    log.warning("outbox: claiming a mail failed: %s; again in %s",
                                one_line(err), format_delay(delay))
                else:
                    log.exception("outbox: claiming or marking a mail failed")
                await self._sleep(delay)
                continue
            failures = 0
            if not worked and not self._stopping:
                await self._idle(version)

    async def _help(self, event: asyncio.Event) -> None:
        """A further relay session: sends while rows are due, then waits to be woken."""
        while not self._stopping:
            await event.wait()  # never at start: the first worker's claim comes first
            event.clear()
            while not self._stopping:
                try:
                    if not await self.run_once():
                        break
                except Exception as err:  # noqa: BLE001 - the first worker reports and paces
                    log.warning("outbox: a parallel session stops for now: %s", one_line(err))
                    break

    async def _idle(self, version: int | None) -> None:
        """Wait for wake(), another connection's commit that made a row due, the next
        retry, or the slow poll, whichever comes first."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        due_in = await self._due_in()
        deadline = started + self._idle_delay(due_in)
        # A row due but not claimable (its ticket has a mail in flight, or another
        # process holds it): commits alone do not make us try again at once.
        not_before = started + (MIN_IDLE_SECONDS if due_in is not None and due_in <= 0 else 0)
        while not self._stopping:
            left = deadline - loop.time()
            if left <= 0 or await self._sleep(min(left, COMMIT_CHECK_SECONDS)):
                return
            if version is None or loop.time() < not_before:
                continue
            current = await self._data_version()
            if current is None or current == version:
                continue
            version = current  # another connection committed: is a row due now?
            due_in = await self._due_in()
            if due_in is not None and due_in <= 0:
                return
            deadline = min(deadline, loop.time() + self._idle_delay(due_in))

    async def _data_version(self) -> int | None:
        """SQLite's count of commits by other connections, or PostgreSQL's count of
        NOTIFYs (None when it cannot be read: then only wake(), the next retry and the
        slow poll wake us)."""
        if self._commits:
            return await self._commits.version()
        try:
            rows = list(await self._conn.execute_fetchall("PRAGMA data_version"))
        except Exception as err:  # noqa: BLE001
            log.warning("outbox: reading data_version failed: %s", one_line(err))
            return None
        return int(rows[0][0]) if rows else None

    async def _due_in(self) -> float | None:
        """Seconds until the earliest pending row is due (<= 0: due now), None when
        nothing is pending; ERROR_PAUSE_SECONDS when the database cannot say."""
        try:
            due = await store.next_outbox_due(self._conn)
        except Exception as err:  # noqa: BLE001
            if is_environmental(err):  # expected in operation: one line, no traceback
                log.warning("outbox: reading the next due time failed: %s", one_line(err))
            else:
                log.exception("outbox: reading the next due time failed")
            return ERROR_PAUSE_SECONDS
        if due is None:
            return None
        return (due - self._clock()).total_seconds()

    def _idle_delay(self, due_in: float | None) -> float:
        if due_in is None:
            return self._poll_interval
        return min(max(due_in, MIN_IDLE_SECONDS), self._poll_interval)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, or less if woken; whether we were woken."""
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def run_once(self) -> bool:
        """Claim one due row and send it; False when nothing was due."""
        now = self._clock()
        cluster = self._cluster
        if cluster is None:
            row = await store.claim_due_outbox(self._conn, now)
        else:
            await self._release_expired(now)
            row = await store.claim_due_outbox(self._conn, now, node=cluster.node,
                                               lease_until=cluster.lease_from(now))
        if row is None:
            return False
        self._wake_helpers()  # there may be more: the other sessions look too
        renewing = self._keep_lease(row)
        try:
            raw = await store.read_outbox_raw(self._conn, row.id)
            await self._transport.send(row.mail_from, row.rcpt_to, raw, row.message_id)
        except PermanentFailure as err:
            await self._fail(row, one_line(err))
        except TemporaryFailure as err:
            await self._retry(row, one_line(err))
        except Exception as err:  # noqa: BLE001 - a bug must not lose the mail
            log.exception("%s outbox %d: unexpected error while sending",
                          one_line(row.message_id), row.id)
            await self._retry(row, one_line(f"{type(err).__name__}: {err}"))
        else:
            await self._persist(row, lambda: self._sent_marks.add(row.id))
            log.info("%s outbox %d sent to %s", one_line(row.message_id), row.id,
                     _describe(row))
            self._report(RESULT_SENT)
        finally:
            if renewing is not None:
                renewing.cancel()
        return True

    def _keep_lease(self, row: OutboxRow) -> asyncio.Task[None] | None:
        """PostgreSQL: the claim stays this node's while a (slow) relay session sends
        the mail, so no other node sends it too."""
        return keep_renewed(self._cluster, lambda node, until: store.renew_outbox_lease(
            self._conn, row.id, node, until), f"outbox {row.id}", self._clock)

    async def _release_expired(self, now: datetime) -> None:
        """PostgreSQL: mails a dead node had in hand are due again once its lease ends."""
        if self._expiry is None or not self._expiry.due():
            return
        released = await store.release_expired_outbox(self._conn, now)
        if released:
            log.warning("outbox: %d mail(s) of a node whose lease ran out are due again "
                        "(same Message-ID)", released)

    async def _retry(self, row: OutboxRow, error: str) -> None:
        now = self._clock()
        deadline = datetime.fromisoformat(row.queued_at) + self._give_up_after
        if now >= deadline:
            await self._fail(row, f"gave up after {self._config.give_up_after}: {error}")
            return
        delay = next_retry(row.attempts, self._retry_first, self._retry_max)
        # The last try falls on the deadline rather than up to retry_max past it.
        next_at = min(now + timedelta(seconds=delay), deadline)
        await self._persist(row, lambda: store.mark_outbox_retry(self._conn, row.id, next_at,
                                                                 error))
        # Our own commits leave data_version alone: the idle first sender must learn of
        # the new due time from us (else it sleeps until the slow poll).
        self._wake.set()
        log.warning("%s outbox %d to %s: temporary failure, retry in %s: %s",
                    one_line(row.message_id), row.id, _describe(row),
                    format_delay((next_at - now).total_seconds()), error)
        self._report(RESULT_RETRY)

    async def _persist(self, row: OutboxRow, mark: Callable[[], Awaitable[None]]) -> None:
        """Record a send's result; a locked or full database is waited out (the row
        stays `sending` meanwhile, so no other worker sends it again)."""
        failures = 0
        while True:
            try:
                await mark()
                return
            except Exception as err:
                if not is_environmental(err) or self._stopping:
                    raise
                failures += 1
                delay = min(ERROR_PAUSE_SECONDS * 2 ** min(failures - 1, 8), 300.0)
                log.warning("%s outbox %d: recording the result failed: %s; again in %s",
                            one_line(row.message_id), row.id, one_line(err), format_delay(delay))
                await asyncio.sleep(delay)

    async def _fail(self, row: OutboxRow, error: str) -> None:
        await self._persist(row, lambda: store.mark_outbox_failed(self._conn, row.id, error))
        log.error("%s outbox %d to %s: failed: %s", one_line(row.message_id), row.id,
                  _describe(row), error)
        self._report(RESULT_FAILED)

    def _report(self, result: str) -> None:
        if self._on_result is None:
            return
        try:
            self._on_result(result)
        except Exception:  # noqa: BLE001 - metrics must not stop the mail
            log.exception("outbox: on_result callback failed")
