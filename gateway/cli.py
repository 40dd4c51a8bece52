"""Command line: `s4e-gateway COMMAND ...`; exit 0 on success, 1 with one line on error.

`--config F` is accepted before or after the subcommand; without it
$S4E_GATEWAY_CONFIG names the file; without either the built-in defaults apply.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from gateway import __version__, store
from gateway.config import Config, check_files, config_path_from, load_config, risky_settings
from gateway.errors import ConfigError, GatewayError, NotFoundError, StoreError
from gateway.model import HeldStatus, Outcome, OutboxStatus, Status

log = logging.getLogger("gateway")

Command = Callable[[Config, argparse.Namespace], Awaitable[int]]


# syslog priorities journald reads from the start of each line (sd-daemon(3)), so
# `journalctl -p err` shows our errors.
_PRIORITIES = ((logging.ERROR, "<3>"), (logging.WARNING, "<4>"), (logging.INFO, "<6>"))
EX_CONFIG = 78  # sysexits.h: the unit's RestartPreventExitStatus=78 stops restarts


def syslog_prefix(levelno: int) -> str:
    for level, prefix in _PRIORITIES:
        if levelno >= level:
            return prefix
    return "<7>"


class _EscapingFormatter(logging.Formatter):
    """One line per event: CR/LF in logged values are escaped, never new lines.

    Every line starts with its syslog priority; the traceback of a real bug keeps its
    lines, each prefixed with the record's priority so journald files them together.
    """

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        head, sep, rest = text.partition("\nTraceback")
        escaped = head.replace("\r", "\\r").replace("\n", "\\n")
        prefix = syslog_prefix(record.levelno)
        if not sep:
            return prefix + escaped
        trace = (sep + rest).lstrip("\n").splitlines()
        return "\n".join([prefix + escaped, *(prefix + line for line in trace)])


def setup_logging(level: int = logging.INFO, *, name: str = "") -> None:
    """`name`: which process of the gateway logs (the workers say "worker N")."""
    handler = logging.StreamHandler(sys.stderr)
    where = f" [{name}]" if name else ""
    handler.setFormatter(_EscapingFormatter(f"%(levelname)s{where} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command at INFO: too much for a journal.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """Customer text for a terminal: control characters (escape sequences that could
    retitle or rewrite an operator's terminal) and bidi overrides (which reorder what
    the line shows) as U+FFFD."""
    return _CONTROL.sub("\ufffd", str(text))


def say(text: str = "") -> None:
    print(printable(text))


def local_time(config: Config, stamp: str | None) -> str:
    """An ISO UTC time from the database as people read it: minutes, `[tickets]
    timezone`. JSON output keeps the ISO UTC text."""
    if not stamp:
        return "-"
    from zoneinfo import ZoneInfo

    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(ZoneInfo(config.tickets.timezone)).strftime("%Y-%m-%d %H:%M")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Rows under a header row, columns as wide as their widest cell (the last one
    not padded)."""
    cells = [[printable(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *cells]:
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return lines


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], empty: str) -> None:
    if not rows:
        print(empty)
        return
    for line in table(headers, rows):
        print(line)


# --- lists: pages for people, streamed JSON for scripts ---------------------------

DEFAULT_PAGE = 50  # rows of a table without --limit


