"""How many six-digit ticket numbers are left, and the warning before they run out.

The number is the customer's contract (`#NNNNNN`, SPEC §3): six digits, never reused,
so 900,000 tickets in all. From 80 % used the log says so, once at start and again
as each further step is crossed (90, 95, 99, 100 %): a handful of lines over the
gateway's life, never one per ticket. `check-config` says the same; the gauge
`s4e_gateway_ticket_numbers_left` has the count. README "When the ticket numbers
run out" is the plan.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from gateway import store
from gateway.store import NumberSpace

log = logging.getLogger(__name__)

WARN_SHARE = 0.8  # from 80 % used the operator is told
STEPS = (0.8, 0.9, 0.95, 0.99, 1.0)  # each is said once as it is crossed
PACE = timedelta(days=30)  # how long the rest lasts: at the pace of the last 30 days


def level(space: NumberSpace) -> float | None:
    """The highest step reached; None below WARN_SHARE."""
    reached = [step for step in STEPS if space.used >= step * space.total]
    return reached[-1] if reached else None


def warning(space: NumberSpace) -> str | None:
    """The operator's warning (one line); None below WARN_SHARE."""
    if level(space) is None:
        return None
    if space.left == 0:
        return (f"ticket numbers: all {space.total:,} six-digit numbers are used; new reports"
                " are stored but open no ticket (inbox list --outcome failed): see README,"
                " \"When the ticket numbers run out\"")
    per_day = space.created_recently / PACE.days
    lasts = (f"; at the last {PACE.days} days' pace ({per_day:,.0f} a day) "
             f"{_days(space.left / per_day)}" if per_day >= 1 else "")
    return (f"ticket numbers: {space.used:,} of {space.total:,} six-digit numbers used "
            f"({space.used_share:.1%}), {space.left:,} left{lasts}: see README, "
            "\"When the ticket numbers run out\"")


def _days(days: float) -> str:
    if days < 1:
        return "less than a day"
    return "about 1 day" if round(days) == 1 else f"about {days:,.0f} days"


async def read_space(conn: Any, now: datetime) -> NumberSpace:
    return await store.number_space(conn, now - PACE)


class NumberSpaceWatch:
    """Logs the warning at the first check (start) when due, then only when a higher
    step is crossed."""

    def __init__(self) -> None:
        self._said: float | None = None  # the step last logged

    async def check(self, conn: Any, now: datetime) -> NumberSpace:
        """One look (a count; the pace is read only when there is something to say)."""
        space = await store.number_space(conn)
        reached = level(space)
        if reached is not None and (self._said is None or reached > self._said):
            space = await read_space(conn, now)
            (log.error if space.left == 0 else log.warning)("%s", warning(space))
            self._said = reached
        return space
