"""Everything that depends on aiosmtpd's internals: `GatewaySMTP` (aiosmtpd's `SMTP`
with a chunked DATA reader, shutdown awareness and RFC 3463 codes on aiosmtpd's own
replies) and `GatewayLMTP`.

The intake policy (who may be written to, the limits, the replies, commit-then-250)
is `gateway.smtp_edge.IntakeHandler`; this module only asks it through `EdgePolicy`.

Written against aiosmtpd 1.4.6 (pyproject pins `>=1.4.6,<1.4.7`) on CPython 3.11.
`UPSTREAM_SOURCES` records a digest of every upstream method this module copies or
whose body it relies on, `PRIVATE_NAMES` every private name it touches;
tests/test_aiosmtpd_fork.py fails, naming the method to re-read, when either changes.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import re
import types
from typing import TYPE_CHECKING, Any, Protocol

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

if TYPE_CHECKING:
    from gateway.store import Spool

FORKED_FROM = "aiosmtpd 1.4.6"

# sha256 (first 16 hex digits) of textwrap.dedent(inspect.getsource(...)) of the upstream
# code this module copies or relies on line by line, with what to re-check when it
# changes. tests/test_aiosmtpd_fork.py recomputes them.
UPSTREAM_SOURCES: dict[str, tuple[str, str]] = {
    "SMTP.smtp_DATA": (
        "025c94766a3c653c",
        "GatewaySMTP.smtp_DATA is a copy with _read_data instead of the line loop: port "
        "any change (checks before 354, smuggling rules, hook call, post-DATA state)"),
    "SMTP._getaddr": (
        "c9f8dc386b41034a",
        "GatewaySMTP._getaddr wraps it: does it still return (None, None) for a bad "
        "address, and which exceptions can it raise now?"),
    "SMTP._handle_client": (
        "49324c69de994eb0",
        "GatewaySMTP._handle_client wraps it; with_enhanced_code knows its reply texts "
        "(250 HELP, 250 <hostname>) and the command loop reads lines with _reader"),
    "SMTP._set_post_data_state": (
        "5ba57233145a4836",
        "smtp_DATA calls it after every outcome: it must still only renew the envelope "
        "through _create_envelope"),
    "SMTP._create_envelope": (
        "070f28a6ba3f9961", "GatewaySMTP overrides it to make a GatewayEnvelope"),
    "SMTP._call_handler_hook": (
        "ba0ae3757b244f8d",
        "smtp_DATA calls it for the DATA hook: same arguments (server, session, envelope)?"),
    "SMTP._reset_timeout": (
        "a6ee240dba077e03",
        "_read_data calls it after every chunk to keep the session timeout from firing"),
    "SMTP.connection_made": (
        "0096cde9fccd04c8",
        "creates _reader/_writer (StreamReader with limit=line_length_limit), the "
        "session and the _handle_client task that GatewaySMTP wraps"),
    "SMTP.connection_lost": (
        "113bdb9e32d673b6", "GatewaySMTP.connection_lost gives the session's slot back first"),
    "SMTP.push": (
        "fdd67c2de32a2e36",
        "GatewaySMTP.push rewrites the text then calls it: still encodes with utf-8 "
        "under SMTPUTF8 and writes to _writer?"),
    "SMTP.smtp_EHLO": (
        "f18141b04b053b61",
        "IntakeHandler.handle_EHLO expects responses[0] = '250-<hostname>', then one "
        "'250-' line per extension (AUTH among them), SIZE only with data_size_limit"),
    "SMTP.smtp_QUIT": (
        "b791a43ab53ece33",
        "GatewaySMTP.smtp_QUIT gives the slot back before it: it still answers 221 and "
        "closes the transport?"),
    "SMTP.smtp_AUTH": (
        "dfb009baf47b2c2a",
        "GatewaySMTP.smtp_AUTH replaces it (502, no accounts): does upstream's now do "
        "something before the handler that must still happen?"),
    "SMTP.check_helo_needed": (
        "ca1f70c86e077570", "smtp_DATA's first check, as upstream's smtp_DATA does"),
    "SMTP.check_auth_needed": (
        "afb8328b683de737", "smtp_DATA's second check, as upstream's smtp_DATA does"),
    "SMTP.__init__": (
        "09553bcb94a7b745",
        "_install_class_tables stands in for its per-connection introspection: does it "
        "still only ask inspect.getmembers for auth_* members, dir() for handle_* and "
        "smtp_* names and inspect.signature for the EHLO hook, and nothing else?"),
    "LMTP": (
        "0ac5be904f80eeac",
        "GatewayLMTP(GatewaySMTP, LMTP) relies on LMTP only renaming the greetings "
        "(LHLO; HELO/EHLO refused) and on push being an attribute it may replace"),
}

# Private names this module touches, besides the methods above: (owner, name, kind).
# "method": a function on the class; "attribute": set on every instance.
PRIVATE_NAMES: tuple[tuple[str, str, str], ...] = (
    ("SMTP", "_reader", "attribute"),             # the session's asyncio.StreamReader
    ("SMTP", "_writer", "attribute"),             # its StreamWriter (close_with writes on it)
    ("SMTP", "_create_envelope", "method"),
    ("SMTP", "_getaddr", "method"),
    ("SMTP", "_handle_client", "method"),
    ("SMTP", "_set_post_data_state", "method"),
    ("SMTP", "_call_handler_hook", "method"),
    ("SMTP", "_reset_timeout", "method"),
    ("StreamReader", "_limit", "attribute"),      # raised while reading DATA
    ("StreamReader", "_buffer", "attribute"),     # a pipelined command handed back
)

DATA_CHUNK = 256 * 1024
DATA_TERMINATOR = b"\r\n.\r\n"

# RFC 3463 codes for the replies aiosmtpd writes without one (its syntax errors,
# RSET, NOOP, QUIT...). Greeting and EHLO lines never carry one (RFC 2034).
_ENHANCED = {"250": "2.0.0", "221": "2.0.0", "500": "5.5.2", "501": "5.5.4",
             "502": "5.5.1", "503": "5.5.1", "504": "5.5.4", "530": "5.7.0",
             "454": "4.7.0", "554": "5.5.0", "555": "5.5.4", "553": "5.1.3",
             "552": "5.3.4", "421": "4.3.2", "451": "4.3.0", "550": "5.0.0"}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}\b")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def with_enhanced_code(text: str, hostname: str) -> str:
    code = text[:3]
    if (len(text) < 4 or text[3] != " " or code not in _ENHANCED
            or _HAS_ENHANCED.match(text) or text in ("250 HELP", f"250 {hostname}")):
        return text
    return f"{code} {_ENHANCED[code]} {text[4:]}"


class DataSink(Protocol):
    """Where the unstuffed message goes while it arrives (smtp_edge.SpoolingSink)."""

    size: int
    error: OSError | None

    @property
    def too_big(self) -> bool: ...

    async def write(self, data: bytes | bytearray) -> None: ...

    async def finish(self) -> tuple[bytes, Spool | None]:
        """The bytes the handler reads (the whole message, or a spooled one's head)
        and the spool file holding the whole message, if any."""
        ...

    async def discard(self) -> None: ...


class EdgePolicy(Protocol):
    """What GatewaySMTP asks of the intake policy (smtp_edge.IntakeHandler), besides
    aiosmtpd's handle_* hooks."""

    data_timeout: float

    def session_opened(self, server: GatewaySMTP) -> None: ...

    def session_closed(self, server: GatewaySMTP) -> None:
        """Called once per session (at QUIT or when the connection is lost)."""
        ...

    def refusal_at_greeting(self) -> str | None:
        """The reply that ends a new session at once (shutting down), or None."""
        ...

    def new_sink(self) -> DataSink: ...

    async def data_timed_out(self, server: GatewaySMTP, size: int) -> None: ...

    def too_big(self, session: Session, size: int) -> str: ...

    def spool_failed(self, session: Session, error: OSError) -> str: ...


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


def _unstuffed(buf: bytearray, cut: int, first: bool) -> bytes | bytearray:
    """buf[:cut] unstuffed; without the virtual leading CRLF when `first`."""
    part = buf[:cut].replace(b"\r\n.", b"\r\n")
    return part[2:] if first else part


# --- per-class tables instead of per-connection introspection ------------------------
#
# SMTP.__init__ builds its command and hook tables with inspect.getmembers(self),
# inspect.getmembers(handler), dir() twice and inspect.signature, on every connection:
# about 0.1 ms, most of it calling every property of a half-built protocol object. The
# names come from the classes, so they are looked up once per class here and only the
# binding is done per connection. Installed in aiosmtpd.smtp's namespace (it serves
# every SMTP instance in the process, upstream's own included) and exact for the three
# calls SMTP.__init__ makes (its digest is in UPSTREAM_SOURCES).

_DIR_NAMES: dict[type, tuple[str, ...]] = {}
_SIGNATURES: dict[Any, inspect.Signature] = {}


_ASKED_FOR = ("auth_", "handle_", "smtp_")  # the prefixes SMTP.__init__ filters dir() on


def _class_names(cls: type) -> tuple[str, ...]:
    names = _DIR_NAMES.get(cls)
    if names is None:
        names = _DIR_NAMES[cls] = tuple(n for n in builtins.dir(cls) if n.startswith(_ASKED_FOR))
    return names


def _dir(obj: Any = MISSING) -> list[str]:
    """dir(obj) as SMTP.__init__ uses it: the names it filters for, the class's (cached)
    and the instance's own."""
    if obj is MISSING:
        raise TypeError("aiosmtpd.smtp calls dir() with an argument only")
    own = getattr(obj, "__dict__", None)
    if type(obj).__dir__ is not object.__dir__ or not isinstance(own, dict):
        return builtins.dir(obj)
    names = _class_names(type(obj))
    extra = [n for n in own if n.startswith(_ASKED_FOR)]
    return sorted(set(names).union(extra)) if extra else list(names)


def _getmembers(obj: Any) -> list[tuple[str, Any]]:
    """inspect.getmembers(obj) as SMTP.__init__ uses it: only the auth_* members (and,
    as getmembers does, none whose lookup raises AttributeError)."""
    members = []
    for name in _dir(obj):
        if name.startswith("auth_"):
            try:
                members.append((name, getattr(obj, name)))
            except AttributeError:
                continue
    return members


def _signature(fn: Any) -> inspect.Signature:
    """inspect.signature, once per function (bound and plain kept apart: a bound
    method's signature has no `self`)."""
    func = getattr(fn, "__func__", None)
    if func is None or not hasattr(fn, "__self__"):
        return inspect.signature(fn)  # not a method: nothing per class to share
    found = _SIGNATURES.get(func)
    if found is None:
        found = _SIGNATURES[func] = inspect.signature(fn)
    return found


class _Inspect(types.ModuleType):
    """`inspect` for aiosmtpd.smtp: the two calls SMTP.__init__ makes per connection
    answered from the per-class tables, everything else the real module's."""

    getmembers = staticmethod(_getmembers)
    signature = staticmethod(_signature)

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)


