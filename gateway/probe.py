"""`python -m gateway.probe`: parse the raw message on stdin and exit 0.

The processor asks this of a fresh interpreter for a message an earlier process left
unfinished: if parsing it kills the interpreter (recursion, a C extension, memory),
the message is poison; if not, the earlier crash was not its doing.
"""

from __future__ import annotations

import sys


def main() -> int:
    from gateway.parser import parse_report

    try:
        parse_report(sys.stdin.buffer.read())
    except Exception:  # noqa: BLE001 - an exception is the processor's `failed`, not a crash
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
