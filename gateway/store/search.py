"""Finding tickets: by status, assignee, full text (FTS5 in SQLite, tsvector in
PostgreSQL) and who waits for an answer."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiosqlite

from gateway.model import OPEN_STATUSES
from gateway.store.dialect import is_postgres
from gateway.store.paging import PAGE_ROWS, WIDE_PAGE_ROWS, walk
from gateway.store.tickets import TicketRow

_SEARCH_TERM = re.compile(r'"([^"]*)"|(\S+)')
# Control characters and lone surrogates (a web query's %00, undecodable bytes in argv)
# separate words, as in the index; left in, NUL ends FTS5's string and PostgreSQL
# refuses both.
_UNSEARCHABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
# One term of an expression `search_expression` made: a quoted string, " *" for a prefix.
_EXPRESSION_TERM = re.compile(r'"((?:[^"]|"")*)"( \*)?')


def search_expression(text: str) -> str:
    """User text as an FTS5 query that cannot break the MATCH syntax: each "quoted
    phrase" and each word becomes one quoted FTS5 string (a word also matches as a
    prefix), all of them required. "" when the text holds nothing to search for."""
    terms = []
    for phrase, word in _SEARCH_TERM.findall(_UNSEARCHABLE.sub(" ", text)):
        term = (phrase or word).replace("ł", "l").replace("Ł", "L")
        if not any(c.isalnum() for c in term):
            continue
        quoted = '"' + term.replace('"', '""') + '"'
        terms.append(quoted if phrase else quoted + " *")
    return " AND ".join(terms)


def expression_terms(expression: str) -> list[tuple[str, bool]]:
    """The terms of an expression from `search_expression`, each with whether it
    matches as a prefix (a word) or not (a "quoted phrase")."""
    terms, position = [], 0
    while True:
        match = _EXPRESSION_TERM.match(expression, position)
        if match is None:
            raise ValueError(f"not a search expression: {expression!r}")
        terms.append((match.group(1).replace('""', '"'), bool(match.group(2))))
        position = match.end()
        if position == len(expression):
            return terms
        if not expression.startswith(" AND ", position):
            raise ValueError(f"not a search expression: {expression!r}")
        position += len(" AND ")


def _search_condition(conn: aiosqlite.Connection, expression: str) -> tuple[str, list[Any]]:
    """WHERE condition and parameters: the ticket's own fields or one of its thread
    entries hold every term (migrations/0005_search.sql and its PostgreSQL twin)."""
    if not is_postgres(conn):
        return ("t.number IN (SELECT rowid FROM ticket_search WHERE ticket_search MATCH ?"
                " UNION SELECT ticket FROM message_search WHERE message_search MATCH ?)",
                [expression, expression])
    # search_term folds each term as the index was folded; a term that folds to
    # nothing is NULL, and so is the AND of all: no match, as in FTS5. The matching
    # numbers are collected first and the tickets read by key (= ANY(ARRAY(...))):
    # with IN the planner, which cannot tell how many a tsquery matches, read the
    # whole tickets table into a hash join (SN-4711 at 200,000 tickets: 179 ms, by
    # key 1.7 ms).
    terms = expression_terms(expression)
    query = "(" + " && ".join(f"search_term(?, {'true' if prefix else 'false'})"
                              for _, prefix in terms) + ")"
    values: list[Any] = [term for term, _ in terms]
    return (f"t.number = ANY(ARRAY(SELECT ticket FROM ticket_search WHERE document @@ {query}"
            f" UNION SELECT ticket FROM message_search WHERE document @@ {query}))",
            values + values)


@dataclass(frozen=True, slots=True)
class ListedTicket:
    ticket: TicketRow
    waiting_since: str | None  # the oldest customer message no staff reply followed

    def cursor(self, waiting: bool) -> TicketCursor:
        """Where the next page starts: the list's sort key of this row."""
        return ((self.waiting_since or "") if waiting else self.ticket.created_at,
                self.ticket.number)


_OPEN = ", ".join(f"'{s}'" for s in sorted(OPEN_STATUSES))

