"""gateway.aiosmtpd_fork relies on aiosmtpd's (and asyncio's) private parts: these tests
fail, naming what to re-read, when an upgrade changes any of them."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import textwrap
from importlib.metadata import version
from typing import Any

import aiosmtpd
import pytest
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

from gateway import aiosmtpd_fork
from gateway.aiosmtpd_fork import FORKED_FROM, PRIVATE_NAMES, UPSTREAM_SOURCES, GatewaySMTP

_OWNERS: dict[str, Any] = {"SMTP": SMTP, "LMTP": LMTP, "StreamReader": asyncio.StreamReader}


def upstream_digest(name: str) -> str:
    """sha256 (16 hex digits) of the dedented source of `name` ("SMTP.smtp_DATA",
    "LMTP"), as recorded in aiosmtpd_fork.UPSTREAM_SOURCES."""
    owner, _, attr = name.partition(".")
    obj = _OWNERS[owner] if not attr else inspect.getattr_static(_OWNERS[owner], attr)
    source = textwrap.dedent(inspect.getsource(obj))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def test_installed_aiosmtpd_is_the_one_the_fork_was_written_against() -> None:
    installed = f"aiosmtpd {version('aiosmtpd')}"
    assert installed == FORKED_FROM == f"aiosmtpd {aiosmtpd.__version__}", (
        f"{installed} is installed, the fork was written against {FORKED_FROM}: re-read "
        "every method in aiosmtpd_fork.UPSTREAM_SOURCES, then move the pin in pyproject.toml")


@pytest.mark.parametrize("name", sorted(UPSTREAM_SOURCES))
def test_upstream_source_is_unchanged(name: str) -> None:
    recorded, what_to_check = UPSTREAM_SOURCES[name]
    assert upstream_digest(name) == recorded, (
        f"aiosmtpd's {name} changed since the fork ({FORKED_FROM}): re-read it and "
        f"re-fork: {what_to_check}; then record its new digest in "
        "aiosmtpd_fork.UPSTREAM_SOURCES")


def test_every_overridden_upstream_method_is_recorded() -> None:
    """A method GatewaySMTP/GatewayLMTP replaces or wraps must have its digest
    recorded, or an upstream change to it would go unnoticed."""
    overridden = {f"SMTP.{name}" for cls in (GatewaySMTP, aiosmtpd_fork.GatewayLMTP)
                  for name in vars(cls)
                  if callable(getattr(SMTP, name, None)) and not name.startswith("__")}
    assert overridden - set(UPSTREAM_SOURCES) == set()


@pytest.mark.parametrize(("owner", "name", "kind"),
                         [p for p in PRIVATE_NAMES if p[2] == "method"])
def test_private_method_exists_with_the_signature_the_fork_calls(
        owner: str, name: str, kind: str) -> None:
    expected = {
        "_create_envelope": ["self"],
        "_getaddr": ["self", "arg"],
        "_handle_client": ["self"],
        "_set_post_data_state": ["self"],
        "_call_handler_hook": ["self", "command", "args"],
        "_reset_timeout": ["self", "duration"],
    }[name]
    method = inspect.getattr_static(_OWNERS[owner], name, None)
    assert inspect.isfunction(method), f"{owner}.{name} is gone or no longer a method"
    assert list(inspect.signature(method).parameters) == expected, (
        f"{owner}.{name} takes other arguments now: re-read it and adapt aiosmtpd_fork")
    wants_coroutine = name in ("_handle_client", "_call_handler_hook")
    assert inspect.iscoroutinefunction(method) == wants_coroutine, (
        f"{owner}.{name} changed between sync and async: adapt aiosmtpd_fork")


async def test_private_attributes_are_there_on_a_live_session() -> None:
    """_reader and _writer on a real session, the reader made with the line limit."""
    assert {(o, n) for o, n, k in PRIVATE_NAMES if k == "attribute"} == {
        ("SMTP", "_reader"), ("SMTP", "_writer"),
        ("StreamReader", "_limit"), ("StreamReader", "_buffer")}
    loop = asyncio.get_running_loop()
    sessions: list[SMTP] = []

    def factory() -> SMTP:
        sessions.append(SMTP(_Accept(), hostname="fork.test"))
        return sessions[-1]

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"220 fork.test")
        (session,) = sessions
        assert isinstance(session._reader, asyncio.StreamReader), "SMTP._reader is gone"
        assert isinstance(session._writer, asyncio.StreamWriter), "SMTP._writer is gone"
        assert session._reader._limit == SMTP.line_length_limit, (  # type: ignore[attr-defined]
            "the session's reader no longer has _limit = line_length_limit: "
            "re-read _read_data, which raises and restores it")
        assert isinstance(session._reader._buffer, bytearray), (  # type: ignore[attr-defined]
            "StreamReader._buffer is no longer a bytearray: re-read _read_data's hand-back")
        writer.write(b"QUIT\r\n")
        assert (await reader.readline()).startswith(b"221")
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


class _Transport(asyncio.Transport):
    """Counts pause_reading: how StreamReader applies its _limit."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = 0

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        pass


