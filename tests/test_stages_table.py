"""The one table from a routing decision to what applying it does (gateway/stages.py)."""

from __future__ import annotations

import inspect
import typing

from gateway import router
from gateway.stages import APPLY


def test_every_decision_has_exactly_one_row_and_its_handler_takes_that_decision() -> None:
    decisions = set(typing.get_args(router.Decision))
    assert decisions and set(APPLY) == decisions
    for kind, handler in APPLY.items():
        hints = typing.get_type_hints(handler)
        assert hints["decision"] is kind, (kind, handler.__name__)
        assert list(inspect.signature(handler).parameters) == [
            "conn", "ctx", "row", "report", "situation", "decision", "saved", "now"]
