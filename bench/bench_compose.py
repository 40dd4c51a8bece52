#!/usr/bin/env python3
"""CPU per outgoing mail of gateway.compose.compose_message: the EmailMessage path (the
baseline, still used for attachments and long display names) against the fast path.

    python bench/bench_compose.py [--rounds N] [--count N]

Mails: a typical acknowledgement (Polish subject and ~2 KB Polish body, In-Reply-To and
References, RFC 3834 headers) and a staff reply (Polish display name, two Cc, urgent).
Figures are process CPU time per mail, the best of the rounds, rounds alternating.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, UTC

from gateway.compose import _compose
from gateway.model import Outgoing

KW = dict(from_addr="crm@s4e.pl", message_id="<t123456.a1b2c3@s4e.pl>",
          date=datetime(2026, 12, 1, 10, 0, tzinfo=UTC), from_name="Serwis S4E")
BODY = ("Dzień dobry,\n\nzgłoszenie #123456 zostało przyjęte przez serwis S4E. "
        "Technik skontaktuje się z Państwem w ciągu 4 godzin roboczych.\n\n"
        + "Zgłaszający: Jan Kowalski, tel. +48 600 100 200, ul. Żółkiewskiego 12, Łódź\n" * 20
        + "\nPozdrawiamy,\nSerwis S4E\n")
MAILS = {
    "acknowledgement": Outgoing(
        kind="acknowledgement", ticket=123456, to="jan.kowalski@firma.pl",
        subject="[#123456] Awaria serwera kopii zapasowych – pilne", body=BODY,
        in_reply_to="<CAF=abc+1@mail.gmail.com>",
        references=("<root@firma.pl>", "<CAF=abc+1@mail.gmail.com>")),
    "staff reply": Outgoing(
        kind="staff_reply", ticket=123456, to="jan.kowalski@firma.pl",
        subject="Re: [#123456] Awaria serwera kopii zapasowych – pilne", body=BODY,
        in_reply_to="<CAF=abc+1@mail.gmail.com>", references=("<root@firma.pl>",),
        auto=False, urgent=True, cc=("biuro@firma.pl", "it@firma.pl"),
        from_name="Łukasz Wójcik via S4E"),
}


def per_mail_ms(out: Outgoing, fast: bool, count: int) -> float:
    start = time.process_time()
    for _ in range(count):
        _compose(out, **KW, fast=fast)  # type: ignore[arg-type]
    return (time.process_time() - start) / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    print(f"{'mail':<16} {'EmailMessage ms':>16} {'fast path ms':>13} {'ratio':>7}"
          "  same bytes")
    for label, out in MAILS.items():
        same = _compose(out, **KW, fast=False) == _compose(out, **KW, fast=True)  # type: ignore[arg-type]
        slow = fast = float("inf")
        for _ in range(args.rounds):
            slow = min(slow, per_mail_ms(out, False, args.count))
            fast = min(fast, per_mail_ms(out, True, args.count))
        print(f"{label:<16} {slow:>16.3f} {fast:>13.3f} {slow / fast:>6.1f}x  {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
