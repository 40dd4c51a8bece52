"""atheris target: a scripted client byte stream -> the real SMTP session.

Each input is what one client sends on one connection. It is fed to the real
`GatewaySMTP` protocol (over an in-memory transport, in one event loop kept for the
whole run) with the real `IntakeHandler` and `IntakeWriter` committing into a real
SQLite store in a temporary folder. Findings:

- an exception the session did not turn into an SMTP reply (aiosmtpd's
  handle_exception path: "SMTP session error" in the log) or one the event loop saw;
- a reply that is not `NNN<SP|->text CRLF` with a 2xx-5xx code, or that leaks an
  exception ("Error: (");
- a `250 ... queued as N` for which row N is not in the database with its bytes;
- a session that does not end after the input plus `CRLF.CRLF QUIT` (a hang).

    .venv/bin/python fuzz/fuzz_smtp.py -max_total_time=600             # seeded run
    .venv/bin/python fuzz/fuzz_smtp.py CORPUS_DIR -runs=1000000        # own corpus dir
    .venv/bin/python fuzz/fuzz_smtp.py crash-<sha1>                    # replay one input

With no directory argument seed sessions (one per tests/data/*.eml and shared corpus
message, plus hand-written edge cases) are written to fuzz/.corpus/smtp/, which then
keeps what the fuzzer finds between runs. See fuzz/README.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["gateway.smtp_edge", "gateway.aiosmtpd_fork",
                                         "aiosmtpd"]):
    from gateway import store
    from gateway.config import Config, SmtpConfig, StorageConfig
    from gateway.smtp_edge import IntakeHandler, smtp_factory

WORK_CORPUS = ROOT / "fuzz" / ".corpus" / "smtp"
REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -][^\r\n]*$")
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as (\d+)$")
SESSION_LIMIT = 5.0  # seconds a session may take after its input ended
ENDING = b"\r\n.\r\nQUIT\r\n"


class MemoryTransport(asyncio.Transport):
    """What the protocol writes is kept; close() ends the connection as a socket would."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:
            self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.7", 40000), "sockname": ("127.0.0.1", 25)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class Findings(logging.Handler):
    """Log records that mean an exception escaped into aiosmtpd's error path."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "SMTP session error" in text or record.exc_info:
            self.records.append(text)


class Harness:
    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="fuzz-smtp-"))
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[str] = []
        self.loop.set_exception_handler(
            lambda loop, context: self.loop_errors.append(str(context.get("message"))))
        self.findings = Findings()
        logging.getLogger().addHandler(self.findings)
        logging.getLogger().setLevel(logging.ERROR)
        self.config = Config(
            smtp=SmtpConfig(listen="127.0.0.1:0", hostname="gw.fuzz", max_message_size=200_000,
                            spool_threshold=4096, max_recipients=5, timeout="1h",
                            data_timeout="1h"),
            storage=StorageConfig(database=self.folder / "gw.db",
                                  attachments=self.folder / "att"))
        self.loop.run_until_complete(self._open())

    async def _open(self) -> None:
        self.conn = await store.connect(self.config.storage.database)
        await self.conn.execute("PRAGMA synchronous = OFF")  # speed; durability is not the point
        await store.migrate(self.conn)
        self.writer = store.IntakeWriter(self.conn)
        self.writer.start()
        self.handler = IntakeHandler(self.config, self.writer)
        self.factory = smtp_factory(self.handler, self.config)

    def close(self) -> None:
        async def closing() -> None:
            await self.writer.stop()
            await self.conn.close()

        self.loop.run_until_complete(closing())

    def run(self, data: bytes) -> None:
        self.loop.run_until_complete(self._session(data))

    async def _session(self, data: bytes) -> None:
        protocol = self.factory()
        transport = MemoryTransport(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data + ENDING)
        task = protocol._handler_coroutine
        try:
            await asyncio.wait_for(asyncio.shield(task), SESSION_LIMIT)
        except asyncio.CancelledError:
            pass  # the session ended by closing (its own QUIT or a 421)
        except TimeoutError:
            transport.close()
            raise AssertionError(
                f"session did not end within {SESSION_LIMIT}s of its input") from None
        if not transport.closed:
            transport.close()
        await asyncio.sleep(0)
        await self._check(bytes(transport.written))

    async def _check(self, written: bytes) -> None:
        if self.findings.records or self.loop_errors:
            found = self.findings.records + self.loop_errors
            self.findings.records, self.loop_errors = [], []
            raise AssertionError(f"exception escaped the session: {found}")
        if written and not written.endswith(b"\r\n"):
            raise AssertionError(f"reply without CRLF: {written[-80:]!r}")
        for line in written.split(b"\r\n")[:-1]:
            if not REPLY_LINE.match(line):
                raise AssertionError(f"malformed reply line: {line[:120]!r}")
            if b"Error: (" in line:
                raise AssertionError(f"reply leaks an exception: {line[:120]!r}")
            queued = QUEUED.match(line)
            if queued:
                rows = await self.conn.execute_fetchall(
                    "SELECT length(r.raw), i.size FROM inbound i JOIN inbound_raw r USING (id)"
                    " WHERE i.id = ?", (int(queued.group(1)),))
                if not rows or rows[0][0] != rows[0][1]:
                    raise AssertionError(f"250 without its committed message: {line!r}")


def seed_sessions() -> list[bytes]:
    """One plausible session per known message, plus edge cases of the protocol."""
    shared = Path(os.environ.get("S4E_CORPUS", ROOT.parent / "shared" / "corpus"))
    seeds = [
        b"EHLO a\r\nMAIL FROM:<a@b.pl> SIZE=10\r\nRCPT TO:<serwis@s4e.pl>\r\nDATA\r\n"
        b"Subject: x\r\n\r\n..dot\r\n.\r\n",
        b"HELO a\r\nMAIL FROM:<>\r\nRCPT TO:<crm@s4e.pl>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n\r\n",
        b"EHLO a\r\nMAIL FROM:<a@b.pl> BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<Serwis@S4E.pl>\r\n"
        b"DATA\r\nSubject: \xc5\xbc\r\n\r\n\n.\n\r.\r\n.\r\nRSET\r\nNOOP\r\nVRFY x\r\n",
        b"EHLO a\r\nAUTH PLAIN AGEAYg==\r\nSTARTTLS\r\nMAIL FROM:<a@b.pl>\r\nDATA\r\n",
        b"EHLO a\r\nMAIL FROM:<a@b.pl>\r\nRCPT TO:<serwis@s4e.pl>\r\nDATA\r\n" + b"A" * 5000 + b"\r\n",
        # Findings, now regression seeds (tests/test_edge_limits.py has each as a test).
        b"EHLO a\r\n\r.\r\n",
        b"EHLO a\r\nMAIL FROM:<ja\x9an@example.com>\r\nRCPT TO:<serwis@s4e.pl>\r\nDATA\r\nx\r\n",
        b"EHLO a\r\nMAIL FROM:<\r\nMAIL FROM:<a@b.pl>\r\nRCPT TO:<\r\n",
        b"EHLO a\r\nVRFY [R\xaf\xaf\r\n",
        b"EHLO a\r\nMAIL FROM:<a@ [TO:<serwis@s4e.pl>\r\n",
    ]
    for folder in (ROOT / "tests" / "data", shared):
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.eml"))[:60]:
            raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            seeds.append(b"EHLO client.example\r\nMAIL FROM:<jan@example.com>\r\n"
                         b"RCPT TO:<serwis@s4e.pl>\r\nDATA\r\n"
                         + raw.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\nQUIT\r\n")
    return seeds


def prepare_corpus(folder: Path = WORK_CORPUS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, seed in enumerate(seed_sessions()):
        target = folder / f"seed-{n:03d}"
        if not target.exists():
            target.write_bytes(seed)
    return folder


HARNESS: Harness | None = None


def test_one_input(data: bytes) -> None:
    assert HARNESS is not None
    try:
        HARNESS.run(data)
    except BaseException:
        HARNESS.close()  # the database thread would keep a crashing process alive
        raise


def main() -> None:
    global HARNESS
    HARNESS = Harness()
    args = list(sys.argv)
    folders = [Path(a) for a in args[1:] if not a.startswith("-") and Path(a).is_dir()]
    for folder in folders:
        if not any(folder.iterdir()):
            prepare_corpus(folder)  # an empty corpus folder starts from the seeds
    if not any(not a.startswith("-") and Path(a).exists() for a in args[1:]):
        args.append(str(prepare_corpus()))
    if not any(a.startswith("-max_len") for a in args):
        args.append("-max_len=65536")
    if not any(a.startswith("-timeout") for a in args):
        args.append("-timeout=20")
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