def whole_number(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number, `minimum` or more."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value

    return parse


page_size = whole_number(1, "a whole number")  # --limit N
row_id = whole_number(0, "a row id")  # --after ID (0: from the start)


def add_paging(sub: argparse.ArgumentParser, cursor: str = "ID",
               after_type: Callable[[str], Any] = row_id) -> None:
    sub.add_argument("--limit", type=page_size, metavar="N",
                     help=f"at most N rows (default: {DEFAULT_PAGE} in the table, "
                          "every row with --json)")
    sub.add_argument("--after", type=after_type, metavar=cursor,
                     help=f"start after the row with this {cursor} (the last one of the "
                          "previous page)")


_ROW_JSON = json.JSONEncoder(ensure_ascii=False)  # compact: C-accelerated


async def stream_json(rows: AsyncIterator[dict[str, Any]]) -> None:
    """A JSON list written as its rows come, one object per line: the memory of one
    row, and fast (`indent` would take json's pure-Python encoder: 3x slower)."""
    out = sys.stdout
    first = True
    async for row in rows:
        out.write(("[\n  " if first else ",\n  ") + _ROW_JSON.encode(row))
        first = False
    out.write("[]\n" if first else "\n]\n")


async def print_list(args: argparse.Namespace, rows: Callable[[int | None], AsyncIterator[Any]],
                     *, as_json: Callable[[Any], dict[str, Any]], headers: Sequence[str],
                     cells: Callable[[Any], Sequence[object]], empty: str,
                     cursor: Callable[[Any], object]) -> None:
    """A list command's output. `rows(n)` walks the list (at most n rows, None: all).
    --json streams every row (or --limit of them); the table shows one page
    (--limit, default 50) and, when more follow, ends with the option that shows the
    next one."""
    if args.json:
        await stream_json(as_json(r) async for r in rows(args.limit))
        return
    limit = args.limit or DEFAULT_PAGE
    page = [r async for r in rows(limit + 1)]
    print_table(headers, [cells(r) for r in page[:limit]], empty)
    if len(page) > limit:
        again = f"--limit {limit} " if args.limit else ""
        print(f"next: {again}--after {cursor(page[limit - 1])}")


MAX_ACTOR = 200


def actor_of(args: argparse.Namespace) -> str:
    """Who acts, for the history: --by, else $S4E_GATEWAY_USER, else the login name."""
    given = getattr(args, "by", None)
    actor = given if given is not None else os.environ.get("S4E_GATEWAY_USER") or ""
    if not actor.strip() and given is None:
        try:
            actor = getpass.getuser()
        except (OSError, KeyError):
            actor = ""
    actor = actor.strip()
    source = "--by" if given is not None else "S4E_GATEWAY_USER or the login name"
    if not actor:
        raise GatewayError(f"who is acting? {source} is empty (give --by E)")
    if _CONTROL.search(actor) or len(actor) > MAX_ACTOR:
        raise GatewayError(f"{source}: not a name or address: {actor[:60]!r}")
    return actor


def read_text_file(name: str, what: str) -> str:
    """A UTF-8 text file given on the command line ('-' is standard input)."""
    from gateway.staff import read_user_file

    if name == "-":
        return sys.stdin.read()
    try:
        return read_user_file(Path(name), f"{what} file").decode("utf-8")
    except UnicodeDecodeError:
        raise GatewayError(f"{name}: not UTF-8 text") from None


@asynccontextmanager
async def open_db(config: Config, *, migrate: bool = False) -> AsyncIterator[aiosqlite.Connection]:
    path = config.storage.database
    if not migrate and isinstance(path, Path) and not path.exists():
        raise StoreError(f"{path}: no database yet: run `s4e-gateway migrate` or start the gateway")
    conn = await store.connect(path)
    try:
        if migrate:
            await store.migrate(conn)
        else:
            await store.check_schema(conn)
        yield conn
    finally:
        await conn.close()


# --- commands ---------------------------------------------------------------------

def loop_factory_for(command: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The daemon (`serve`) runs on uvloop: intake measured faster on it
    (bench/bench_intake.py, README "Benchmarks"); every other command, the web desk
    (uvicorn) included, on asyncio's default loop."""
    if command != "serve":
        return None
    import uvloop

    return uvloop.new_event_loop


async def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from gateway.daemon import serve

    await serve(config)
    return 0


async def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    check_files(config)
    for warning in risky_settings(config):
        print(f"warning: {warning}", file=sys.stderr)
    numbers = await number_space_warning(config)
    if numbers:
        print(f"warning: {numbers}", file=sys.stderr)
    source = config.source or "built-in defaults (no config file)"
    print(f"config ok: {source}")
    return 0


async def number_space_warning(config: Config) -> str | None:
    """check-config's word on the ticket numbers (80 % used or more), when there is a
    database to ask; a warning, so the exit status stays 0."""
    from gateway.errors import expected_failure
    from gateway.number_space import read_space, warning

    if config.storage.postgres is None and not config.storage.sqlite_path.exists():
        return None  # a new installation: nothing used yet
    try:
        async with open_db(config) as conn:
            return warning(await read_space(conn, store.utcnow()))
    except Exception as err:  # noqa: BLE001 - the configuration itself is still checked
        return f"ticket numbers not checked: {expected_failure(err) or err}"


async def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    from gateway.backup import migrate_with_copy

    conn = await store.connect(config.storage.database)
    try:
        if config.storage.postgres:
            applied, copy = await store.migrate(conn), None  # pg_dump is the operator's
        else:
            applied, copy = await migrate_with_copy(conn, config.storage.sqlite_path)
        version = await store.schema_version(conn)
    finally:
        await conn.close()
    if copy is not None:
        print(f"copy of the database before migrating: {copy}")
    if applied:
        print(f"applied {', '.join(applied)}; schema version {version}")
    else:
        print(f"schema up to date (version {version})")
    return 0


async def cmd_backup(config: Config, args: argparse.Namespace) -> int:
    """A consistent copy while the daemon runs. DEST ending in .db: that file, the
    database only; otherwise a folder: DEST/gateway.db and DEST/attachments/."""
    from gateway.backup import copy_attachments, copy_database

    if config.storage.postgres:
        raise GatewayError("backup: the database is PostgreSQL: back it up with pg_dump "
                           "(or the server's own backups); attachments are inside it")
    dest = Path(args.dest)
    to_file = dest.suffix == ".db"
    db_copy = await asyncio.to_thread(copy_database, config.storage.sqlite_path,
                                      dest if to_file else dest / "gateway.db")
    print(f"database: {db_copy.path} (schema version {db_copy.schema_version}, "
          f"{db_copy.tickets} tickets, {db_copy.size / 1e6:.1f} MB)")
    if to_file or args.no_attachments:
        print(f"attachments not copied: copy {config.storage.attachments} as well "
              "(files never change: rsync -a is enough)")
        return 0
    files = await asyncio.to_thread(copy_attachments, config.storage.attachments,
                                    dest / "attachments")
    print(f"attachments: {dest / 'attachments'} ({files.copied} copied, "
          f"{files.size / 1e6:.1f} MB; {files.present} already there)")
    return 0


async def cmd_inbox_list(config: Config, args: argparse.Namespace) -> int:
    if args.outcome and args.outcome not in {o.value for o in Outcome}:
        raise GatewayError(f"unknown outcome {args.outcome!r} (one of: "
                           f"{', '.join(o.value for o in Outcome)})")
    if args.address is not None and "@" not in args.address:
        raise GatewayError(f"not an e-mail address: {args.address!r}")
    async with open_db(config) as conn:
        await print_list(
            args, lambda n: store.iter_inbound(conn, outcome=args.outcome or None,
                                               address=args.address, after=args.after,
                                               limit=n),
            as_json=store.InboundRow.as_json,
            headers=("ID", "RECEIVED", "STATE", "OUTCOME", "TICKET", "FROM (ENVELOPE)",
                     "MESSAGE-ID"),
            cells=lambda r: (r.id, local_time(config, r.received_at), r.state,
                             r.outcome or "-",
                             f"#{r.ticket:06d}" if r.ticket is not None else "-",
                             r.mail_from or "<>", r.message_id or "-"),
            empty="no messages", cursor=lambda r: r.id)
    return 0


async def cmd_inbox_show(config: Config, args: argparse.Namespace) -> int:
    from gateway.attachment_store import attachment_store
    from gateway.staff import inbound_json

    async with open_db(config) as conn:
        if args.raw:
            if await store.get_inbound(conn, args.id) is None:
                raise NotFoundError(f"inbound message {args.id} not found")
            raw = await store.read_raw(conn, args.id, attachment_store(config))
        else:
            data = await inbound_json(conn, args.id, attachment_store(config))
    if args.raw:
        _write_binary(raw, None, "--raw")
        return 0
    if args.json:
        _print_json(data)
    else:
        say(render_inbound(config, data))
    return 0


async def cmd_tickets_attachment(config: Config, args: argparse.Namespace) -> int:
    """One attachment's bytes, from wherever the attachment store keeps them."""
    from gateway.attachment_store import attachment_store
    from gateway.attachments import AttachmentMissing
    from gateway.staff import parse_number, require_ticket

    number, wanted = parse_number(args.number), args.sha256.lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", wanted):
        raise GatewayError(f"not a SHA-256 (or 8+ of its hex digits): {args.sha256!r}")
    async with open_db(config) as conn:
        await require_ticket(conn, number)
        found = sorted({a.sha256 for a in await store.ticket_attachments(conn, number)
                        if a.sha256.startswith(wanted)})
        if not found:
            raise NotFoundError(f"ticket #{number:06d} has no attachment {wanted}")
        if len(found) > 1:
            raise GatewayError(f"ticket #{number:06d}: {wanted} names {len(found)} "
                               "attachments; give more digits")
        try:
            data = await attachment_store(config).load(conn, found[0])
        except AttachmentMissing as err:
            raise StoreError(f"ticket #{number:06d}: {err}") from None
    _write_binary(data, args.output, "tickets attachment")
    if args.output:
        print(f"{args.output}: {len(data)} B", file=sys.stderr)
    return 0


def _write_binary(data: bytes, output: str | None, what: str) -> None:
    """Bytes to standard output, or to a new file `output` (never over an existing one)."""
    if output:
        try:
            with open(output, "xb") as fh:
                fh.write(data)
        except FileExistsError:
            raise GatewayError(f"{output}: exists already; not overwritten") from None
        except OSError as err:
            raise GatewayError(f"{output}: cannot write: {err.strerror}") from None
        return
    out = getattr(sys.stdout, "buffer", None)
    if out is None:
        raise GatewayError(f"{what} needs a binary standard output")
    sys.stdout.flush()
    out.write(data)
    out.flush()


def _indented(label: str, value: object, width: int = 16) -> list[str]:
    """`label: value` with the value's further lines under its first one."""
    text = "-" if value is None or value == "" else str(value)
    first, *rest = text.splitlines() or ["-"]
    return [f"  {label + ':':<{width}}{first}", *(f"  {'':<{width}}{ln}" for ln in rest)]


def render_inbound(config: Config, data: dict[str, Any]) -> str:
    """`inbox show`: envelope, verdict, outcome and answers first (why a sender got
    what they got), then headers, attachments and the text."""
    ticket = f"#{data['ticket']}" if data["ticket"] else "-"
    verdict = data["auth"] or "not checked"
    if data["auth_reason"]:
        verdict += f" ({data['auth_reason']})"
    lines = [f"Inbound message {data['id']}  {data['message_id'] or '(no Message-ID)'}",
             *_indented("Received", f"{local_time(config, data['received_at'])} from "
                                    f"{data['peer']}, {data['size']} B"),
             *_indented("Envelope from", data["mail_from"] or "<> (null reverse-path)"),
             *_indented("Envelope to", ", ".join(data["rcpt_tos"])),
             *_indented("Sender verdict", verdict),
             *_indented("State", f"{data['state']} (attempts {data['attempts']})"),
             *_indented("Outcome", f"{data['outcome'] or '- (not processed yet)'}"),
             *_indented("Ticket", ticket)]
    if data["error"]:
        lines += _indented("Error", data["error"])
    if data["held"]:
        held = data["held"]
        lines += _indented("Held", f"id {held['id']}, {held['status']}: {held['reason']}")
    lines += ["", "Answers:"]
    if data["answers"]:
        lines += ["  " + ln for ln in table(
            ("OUTBOX", "KIND", "TO", "STATUS", "QUEUED", "ERROR"),
            [(a["id"], a["kind"], a["to"], a["status"], local_time(config, a["created_at"]),
              a["last_error"] or "") for a in data["answers"]])]
    else:
        lines.append("  none")
    lines += ["", "Headers:", *(f"  {h['name']}: {h['value']}" for h in data["headers"])]
    if data["attachments"]:
        lines += ["", "Attachments:", *_attachment_lines(data["attachments"])]
    if data["notes"]:
        lines += ["", "Parser notes:", *(f"  {n}" for n in data["notes"])]
    lines += ["", "Text:", *(f"  | {ln}" for ln in (data["text"] or "").splitlines())]
    return "\n".join(lines)


def _attachment_lines(attachments: list[dict[str, Any]]) -> list[str]:
    return ["  " + ln for ln in table(
        ("FILE", "TYPE", "SIZE", "LOG"),
        [(a["filename"], a["content_type"], f"{a['size']} B", "yes" if a["is_log"] else "")
         for a in attachments])]


async def cmd_inbox_reprocess(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import reprocess

    async with open_db(config) as conn:
        row = await store.get_inbound(conn, args.id)
        if row is None:
            raise NotFoundError(f"inbound message {args.id} not found")
        result = await reprocess(conn, config, row)
    ticket = f" ticket #{result.ticket:06d}" if result.ticket is not None else ""
    print(f"inbound {args.id}: outcome {result.outcome}{ticket}")
    return 0


async def _context(conn: aiosqlite.Connection, config: Config) -> Any:
    from gateway.context import make_context

    return await make_context(conn, config)


async def cmd_tickets_list(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import parse_number, require_ticket, ticket_filter, ticket_summary

    if args.assignee is not None and "@" not in args.assignee:
        raise GatewayError(f"--assignee: not an e-mail address: {args.assignee!r}")
    search, status = ticket_filter(args.search, args.status)
    number = parse_number(args.after) if args.after is not None else None
    async with open_db(config) as conn:
        after = None
        if number is not None:
            after = await store.ticket_cursor(conn, number, waiting=args.waiting)
            if after is None:
                await require_ticket(conn, number)
                raise GatewayError(f"--after #{number:06d}: the customer no longer waits "
                                   "on that ticket; list --waiting from the start")
        await print_list(
            args, lambda n: store.iter_tickets(conn, search=search, status=status,
                                               assignee=args.assignee, waiting=args.waiting,
                                               after=after, limit=n),
            as_json=lambda t: ticket_summary(t.ticket, t.waiting_since),
            headers=("NUMBER", "STATUS", "CREATED", "ASSIGNEE", "WAITING SINCE", "REPORTER",
                     "SUBJECT"),
            cells=lambda t: (f"#{t.ticket.number:06d}", t.ticket.status,
                             local_time(config, t.ticket.created_at), t.ticket.assignee or "-",
                             local_time(config, t.waiting_since), t.ticket.reporter_email,
                             t.ticket.subject),
            empty="no tickets", cursor=lambda t: f"{t.ticket.number:06d}")
    return 0


async def cmd_tickets_show(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import parse_number, require_ticket, ticket_json

    number = parse_number(args.number)
    async with open_db(config) as conn:
        ticket = await require_ticket(conn, number)
        data = await ticket_json(conn, ticket)
        bodies = [m.body for m in await store.ticket_thread(conn, number)]
    if args.json:
        _print_json(data)
    else:
        say(render_ticket(data, bodies, config))
    return 0


_KIND_MARK = {"customer": "<-", "staff_reply": "->", "notice": "->", "staff_note": "**"}


def render_ticket(data: dict[str, Any], bodies: list[str], config: Config) -> str:
    """A readable ticket for a person: header lines, fields (further lines of a value
    indented under its first), attachments, the thread and the history; times in
    `[tickets] timezone`."""
    def when(stamp: str | None) -> str:
        return local_time(config, stamp)

    lines = [f"Ticket #{data['number']}  [{data['status']}]  {data['subject']}",
             *_indented("Created", f"{when(data['created_at'])}  (times: "
                                   f"{config.tickets.timezone})"),
             *_indented("Updated", when(data["updated_at"])),
             *_indented("Assignee", data["assignee"] or "- (staff copies go to notify)")]
    if data["linked_to"]:
        lines += _indented("Follows", f"closed ticket #{data['linked_to']}")
    labels = [("reporter_name", "Name"), ("reporter_email", "E-mail"),
              ("reporter_phone", "Phone"), ("install_address", "Address"),
              ("serial_number", "Serial number"), ("commcell_id", "CommCell ID")]
    lines.append("")
    for key, label in labels:
        lines += _indented(label, data[key])
    if data["dispatcher"]:
        lines += _indented("Dispatcher", f"{data['dispatcher']} (gets a copy of every mail)")
    if data["contact_email"]:
        lines += _indented("Contact", f"{data['contact_email']} (named in the report; "
                                      "never mailed)")
    if data["missing"]:
        lines += _indented("Missing", ", ".join(data["missing"]))
    if data["phone_confirmation_required"]:
        state = "confirmed" if data["phone_confirmed"] else "NOT YET CONFIRMED"
        lines += _indented("Phone call", f"required (contract under 24 h), {state}")
    if data["rating"] is not None:
        lines += _indented("Rating", f"{data['rating']}/5")
    if data["reporter_bounced"]:
        lines += _indented("Warning", "mail to the reporter bounced")
    lines += _indented("Description", data["description"])
    if data["attachments"]:
        lines += ["", "Attachments:", *_attachment_lines(data["attachments"])]
    lines += ["", "Thread:"]
    for message, body in zip(data["messages"], bodies, strict=False):
        mark = _KIND_MARK.get(message["kind"], "--")
        verdict = f"  [sender verdict: {message['auth']}]" if message["auth"] else ""
        to = f" -> {', '.join(message['to'])}" if message["to"] else ""
        lines.append(f"  {mark} {when(message['date'])}  {message['kind']}  "
                     f"{message['from']}{to}{verdict}")
        lines.append(f"     {message['subject']}")
        for ln in body.strip().splitlines()[:40]:
            lines.append(f"     | {ln}")
    lines += ["", "History:"]
    lines += ["  " + ln for ln in table(
        ("AT", "FROM", "TO", "BY", "NOTE"),
        [(when(h["at"]), h["from"] or "-", h["to"], h["actor"], h["note"] or "")
         for h in data["history"]])]
    return "\n".join(lines)


async def cmd_tickets_set_status(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import parse_number, set_status

    number = parse_number(args.number)
    actor = actor_of(args)
    async with open_db(config) as conn:
        ticket = await set_status(conn, await _context(conn, config), number, args.status,
                                  args.note, actor=actor)
    print(f"#{ticket.number:06d}: {ticket.status}; the reporter is notified")
    return 0


async def cmd_tickets_reply(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import parse_number, read_attachment, reply

    number = parse_number(args.number)
    actor = actor_of(args)
    files = [read_attachment(Path(p)) for p in args.attach]
    message = read_text_file(args.message_file, "message")
    async with open_db(config) as conn:
        await reply(conn, await _context(conn, config), number, message, files, actor=actor)
    print(f"#{number:06d}: reply queued to the reporter")
    return 0


async def cmd_tickets_note(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import add_note, parse_number

    number = parse_number(args.number)
    actor = actor_of(args)
    text = read_text_file(args.message_file, "note")
    if not text.strip():
        raise GatewayError(f"{args.message_file}: the note is empty")
    async with open_db(config) as conn:
        await add_note(conn, await _context(conn, config), number, text, actor=actor)
    print(f"#{number:06d}: internal note recorded (not sent to anyone)")
    return 0


async def cmd_tickets_assign(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import assign, parse_number

    number = parse_number(args.number)
    actor = actor_of(args)
    async with open_db(config) as conn:
        ticket = await assign(conn, await _context(conn, config), number, args.engineer,
                              actor=actor)
    print(f"#{number:06d}: assigned to {ticket.assignee}")
    return 0


async def cmd_tickets_set_field(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import parse_number, set_field

    number = parse_number(args.number)
    actor = actor_of(args)
    async with open_db(config) as conn:
        before = await store.get_ticket(conn, number)
        ticket = await set_field(conn, await _context(conn, config), number, args.field,
                                 args.value, actor=actor)
    name = args.field.strip().lower().replace("-", "_")
    say(f"#{number:06d}: {name} = {getattr(ticket, name) or '(empty)'}")
    if ticket.missing:
        print(f"still missing: {', '.join(ticket.missing)}")
    elif before is not None and before.missing and ticket.status == Status.AWAITING_INFO:
        print(f"report complete: `tickets set-status {number:06d} accepted` sends the "
              "acknowledgement")
    return 0


async def cmd_tickets_confirm_phone(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import confirm_phone, parse_number

    number = parse_number(args.number)
    actor = actor_of(args)
    async with open_db(config) as conn:
        await confirm_phone(conn, await _context(conn, config), number, actor=actor)
    print(f"#{number:06d}: phone confirmation recorded")
    return 0


async def cmd_held_list(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import held_json

    status = None if args.all else HeldStatus.HELD
    async with open_db(config) as conn:
        await print_list(
            args, lambda n: store.iter_held(conn, status, after=args.after, limit=n),
            as_json=held_json,
            headers=("ID", "STATUS", "HELD AT", "TICKET", "FROM", "SUBJECT", "REASON"),
            cells=lambda r: (r.id, r.status, local_time(config, r.created_at),
                             f"#{r.ticket:06d}" if r.ticket is not None else "-", r.sender,
                             r.subject, r.reason),
            empty="no held messages", cursor=lambda r: r.id)
    return 0


async def cmd_held_show(config: Config, args: argparse.Namespace) -> int:
    from gateway.attachment_store import attachment_store
    from gateway.staff import held_json, inbound_json, require_held

    async with open_db(config) as conn:
        held = held_json(await require_held(conn, args.id))
        held["message"] = await inbound_json(conn, held["inbound_id"],
                                             attachment_store(config))
    if args.json:
        _print_json(held)
        return 0
    decided = (f" by {held['decided_by'] or '-'} at {local_time(config, held['decided_at'])}"
               if held["decided_at"] else "")
    lines = [f"Held message {held['id']}  [{held['status']}]{decided}",
             *_indented("Held at", local_time(config, held["created_at"])),
             *_indented("Reason", held["reason"]),
             *_indented("Named ticket", f"#{held['ticket']}" if held["ticket"] else "-"),
             "", render_inbound(config, held["message"])]
    say("\n".join(lines))
    return 0


async def cmd_held_release(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import release_held

    actor = actor_of(args)
    async with open_db(config) as conn:
        result = await release_held(conn, await _context(conn, config), args.id,
                                    new_ticket=args.new_ticket, actor=actor)
    if args.new_ticket:
        print(f"held {args.id}: released as a new ticket #{result.ticket:06d}")
    else:
        print(f"held {args.id}: released into ticket #{result.ticket:06d}")
    return 0


async def cmd_held_drop(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import drop_held

    actor = actor_of(args)
    async with open_db(config) as conn:
        await drop_held(conn, args.id, store.utcnow(), actor=actor)
    print(f"held {args.id}: dropped (the message stays stored in the inbox)")
    return 0


async def cmd_outbox_list(config: Config, args: argparse.Namespace) -> int:
    statuses = tuple(OutboxStatus)
    if args.status and args.status not in statuses:
        raise GatewayError(f"unknown status {args.status!r} (one of: {', '.join(statuses)})")
    status = OutboxStatus(args.status) if args.status else None
    async with open_db(config) as conn:
        await print_list(
            args, lambda n: store.iter_outbox(conn, status, after=args.after, limit=n),
            as_json=store.OutboxRow.as_json,
            headers=("ID", "STATUS", "QUEUED", "TICKET", "KIND", "TO", "TRIES", "ERROR"),
            cells=lambda r: (r.id, r.status, local_time(config, r.created_at),
                             f"#{r.ticket:06d}" if r.ticket is not None else "-", r.kind,
                             r.rcpt_to, r.attempts,
                             r.last_error if r.last_error and r.status is not OutboxStatus.SENT
                             else ""),
            empty="no outgoing mail", cursor=lambda r: r.id)
    return 0


async def cmd_outbox_retry(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import retry_mail

    async with open_db(config) as conn:
        await retry_mail(conn, args.id, store.utcnow())
    print(f"outbox {args.id}: queued again (the running gateway sends it)")
    return 0


async def cmd_contracts_import(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import import_contracts, read_contracts

    contracts = read_contracts(Path(args.file))
    async with open_db(config) as conn:
        count = await import_contracts(conn, contracts, store.utcnow())
    urgent = sum(1 for c in contracts if c.repair_hours < 24)
    noun = "contract" if count == 1 else "contracts"
    print(f"imported {count} {noun} ({urgent} with repair time under 24 h)")
    return 0


async def cmd_contracts_list(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import contract_json

    async with open_db(config) as conn:
        rows = [contract_json(r) for r in await store.list_contracts(conn)]
    if args.json:
        _print_json(rows)
        return 0
    print_table(("DEVICE", "CUSTOMER", "REPAIR HOURS", "IMPORTED"),
                [(r["device_id"], r["customer"], r["repair_hours"],
                  local_time(config, r["imported_at"])) for r in rows], "no contracts")
    return 0


# --- argument parsing -------------------------------------------------------------

def _add_config(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    # On subparsers SUPPRESS keeps a --config given before the subcommand.
    parser.add_argument("--config", metavar="F", help="configuration file (TOML)",
                        default=None if top else argparse.SUPPRESS)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit 1, like every other user error."""

    def error(self, message: str) -> Any:
        self.exit(1, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="s4e-gateway", description="S4E service desk e-mail gateway")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_config(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(parent: Any, name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_text, description=help_text)
        _add_config(sub)
        sub.set_defaults(func=func)
        return sub

    command(commands, "serve", cmd_serve, "run the daemon")
    command(commands, "check-config", cmd_check_config, "check the configuration")
    command(commands, "migrate", cmd_migrate,
            "create or upgrade the database (a copy of it is taken first)")
    sub = command(commands, "backup", cmd_backup,
                  "a consistent copy of the database (and attachments) while it runs")
    sub.add_argument("dest", metavar="DEST",
                     help="a folder (gets gateway.db and attachments/) or a file ending in .db")
    sub.add_argument("--no-attachments", action="store_true",
                     help="copy only the database")

    def by(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--by", metavar="E", help="who acts, for the history (default: "
                         "$S4E_GATEWAY_USER, else the login name)")
        return sub

    inbox = commands.add_parser("inbox", help="messages received")
    inbox_cmds = inbox.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    sub = command(inbox_cmds, "list", cmd_inbox_list, "list received messages, oldest first")
    sub.add_argument("--outcome", help="only messages with this outcome")
    sub.add_argument("--address", metavar="A", help="only messages from or to this address "
                     "(envelope sender, a recipient or the From header)")
    sub.add_argument("--json", action="store_true", help="print JSON")
    add_paging(sub)
    sub = command(inbox_cmds, "show", cmd_inbox_show,
                  "one received message: envelope, verdict, outcome, answers, headers, text")
    sub.add_argument("id", type=int, help="inbound message id (see inbox list)")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.add_argument("--raw", action="store_true",
                     help="write the stored message (.eml bytes) to standard output")
    sub = command(inbox_cmds, "reprocess", cmd_inbox_reprocess,
                  "run a stored message through the stages again")
    sub.add_argument("id", type=int, help="inbound message id (see inbox list)")

    tickets = commands.add_parser("tickets", help="work tickets")
    ticket_cmds = tickets.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    sub = command(ticket_cmds, "list", cmd_tickets_list, "list tickets, oldest first")
    sub.add_argument("--status", help="only tickets in this status")
    sub.add_argument("--search", metavar="TEXT", help="words, a serial number or a "
                     "\"phrase\" in the subject, the fields or the messages")
    sub.add_argument("--waiting", action="store_true",
                     help="only tickets whose customer waits for an answer, longest first")
    sub.add_argument("--assignee", metavar="E", help="only tickets assigned to E")
    sub.add_argument("--json", action="store_true", help="print JSON")
    add_paging(sub, "NUMBER", str)
    sub = command(ticket_cmds, "show", cmd_tickets_show, "show one ticket and its thread")
    sub.add_argument("number", help="six-digit ticket number")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = command(ticket_cmds, "attachment", cmd_tickets_attachment,
                  "write one attachment's bytes to standard output or a file")
    sub.add_argument("number", help="six-digit ticket number")
    sub.add_argument("sha256", help="the attachment's SHA-256 (tickets show --json), "
                     "or its first 8 or more hex digits")
    sub.add_argument("--output", "-o", metavar="F", help="write to F instead of standard output")
    sub = by(command(ticket_cmds, "set-status", cmd_tickets_set_status,
                     "change a ticket's status and notify the reporter"))
    sub.add_argument("number", help="six-digit ticket number")
    sub.add_argument("status", help="accepted, in_progress, resolved or closed")
    sub.add_argument("--note", help="text for the reporter, included in the notice")
    sub = by(command(ticket_cmds, "reply", cmd_tickets_reply,
                     "send an engineer's message to the reporter in the thread"))
    sub.add_argument("number", help="six-digit ticket number")
    sub.add_argument("--message-file", required=True, metavar="F",
                     help="UTF-8 text of the message ('-' reads standard input)")
    sub.add_argument("--attach", action="append", default=[], metavar="F",
                     help="a file to attach (repeatable)")
    sub = by(command(ticket_cmds, "note", cmd_tickets_note,
                     "record an internal note: never sent to the customer"))
    sub.add_argument("number", help="six-digit ticket number")
    sub.add_argument("--message-file", required=True, metavar="F",
                     help="UTF-8 text of the note ('-' reads standard input)")
    sub = by(command(ticket_cmds, "assign", cmd_tickets_assign,
                     "assign a ticket to an engineer (staff copies go there)"))
    sub.add_argument("number", help="six-digit ticket number")
    sub.add_argument("engineer", help="a staff e-mail address")
    sub = by(command(ticket_cmds, "set-field", cmd_tickets_set_field,
                     "correct a report field (an empty VALUE clears it); nothing is sent"))
    sub.add_argument("number", help="six-digit ticket number")
    sub.add_argument("field", help="reporter_name, reporter_email, reporter_phone, "
                     "install_address, description, serial_number or commcell_id")
    sub.add_argument("value")
    sub = by(command(ticket_cmds, "confirm-phone", cmd_tickets_confirm_phone,
                     "record the confirming phone call"))
    sub.add_argument("number", help="six-digit ticket number")

    held = commands.add_parser("held", help="messages held for operators")
    held_cmds = held.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    sub = command(held_cmds, "list", cmd_held_list, "list held messages")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.add_argument("--all", action="store_true", help="also released and dropped ones")
    add_paging(sub)
    sub = command(held_cmds, "show", cmd_held_show, "one held message and why it is held")
    sub.add_argument("id", type=int)
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = by(command(held_cmds, "release", cmd_held_release,
                     "append a held message to the ticket it named"))
    sub.add_argument("id", type=int)
    sub.add_argument("--new-ticket", action="store_true",
                     help="open a new ticket from it instead (a report sent to crm@ by mistake)")
    sub = by(command(held_cmds, "drop", cmd_held_drop, "leave a held message out for good"))
    sub.add_argument("id", type=int)

    outbox = commands.add_parser("outbox", help="outgoing mail")
    outbox_cmds = outbox.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    sub = command(outbox_cmds, "list", cmd_outbox_list, "list outgoing mail")
    sub.add_argument("--status", help="pending, sending, sent, failed or bounced")
    sub.add_argument("--json", action="store_true", help="print JSON")
    add_paging(sub)
    sub = command(outbox_cmds, "retry", cmd_outbox_retry, "send a failed mail again")
    sub.add_argument("id", type=int)

    contracts = commands.add_parser("contracts", help="service contracts")
    contract_cmds = contracts.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    sub = command(contract_cmds, "import", cmd_contracts_import,
                  "replace the contracts with a CSV file (device_id,customer,repair_hours)")
    sub.add_argument("file")
    sub = command(contract_cmds, "list", cmd_contracts_list, "list the service contracts")
    sub.add_argument("--json", action="store_true", help="print JSON")
    add_web_commands(commands, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    daemon = args.command in ("serve", "web")
    setup_logging(logging.INFO if daemon else logging.WARNING)
    # A daemon's own last words go to the journal too: with their priority.
    mark = "<3>" if daemon else ""
    try:
        config = load_config(config_path_from(args.config))
        with asyncio.Runner(loop_factory=loop_factory_for(args.command)) as runner:
            return runner.run(args.func(config, args))
    except ConfigError as err:
        print(f"{mark}s4e-gateway: configuration error: {err}", file=sys.stderr)
        # serve, web and check-config: EX_CONFIG, so systemd does not restart for ever.
        return EX_CONFIG if args.command in ("serve", "web", "check-config") else 1
    except GatewayError as err:
        print(f"{mark}s4e-gateway: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `... | head`: the reader left; not an error of ours (and no second error
        # when Python flushes stdout at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        print(f"{mark}s4e-gateway: error: {err.strerror or err}"
              f"{': ' + str(err.filename) if err.filename else ''}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - one line, never a traceback, for users
        log.debug("unexpected error", exc_info=True)
        print(f"{mark}s4e-gateway: internal error: {type(err).__name__}: {err}",
              file=sys.stderr)
        return 1


# --- the web desk and its users (SPEC §11) ------------------------------------------------

async def cmd_web(config: Config, args: argparse.Namespace) -> int:
    from gateway.web.server import serve_web

    await serve_web(config)
    return 0


def _read_new_password(path: str | None) -> str:
    import getpass

    if path == "-":
        return sys.stdin.readline().rstrip("\r\n")
    if path:
        try:
            return Path(path).read_text("utf-8").rstrip("\r\n")
        except FileNotFoundError:
            raise GatewayError(f"{path}: password file not found") from None
        except UnicodeDecodeError:
            raise GatewayError(f"{path}: not UTF-8 text") from None
    if not sys.stdin.isatty():
        raise GatewayError("no terminal to ask for the password: use --password-file F")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != first:
        raise GatewayError("the passwords differ")
    return first


async def cmd_users_add(config: Config, args: argparse.Namespace) -> int:
    from gateway.web import accounts

    name = accounts.check_user_name(args.name)
    email = accounts.check_email(args.email, config.addresses.staff_domains)
    password_hash = await asyncio.to_thread(accounts.hash_password,
                                            _read_new_password(args.password_file))
    async with open_db(config) as conn:
        await accounts.add_user(conn, name, email, password_hash, store.utcnow())
    print(f"user {name} added ({email}); they sign in to the web desk")
    return 0


async def cmd_users_list(config: Config, args: argparse.Namespace) -> int:
    from gateway.web import accounts

    async with open_db(config) as conn:
        users = await accounts.list_users(conn)
    if args.json:
        _print_json([{"name": u.name, "email": u.email, "created_at": u.created_at}
                     for u in users])
        return 0
    if not users:
        print("no users")
    for u in users:
        say(f"{u.name:<20} {u.email:<30} {u.created_at[:16]}")
    return 0


async def cmd_users_remove(config: Config, args: argparse.Namespace) -> int:
    from gateway.web import accounts

    async with open_db(config) as conn:
        ended = await accounts.remove_user(conn, args.name)
    print(f"user {args.name} removed ({ended} signed-in session(s) ended)")
    return 0


def add_web_commands(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    command(commands, "web", cmd_web, "run the engineers' web desk")
    users = commands.add_parser("users", help="who may sign in to the web desk")
    user_cmds = users.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    sub = command(user_cmds, "add", cmd_users_add, "add a web desk user")
    sub.add_argument("name", help="user name to sign in with")
    sub.add_argument("--email", required=True, metavar="E",
                     help="the engineer's staff address (recorded as who acted)")
    sub.add_argument("--password-file", metavar="F",
                     help="a file holding only the password ('-' reads standard input); "
                          "without it the password is asked for")
    sub = command(user_cmds, "list", cmd_users_list, "list web desk users")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = command(user_cmds, "remove", cmd_users_remove,
                  "remove a web desk user and end their sessions")
    sub.add_argument("name")