# A position in a ticket list: (created_at, number), or (waiting_since, number) in
# the `waiting` list. The CLI's and the web desk's `--after NUMBER` names a ticket;
# `ticket_cursor` finds its position.
TicketCursor = tuple[str, int]


# The first customer message after the last staff reply: the customer waits since
# then. NULL when staff answered last (notices and internal notes answer nobody) and
# on closed tickets.
WAITING_SINCE = """
    CASE WHEN t.status = 'closed' THEN NULL ELSE
    (SELECT m.date FROM ticket_messages m
      WHERE m.ticket = t.number AND m.kind = 'customer'
        AND m.id > coalesce((SELECT max(s.id) FROM ticket_messages s
                              WHERE s.ticket = t.number AND s.kind = 'staff_reply'), 0)
      ORDER BY m.id LIMIT 1) END"""


async def find_tickets(conn: aiosqlite.Connection, *, status: str | None = None,
                       assignee: str | None = None, search: str | None = None,
                       waiting: bool = False, after: TicketCursor | None = None,
                       limit: int | None = None) -> list[ListedTicket]:
    """Tickets by status, assignee (case-insensitive) and full-text `search` (an
    expression from `search_expression`); `waiting`: only open tickets whose customer
    waits for an answer, oldest wait first; otherwise oldest ticket first. One page:
    those after the position `after`, at most `limit`."""
    where: list[str] = []
    params: list[Any] = []
    if status:
        where.append("t.status = ?")
        params.append(status)
    if assignee:
        where.append("lower(t.assignee) = lower(?)")
        params.append(assignee)
    if search is not None:
        condition, values = _search_condition(conn, search)
        where.append(condition)
        params += values
    if waiting:  # an IN list the status index serves (most tickets are closed)
        where.append(f"t.status IN ({_OPEN})")
    elif after is not None:
        where.append("(t.created_at, t.number) > (?, ?)")
        params += after
    sql = (f"SELECT t.*, {WAITING_SINCE} AS waiting_since FROM tickets t"
           + (" WHERE " + " AND ".join(where) if where else ""))
    if waiting:
        sql = f"SELECT * FROM ({sql}) AS w WHERE waiting_since IS NOT NULL"
        if after is not None:
            sql += " AND (waiting_since, number) > (?, ?)"
            params += after
        sql += " ORDER BY waiting_since, number"
    else:
        sql += " ORDER BY t.created_at, t.number"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [ListedTicket(TicketRow.from_row(r), r["waiting_since"])
            for r in await conn.execute_fetchall(sql, params)]


def iter_tickets(conn: aiosqlite.Connection, *, status: str | None = None,
                 assignee: str | None = None, search: str | None = None,
                 waiting: bool = False, after: TicketCursor | None = None,
                 limit: int | None = None) -> AsyncIterator[ListedTicket]:
    """`find_tickets` walked page by page (each page its own short read)."""
    async def fetch(cursor: TicketCursor | None, size: int) -> list[ListedTicket]:
        return await find_tickets(conn, status=status, assignee=assignee, search=search,
                                  waiting=waiting, after=cursor, limit=size)

    # Each page of these re-reads its whole candidate set (every open ticket's thread
    # head, every full-text match) before it can sort: fewer, larger pages.
    page_rows = WIDE_PAGE_ROWS if waiting or search is not None else PAGE_ROWS
    return walk(fetch, lambda row: row.cursor(waiting), after=after, limit=limit,
                page_rows=page_rows)


async def ticket_cursor(conn: aiosqlite.Connection, number: int, *,
                        waiting: bool = False) -> TicketCursor | None:
    """The position of ticket `number` in the list (`waiting`: in the waiting list):
    None when there is no such ticket, or it does not wait (any more)."""
    column = WAITING_SINCE if waiting else "t.created_at"
    rows = list(await conn.execute_fetchall(
        f"SELECT {column} FROM tickets t WHERE t.number = ?", (number,)))
    if not rows or rows[0][0] is None:
        return None
    return (rows[0][0], number)
