"""Command line: `s4e-gateway COMMAND ...`; exit 0 on success, 1 with one line on error.

`--config F` is accepted before or after the subcommand; without it
$S4E_GATEWAY_CONFIG names the file; without either the built-in defaults apply.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import aiosqlite

from gateway import __version__, store
from gateway.config import Config, check_files, config_path_from, load_config, risky_settings
from gateway.errors import GatewayError, NotFoundError, StoreError
from gateway.model import Outcome, Status

log = logging.getLogger("gateway")

Command = Callable[[Config, argparse.Namespace], Awaitable[int]]


class _EscapingFormatter(logging.Formatter):
    """One line per event: CR/LF in logged values are escaped, never new lines."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        head, sep, rest = text.partition("\nTraceback")
        escaped = head.replace("\r", "\\r").replace("\n", "\\n")
        return escaped + (sep + rest if sep else "")


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EscapingFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command at INFO: too much for a journal.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: object) -> str:
    """Customer text for a terminal: control characters (escape sequences that could
    retitle or rewrite an operator's terminal) shown as U+FFFD."""
    return _CONTROL.sub("\ufffd", str(text))


def say(text: str = "") -> None:
    print(printable(text))


@asynccontextmanager
async def open_db(config: Config, *, migrate: bool = False) -> AsyncIterator[aiosqlite.Connection]:
    path = config.storage.database
    if not migrate and not path.exists():
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

async def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from gateway.daemon import serve

    await serve(config)
    return 0


async def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    check_files(config)
    for warning in risky_settings(config):
        print(f"warning: {warning}", file=sys.stderr)
    source = config.source or "built-in defaults (no config file)"
    print(f"config ok: {source}")
    return 0


async def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    conn = await store.connect(config.storage.database)
    try:
        applied = await store.migrate(conn)
        version = await store.schema_version(conn)
    finally:
        await conn.close()
    if applied:
        print(f"applied {', '.join(applied)}; schema version {version}")
    else:
        print(f"schema up to date (version {version})")
    return 0


async def cmd_inbox_list(config: Config, args: argparse.Namespace) -> int:
    if args.outcome and args.outcome not in {o.value for o in Outcome}:
        raise GatewayError(f"unknown outcome {args.outcome!r} (one of: "
                           f"{', '.join(o.value for o in Outcome)})")
    async with open_db(config) as conn:
        rows = await store.list_inbound(conn, outcome=args.outcome)
    if args.json:
        _print_json([r.as_json() for r in rows])
        return 0
    if not rows:
        print("no messages")
    for r in rows:
        ticket = f"#{r.ticket:06d}" if r.ticket is not None else "-"
        say(f"{r.id:>6}  {r.received_at[:19]}  {r.state:<10} {r.outcome or '-':<17} "
            f"{ticket:<8} {r.mail_from or '<>'}  {r.message_id}")
    return 0


async def cmd_inbox_reprocess(config: Config, args: argparse.Namespace) -> int:
    from gateway.pipeline import reprocess

    async with open_db(config) as conn:
        row = await store.get_inbound(conn, args.id)
        if row is None:
            raise NotFoundError(f"inbound message {args.id} not found")
        result = await reprocess(conn, config, row)
    ticket = f" ticket #{result.ticket:06d}" if result.ticket is not None else ""
    print(f"inbound {args.id}: outcome {result.outcome}{ticket}")
    return 0


async def _context(conn: aiosqlite.Connection, config: Config) -> Any:
    from gateway.pipeline import make_context

    return await make_context(conn, config)


