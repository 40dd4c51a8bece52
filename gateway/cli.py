"""Command line: `s4e-gateway COMMAND ...`; exit 0 on success, 1 with one line on error.

`--config F` is accepted before or after the subcommand; without it
$S4E_GATEWAY_CONFIG names the file; without either the built-in defaults apply.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import aiosqlite

from gateway import __version__, store
from gateway.config import Config, config_path_from, load_config, risky_settings
from gateway.errors import GatewayError, StoreError

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
    async with open_db(config) as conn:
        rows = await store.list_inbound(conn, outcome=args.outcome)
    if args.json:
        _print_json([r.as_json() for r in rows])
        return 0
    if not rows:
        print("no messages")
    for r in rows:
        ticket = f"#{r.ticket:06d}" if r.ticket is not None else "-"
        print(f"{r.id:>6}  {r.received_at[:19]}  {r.state:<10} {r.outcome or '-':<17} "
              f"{ticket:<8} {r.mail_from or '<>'}  {r.message_id}")
    return 0


async def cmd_inbox_reprocess(config: Config, args: argparse.Namespace) -> int:
    async with open_db(config) as conn:
        row = await store.get_inbound(conn, args.id)
        if row is None:
            raise GatewayError(f"inbound message {args.id} not found")
        from gateway.pipeline import reprocess

        result = await reprocess(conn, config, row)
    ticket = f" ticket #{result.ticket:06d}" if result.ticket is not None else ""
    print(f"inbound {args.id}: outcome {result.outcome}{ticket}")
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
    except OSError as err:
        print(f"s4e-gateway: error: {err.strerror or err}"
              f"{': ' + str(err.filename) if err.filename else ''}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - one line, never a traceback, for users
        log.debug("unexpected error", exc_info=True)
        print(f"s4e-gateway: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