def test_reader_limit_is_what_pauses_the_socket() -> None:
    """The DATA reader raises _limit so that the socket is not paused every 2 KB:
    StreamReader must still pause past 2 x _limit bytes buffered, and only then."""
    loop = asyncio.new_event_loop()
    try:
        for limit, paused in ((SMTP.line_length_limit, 1), (aiosmtpd_fork.DATA_CHUNK, 0)):
            reader = asyncio.StreamReader(limit=SMTP.line_length_limit, loop=loop)
            transport = _Transport()
            reader.set_transport(transport)
            reader._limit = limit  # type: ignore[attr-defined]
            reader.feed_data(b"x" * (4 * SMTP.line_length_limit))
            assert transport.paused == paused, (
                f"StreamReader with _limit={limit} paused {transport.paused} time(s): its "
                "flow control changed, re-read GatewaySMTP._read_data")
    finally:
        loop.close()


async def test_bytes_put_back_into_the_reader_buffer_are_read_first() -> None:
    """What _read_data does with a pipelined command read past CRLF.CRLF."""
    reader = asyncio.StreamReader()
    reader.feed_data(b"QUIT\r\n")
    reader._buffer[:0] = b"RSET\r\n"  # type: ignore[attr-defined]
    assert await reader.readuntil(b"\r\n") == b"RSET\r\n", (
        "StreamReader._buffer no longer holds the unread bytes: re-read _read_data")
    assert await reader.readuntil(b"\r\n") == b"QUIT\r\n"


class _Accept:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


def test_per_class_tables_give_each_connection_the_tables_upstream_builds() -> None:
    # aiosmtpd_fork caches SMTP.__init__'s introspection per class: every protocol
    # object must still get exactly the commands, hooks and AUTH mechanisms that
    # upstream's own dir()/inspect.getmembers() would find, bound to itself.
    class Handler:
        async def handle_DATA(self, *args: Any) -> str:
            return "250 OK"

        async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                              responses: list[str]) -> list[str]:
            return responses

        def auth_CUSTOM(self, server: Any, args: Any) -> None:
            return None

    handler = Handler()
    handler.handle_NOOP = lambda *args: "250 OK"  # type: ignore[attr-defined]

    async def build() -> list[SMTP]:
        return [GatewaySMTP(handler, hostname="h"), SMTP(handler, hostname="h"),
                aiosmtpd_fork.GatewayLMTP(handler, hostname="h")]

    for server in asyncio.run(build()):
        expected_smtp = {m.replace("smtp_", "") for m in dir(type(server)) if m.startswith("smtp_")}
        assert set(server._smtp_methods) == expected_smtp  # type: ignore[attr-defined]
        assert all(m.__self__ is server
                   for m in server._smtp_methods.values())  # type: ignore[attr-defined]
        assert set(server._handle_hooks) == {"DATA", "EHLO", "NOOP"}  # type: ignore[attr-defined]
        expected_auth = {"CUSTOM"} | {m.replace("auth_", "").replace("__", "-")
                                      for m, _ in inspect.getmembers(type(server))
                                      if m.startswith("auth_")}
        assert set(server._auth_methods) == expected_auth  # type: ignore[attr-defined]
        assert server._ehlo_hook_ver == "new"  # type: ignore[attr-defined]