async def cmd_tickets_list(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import ticket_summary

    if args.status and args.status not in {s.value for s in Status}:
        raise GatewayError(f"unknown status {args.status!r} (one of: "
                           f"{', '.join(s.value for s in Status)})")
    async with open_db(config) as conn:
        tickets = await store.list_tickets(conn, args.status)
    if args.json:
        _print_json([ticket_summary(t) for t in tickets])
        return 0
    if not tickets:
        print("no tickets")
    for t in tickets:
        say(f"#{t.number:06d}  {t.status:<13} {t.created_at[:16]}  {t.reporter_email}  {t.subject}")
    return 0


async def cmd_tickets_show(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import parse_number, require_ticket, ticket_json

    number = parse_number(args.number)
    async with open_db(config) as conn:
        ticket = await require_ticket(conn, number)
        data = await ticket_json(conn, ticket)
        bodies = [m["body"] for m in await store.ticket_messages(conn, number)]
    if args.json:
        _print_json(data)
    else:
        say(render_ticket(data, bodies))
    return 0


def render_ticket(data: dict[str, Any], bodies: list[str]) -> str:
    """A readable thread for a person."""
    lines = [f"Ticket #{data['number']}  [{data['status']}]  {data['subject']}",
             f"created {data['created_at']}  updated {data['updated_at']}"]
    if data["linked_to"]:
        lines.append(f"follows closed ticket #{data['linked_to']}")
    labels = [("reporter_name", "Name"), ("reporter_email", "E-mail"),
              ("reporter_phone", "Phone"), ("install_address", "Address"),
              ("serial_number", "Serial number"), ("commcell_id", "CommCell ID")]
    lines.append("")
    for key, label in labels:
        lines.append(f"  {label + ':':<15}{data[key] or '-'}")
    if data["missing"]:
        lines.append(f"  {'Missing:':<15}{', '.join(data['missing'])}")
    if data["phone_confirmation_required"]:
        state = "confirmed" if data["phone_confirmed"] else "NOT YET CONFIRMED"
        lines.append(f"  {'Phone call:':<15}required (contract under 24 h), {state}")
    if data["rating"] is not None:
        lines.append(f"  {'Rating:':<15}{data['rating']}/5")
    if data["reporter_bounced"]:
        lines.append(f"  {'Warning:':<15}mail to the reporter bounced")
    lines += ["", "Description:", *(f"  {ln}" for ln in (data["description"] or "-").splitlines())]
    if data["attachments"]:
        lines += ["", "Attachments:"]
        for a in data["attachments"]:
            log_mark = " (log)" if a["is_log"] else ""
            lines.append(f"  {a['filename']}  {a['content_type']}  {a['size']} B{log_mark}")
    lines += ["", "Thread:"]
    for message, body in zip(data["messages"], bodies):
        arrow = "<-" if message["direction"] == "in" else "->"
        lines.append(f"  {arrow} {message['date'][:16]}  {message['from']} -> "
                     f"{', '.join(message['to'])}")
        lines.append(f"     {message['subject']}")
        for ln in body.strip().splitlines()[:40]:
            lines.append(f"     | {ln}")
    lines += ["", "History:"]
    for h in data["history"]:
        note = f"  ({h['note']})" if h["note"] else ""
        lines.append(f"  {h['at'][:16]}  {h['from'] or '-'} -> {h['to']}  by {h['actor']}{note}")
    return "\n".join(lines)


async def cmd_tickets_set_status(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import parse_number, set_status

    number = parse_number(args.number)
    async with open_db(config) as conn:
        ticket = await set_status(conn, await _context(conn, config), number, args.status,
                                  args.note)
    print(f"#{ticket.number:06d}: {ticket.status}; the reporter is notified")
    return 0


async def cmd_tickets_reply(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import parse_number, read_attachment, reply

    number = parse_number(args.number)
    files = [read_attachment(Path(p)) for p in args.attach]
    path = Path(args.message_file)
    try:
        message = sys.stdin.read() if args.message_file == "-" else path.read_text("utf-8")
    except FileNotFoundError:
        raise GatewayError(f"{path}: message file not found") from None
    except UnicodeDecodeError:
        raise GatewayError(f"{path}: not UTF-8 text") from None
    async with open_db(config) as conn:
        await reply(conn, await _context(conn, config), number, message, files)
    print(f"#{number:06d}: reply queued to the reporter")
    return 0


async def cmd_tickets_confirm_phone(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import confirm_phone, parse_number

    number = parse_number(args.number)
    async with open_db(config) as conn:
        await confirm_phone(conn, await _context(conn, config), number)
    print(f"#{number:06d}: phone confirmation recorded")
    return 0


async def cmd_held_list(config: Config, args: argparse.Namespace) -> int:
    from gateway.staff import held_json

    async with open_db(config) as conn:
        rows = [held_json(r) for r in await store.list_held(conn, None if args.all else "held")]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no held messages")
    for r in rows:
        ticket = f"#{r['ticket']}" if r["ticket"] else "-"
        say(f"{r['id']:>5}  {r['status']:<9} {ticket:<8} {r['from']}  {r['subject']}  ({r['reason']})")
    return 0


async def cmd_held_release(config: Config, args: argparse.Namespace) -> int:
    from gateway.pipeline import release_held

    async with open_db(config) as conn:
        result = await release_held(conn, await _context(conn, config), args.id)
    print(f"held {args.id}: released into ticket #{result.ticket:06d}")
    return 0


async def cmd_held_drop(config: Config, args: argparse.Namespace) -> int:
    async with open_db(config) as conn:
        held = await store.get_held(conn, args.id)
        if held is None:
            raise NotFoundError(f"held message {args.id} not found")
        if not await store.decide_held(conn, args.id, "dropped", store.utcnow()):
            raise GatewayError(f"held message {args.id} was already {held['status']}")
    print(f"held {args.id}: dropped (the message stays stored in the inbox)")
    return 0


async def cmd_outbox_list(config: Config, args: argparse.Namespace) -> int:
    statuses = ("pending", "sending", "sent", "failed", "bounced")
    if args.status and args.status not in statuses:
        raise GatewayError(f"unknown status {args.status!r} (one of: {', '.join(statuses)})")
    async with open_db(config) as conn:
        rows = await store.list_outbox(conn, args.status)
    if args.json:
        _print_json([r.as_json() for r in rows])
        return 0
    if not rows:
        print("no outgoing mail")
    for r in rows:
        ticket = f"#{r.ticket:06d}" if r.ticket is not None else "-"
        error = f"  ({r.last_error})" if r.last_error and r.status != "sent" else ""
        say(f"{r.id:>5}  {r.status:<8} {ticket:<8} {r.kind:<24} {r.rcpt_to}  "
            f"tries {r.attempts}{error}")
    return 0


async def cmd_outbox_retry(config: Config, args: argparse.Namespace) -> int:
    async with open_db(config) as conn:
        row = await store.get_outbox(conn, args.id)
        if row is None:
            raise NotFoundError(f"outbox message {args.id} not found")
        if not await store.retry_outbox(conn, args.id, store.utcnow()):
            raise GatewayError(f"outbox message {args.id} is {row.status}: only failed or "
                               "bounced mail can be retried")
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
    command(commands, "migrate", cmd_migrate, "create or upgrade the database")

    inbox = commands.add_parser("inbox", help="messages received")
    inbox_cmds = inbox.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    sub = command(inbox_cmds, "list", cmd_inbox_list, "list received messages, oldest first")
    sub.add_argument("--outcome", help="only messages with this outcome")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = command(inbox_cmds, "reprocess", cmd_inbox_reprocess,
                  "run a stored message through the stages again")
    sub.add_argument("id", type=int, help="inbound message id (see inbox list)")

    tickets = commands.add_parser("tickets", help="work tickets")
    ticket_cmds = tickets.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    sub = command(ticket_cmds, "list", cmd_tickets_list, "list tickets, oldest first")
    sub.add_argument("--status", help="only tickets in this status")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = command(ticket_cmds, "show", cmd_tickets_show, "show one ticket and its thread")
    sub.add_argument("number", help="six-digit ticket number")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = command(ticket_cmds, "set-status", cmd_tickets_set_status,
                  "change a ticket's status and notify the reporter")
    sub.add_argument("number", help="six-digit ticket number")
    sub.add_argument("status", help="accepted, in_progress, resolved or closed")
    sub.add_argument("--note", help="text for the reporter, included in the notice")
    sub = command(ticket_cmds, "reply", cmd_tickets_reply,
                  "send an engineer's message to the reporter in the thread")
    sub.add_argument("number", help="six-digit ticket number")
    sub.add_argument("--message-file", required=True, metavar="F",
                     help="UTF-8 text of the message ('-' reads standard input)")
    sub.add_argument("--attach", action="append", default=[], metavar="F",
                     help="a file to attach (repeatable)")
    sub = command(ticket_cmds, "confirm-phone", cmd_tickets_confirm_phone,
                  "record the confirming phone call")
    sub.add_argument("number", help="six-digit ticket number")

    held = commands.add_parser("held", help="messages held for operators")
    held_cmds = held.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    sub = command(held_cmds, "list", cmd_held_list, "list held messages")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.add_argument("--all", action="store_true", help="also released and dropped ones")
    sub = command(held_cmds, "release", cmd_held_release,
                  "append a held message to the ticket it named")
    sub.add_argument("id", type=int)
    sub = command(held_cmds, "drop", cmd_held_drop, "leave a held message out for good")
    sub.add_argument("id", type=int)

    outbox = commands.add_parser("outbox", help="outgoing mail")
    outbox_cmds = outbox.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    sub = command(outbox_cmds, "list", cmd_outbox_list, "list outgoing mail")
    sub.add_argument("--status", help="pending, sending, sent, failed or bounced")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = command(outbox_cmds, "retry", cmd_outbox_retry, "send a failed mail again")
    sub.add_argument("id", type=int)

    contracts = commands.add_parser("contracts", help="service contracts")
    contract_cmds = contracts.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    sub = command(contract_cmds, "import", cmd_contracts_import,
                  "replace the contracts with a CSV file (device_id,customer,repair_hours)")
    sub.add_argument("file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.INFO if args.command == "serve" else logging.WARNING)
    try:
        config = load_config(config_path_from(args.config))
        return asyncio.run(args.func(config, args))
    except GatewayError as err:
        print(f"s4e-gateway: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `... | head`: the reader left; not an error of ours (and no second error
        # when Python flushes stdout at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        print(f"s4e-gateway: error: {err.strerror or err}"
              f"{': ' + str(err.filename) if err.filename else ''}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - one line, never a traceback, for users
        log.debug("unexpected error", exc_info=True)
        print(f"s4e-gateway: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
