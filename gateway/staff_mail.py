"""An engineer's mail to crm@ read as the desk reads it (SPEC §9). Pure.

    #wewnętrzne                 <- first line: the whole mail is an internal note
    Status: resolved            <- leading command lines, removed from the text
    Assign: anna.nowak@s4e.pl
    Dzień dobry, wymieniliśmy dysk...   <- the text that goes to the customer

The quoted history is already gone: the parser's `Report.text` is the new text only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.model import TRANSITIONS, Status

INTERNAL_MARKERS = frozenset({"#wewnętrzne", "#wewnetrzne", "#internal"})
# "Status: resolved", "Assign: a@s4e.pl"; also the Polish words engineers may type.
_COMMAND = re.compile(r"^\s*(status|assign|przypisz)\s*:\s*(.*?)\s*$", re.IGNORECASE)
_COMMAND_NAMES = {"status": "status", "assign": "assign", "przypisz": "assign"}


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # "status" | "assign"
    value: str
    line: str  # as written, for the notice when it is refused


@dataclass(frozen=True, slots=True)
class ParsedStaffMail:
    internal: bool
    commands: tuple[Command, ...]
    text: str  # what remains for the customer (or the note), stripped


def parse_staff_mail(text: str) -> ParsedStaffMail:
    lines = text.replace("\r\n", "\n").split("\n")
    i = _skip_blank(lines, 0)
    internal = False
    if i < len(lines) and lines[i].strip().casefold() in INTERNAL_MARKERS:
        internal = True
        i = _skip_blank(lines, i + 1)
    commands: list[Command] = []
    while i < len(lines):
        match = _COMMAND.match(lines[i])
        if not match:
            break
        commands.append(Command(_COMMAND_NAMES[match.group(1).lower()], match.group(2),
                                lines[i].strip()))
        i = _skip_blank(lines, i + 1)
    return ParsedStaffMail(internal, tuple(commands), "\n".join(lines[i:]).strip())


def _skip_blank(lines: list[str], i: int) -> int:
    while i < len(lines) and not lines[i].strip():
        i += 1
    return i


def engineer_problem(address: str, staff_domains: tuple[str, ...]) -> str:
    """Why `address` cannot be an assignee ("" when it can): a staff e-mail address."""
    local, at, domain = address.strip().lower().rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in address.strip()):
        return f"not an e-mail address: {address!r}"
    if domain not in staff_domains:
        return (f"{address!r} is not a staff address (staff domains: "
                f"{', '.join(staff_domains)})")
    return ""


def command_problem(commands: tuple[Command, ...], status: Status,
                    staff_domains: tuple[str, ...]) -> str:
    """Why the commands cannot all be applied, in order, to a ticket in `status` ("" when
    they can): nothing is applied unless every one is valid."""
    for command in commands:
        if command.name == "status":
            try:
                target = Status(command.value.strip().lower())
            except ValueError:
                return (f"{command.line}: unknown status {command.value!r} (one of: "
                        f"{', '.join(s.value for s in Status)})")
            if target not in TRANSITIONS[status]:
                allowed = ", ".join(sorted(s.value for s in TRANSITIONS[status])) or "none"
                return f"{command.line}: cannot go from {status} to {target} (allowed: {allowed})"
            status = target
        else:
            problem = engineer_problem(command.value, staff_domains)
            if problem:
                return f"{command.line}: {problem}"
    return ""