def _install_class_tables() -> None:
    import aiosmtpd.smtp

    namespace = aiosmtpd.smtp.__dict__
    namespace["inspect"] = _Inspect("inspect")
    namespace["dir"] = _dir


_install_class_tables()


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with a chunked DATA reader and shutdown awareness."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.policy: EdgePolicy = handler
        # The connection slot taken at accept (EdgeServer), given back when it ends.
        self.limit_slot: str | None = None
        self._closed_for_policy = False

    def _create_envelope(self) -> Envelope:
        return GatewayEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.policy.session_opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._session_over()
        super().connection_lost(error)

    def _session_over(self) -> None:
        if not self._closed_for_policy:
            self._closed_for_policy = True
            self.policy.session_closed(self)

    async def smtp_QUIT(self, arg: str) -> None:
        if not arg:
            # The client is leaving: its slot is free now, not only once the event
            # loop has closed the socket (uvloop does that an iteration later, when
            # a sender at its per-IP limit may already be connecting again).
            self._session_over()
        await super().smtp_QUIT(arg)

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
                with_enhanced_code(CONTROL_CHARS.sub("?", line).encode("utf-8", "replace").decode(),
                                   self.hostname)
                for line in status.split("\r\n"))
        await super().push(status)

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    async def close_with(self, reply: str) -> None:
        """Say `reply` (a 421) and hang up; used for idle sessions at shutdown."""
        self._session_over()
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self._writer.write(reply.encode("ascii") + b"\r\n")
        finally:
            self.transport.close()

    async def _handle_client(self) -> None:
        refusal = self.policy.refusal_at_greeting()
        if refusal is not None:
            await self.push(refusal)
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
        policy = self.policy
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        sink = policy.new_sink()
        try:
            try:
                async with asyncio.timeout(policy.data_timeout):
                    await self._read_data(sink)
            except TimeoutError:
                await policy.data_timed_out(self, sink.size)
                return
            assert self.session is not None
            if sink.too_big:
                self._set_post_data_state()
                await self.push(policy.too_big(self.session, sink.size))
                return
            if sink.error is not None:
                self._set_post_data_state()
                await self.push(policy.spool_failed(self.session, sink.error))
                return
            content, spool = await sink.finish()
            assert isinstance(self.envelope, GatewayEnvelope)
            # With a spool the handler sees the head (for its checks); the writer
            # copies the whole file into the database before the 250.
            self.envelope.spool = spool
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
