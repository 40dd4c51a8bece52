"""Finding tickets: by status, assignee, full text (FTS5) and who waits for an
answer."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import aiosqlite

from gateway.store.tickets import TicketRow

_SEARCH_TERM = re.compile(r'"([^"]*)"|(\S+)')


def search_expression(text: str) -> str:
    """User text as an FTS5 query that cannot break the MATCH syntax: each "quoted
    phrase" and each word becomes one quoted FTS5 string (a word also matches as a
    prefix), all of them required. "" when the text holds nothing to search for."""
    terms = []
    for phrase, word in _SEARCH_TERM.findall(text):
        term = (phrase or word).replace("ł", "l").replace("Ł", "L")
        if not any(c.isalnum() for c in term):
            continue
        quoted = '"' + term.replace('"', '""') + '"'
        terms.append(quoted if phrase else quoted + " *")
    return " AND ".join(terms)


@dataclass(frozen=True, slots=True)
class ListedTicket:
    ticket: TicketRow
    waiting_since: str | None  # the oldest customer message no staff reply followed


# The first customer message after the last staff reply: the customer waits since
# then. NULL when staff answered last (notices and internal notes answer nobody) and
# on closed tickets.
_WAITING_SINCE = """
    CASE WHEN t.status = 'closed' THEN NULL ELSE
    (SELECT m.date FROM ticket_messages m
      WHERE m.ticket = t.number AND m.kind = 'customer'
        AND m.id > coalesce((SELECT max(s.id) FROM ticket_messages s
                              WHERE s.ticket = t.number AND s.kind = 'staff_reply'), 0)
      ORDER BY m.id LIMIT 1) END"""


async def find_tickets(conn: aiosqlite.Connection, *, status: str | None = None,
                       assignee: str | None = None, search: str | None = None,
                       waiting: bool = False) -> list[ListedTicket]:
    """Tickets by status, assignee (case-insensitive) and full-text `search` (an
    expression from `search_expression`); `waiting`: only open tickets whose customer
    waits for an answer, oldest wait first; otherwise oldest ticket first."""
    where: list[str] = []
    params: list[Any] = []
    if status:
        where.append("t.status = ?")
        params.append(status)
    if assignee:
        where.append("lower(t.assignee) = lower(?)")
        params.append(assignee)
    if search is not None:
        where.append("t.number IN (SELECT rowid FROM ticket_search WHERE ticket_search MATCH ?"
                     " UNION SELECT ticket FROM message_search WHERE message_search MATCH ?)")
        params += [search, search]
    if waiting:
        where.append("t.status != 'closed'")
    sql = (f"SELECT t.*, {_WAITING_SINCE} AS waiting_since FROM tickets t"
           + (" WHERE " + " AND ".join(where) if where else ""))
    if waiting:
        sql = (f"SELECT * FROM ({sql}) WHERE waiting_since IS NOT NULL"
               " ORDER BY waiting_since, number")
    else:
        sql += " ORDER BY t.created_at, t.number"
    return [ListedTicket(TicketRow.from_row(r), r["waiting_since"])
            for r in await conn.execute_fetchall(sql, params)]
