"""Routing: every stored message gets exactly one decision (SPEC §4).

Pure: `decide(situation)` takes what the processor looked up (the ticket a token or
the thread names, whether the sender is authorised for it, how many automatic
answers the sender got lately...) and returns one frozen Decision. It is an ordered
table of small named checks, the first that matches decides (like Mailman's chains).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.model import OPEN_STATUSES, UNVERIFIED, Outcome, Report, Status, Verdict
from gateway.staff_mail import command_problem, parse_staff_mail

# --- what the processor looked up ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class TicketView:
    number: int
    status: Status
    reporter_email: str
    participants: tuple[str, ...]

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES


@dataclass(frozen=True, slots=True)
class Policy:
    max_auto_replies_per_hour: int = 20
    staff_domains: tuple[str, ...] = ("s4e.pl",)


@dataclass(frozen=True, slots=True)
class Situation:
    report: Report
    mail_from: str  # envelope reverse-path, "" for <>
    to_intake: bool  # envelope recipients include the intake address
    to_crm: bool
    named_ref: int | None  # the first token's number, whether or not a ticket has it
    ticket: TicketView | None  # the ticket a token or the thread matched
    authorised: bool  # the sender may write into `ticket`
    own_mail: bool  # it is mail we sent, come back
    duplicate_of: int | None  # an earlier routed inbound message with this Message-ID
    auto_replies_last_hour: int
    policy: Policy = Policy()
    # The sender is the ticket's reporter or one of its first message's addresses:
    # only then may the mail change the ticket's fields or rate it (reply_policy admits
    # the mail into the thread, not more).
    is_participant: bool = False
    verdict: Verdict = UNVERIFIED  # who really sent it (SPEC §10)
    staff_sender: bool = False  # the From is in a staff domain (verified or not)


# --- decisions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewTicket:
    reason: str
    linked_to: int | None = None  # the closed ticket a token named
    answer: bool = True  # False past the automatic-answer cap: ticket, but no mail

    @property
    def outcome(self) -> Outcome:
        return Outcome.CLOSED_NEW if self.linked_to is not None else Outcome.NEW


@dataclass(frozen=True, slots=True)
class AppendToTicket:
    number: int
    reason: str
    answer: bool = True

    outcome = Outcome.FOLLOW_UP


@dataclass(frozen=True, slots=True)
class ClosedTicketGuidance:
    number: int
    name_ticket: bool  # only to a sender authorised for the ticket
    reason: str
    answer: bool = True

    outcome = Outcome.CLOSED_GUIDANCE


@dataclass(frozen=True, slots=True)
class UnknownTicketGuidance:
    reason: str
    content_free: bool  # a token named a number: answer exactly like a held message
    answer: bool = True

    outcome = Outcome.UNKNOWN_GUIDANCE


@dataclass(frozen=True, slots=True)
class HoldForOperator:
    ticket: int | None
    reason: str
    answer: bool = True

    outcome = Outcome.HELD


@dataclass(frozen=True, slots=True)
class StaffMail:
    """A verified engineer's mail on an open ticket: relayed to the reporter, or with
    `internal` recorded as a note that is never sent (SPEC §9)."""

    number: int
    internal: bool
    reason: str

    @property
    def outcome(self) -> Outcome:
        return Outcome.STAFF_NOTE if self.internal else Outcome.STAFF_REPLY


@dataclass(frozen=True, slots=True)
class StaffRefused:
    """A verified engineer's mail that cannot go to the customer: the ticket is closed
    (outcome closed_guidance), or the text is empty or a command is not valid (kept as a
    note, outcome staff_note). The engineer is told why; nothing is applied."""

    number: int
    problem: str  # texts.NOTICE_PROBLEMS
    reason: str
    detail: str = ""

    @property
    def outcome(self) -> Outcome:
        return Outcome.CLOSED_GUIDANCE if self.problem == "closed" else Outcome.STAFF_NOTE


@dataclass(frozen=True, slots=True)
class StoreOnly:
    """Stored, never answered: automatic mail, our own mail, duplicates."""

    reason: str
    outcome: Outcome
    bounced_ids: tuple[str, ...] = ()


# (closed_rejected is decided at the SMTP edge, before the 250: see
# closed_refusal.closed_ticket_refusal; by the time the router runs the mail is accepted.)
Decision = (NewTicket | AppendToTicket | ClosedTicketGuidance | UnknownTicketGuidance
            | HoldForOperator | StaffMail | StaffRefused | StoreOnly)


# --- the checks, in order ---------------------------------------------------------------

Check = Callable[[Situation], Decision | None]


def check_duplicate(s: Situation) -> Decision | None:
    if s.duplicate_of is not None:
        return StoreOnly(f"same Message-ID as inbound {s.duplicate_of}", Outcome.DUPLICATE)
    return None


def check_own_mail(s: Situation) -> Decision | None:
    if s.own_mail:
        return StoreOnly("our own mail came back", Outcome.IGNORED_AUTO)
    return None


def check_automatic(s: Situation) -> Decision | None:
    reasons = list(s.report.auto_reasons)
    if s.mail_from == "":
        reasons.insert(0, "null reverse-path")
    if reasons:
        # Only a real DSN (null reverse-path, RFC 3464) may mark our mail bounced: a
        # stranger's mail naming our Message-IDs must not flag a reporter.
        bounced = s.report.bounced_ids if s.mail_from == "" else ()
        return StoreOnly("automatic mail: " + ", ".join(reasons), Outcome.IGNORED_AUTO,
                         bounced_ids=bounced)
    return None


def check_forged(s: Situation) -> Decision | None:
    """DMARC fail: the From is forged. Nothing changes, nothing is answered (an answer
    would go to the forged address): held for operators."""
    if s.verdict.failed:
        return HoldForOperator(s.ticket.number if s.ticket else s.named_ref,
                               f"sender verification failed: {s.verdict.reason}",
                               answer=False)
    return None


def check_staff(s: Situation) -> Decision | None:
    """Staff-domain mail on a ticket: staff only with a verified sender (SPEC §9, §10)."""
    ticket = s.ticket
    if not s.staff_sender or ticket is None:
        return None
    if not s.verdict.passed:
        if not ticket.is_open and s.to_intake:
            return None  # a new report naming a closed ticket: as anybody's
        return HoldForOperator(ticket.number, "staff-domain sender not verified "
                               f"({s.verdict.reason}): never relayed", answer=_may_answer(s))
    if ticket.is_open:
        if not s.to_crm:
            return StaffMail(ticket.number, internal=True,
                             reason="verified staff mail to the intake address: kept as a note")
        mail = parse_staff_mail(s.report.text)
        problem = command_problem(mail.commands, ticket.status, s.policy.staff_domains)
        if problem:
            return StaffRefused(ticket.number, "bad_command", "staff mail with a bad command",
                                detail=problem)
        if not mail.text and not mail.commands:
            return StaffRefused(ticket.number, "empty", "staff mail without text")
        return StaffMail(ticket.number, internal=mail.internal,
                         reason="verified staff " + ("note" if mail.internal else "reply"))
    if s.to_crm:
        return StaffRefused(ticket.number, "closed", "staff reply on a closed ticket: not sent")
    return None


def check_open_ticket(s: Situation) -> Decision | None:
    ticket = s.ticket
    if ticket is None or not ticket.is_open:
        return None
    if s.authorised:
        return AppendToTicket(ticket.number, "reply on an open ticket", answer=_may_answer(s))
    if s.to_intake:
        # A stranger's mail to serwis@ is a new report, whatever number it names: the
        # answer is then the same for an open, a closed or no ticket (no probing).
        return None
    return HoldForOperator(ticket.number, "sender not authorised for the ticket",
                           answer=_may_answer(s))


def check_closed_ticket(s: Situation) -> Decision | None:
    ticket = s.ticket
    if ticket is None or ticket.is_open:
        return None
    if s.to_intake:
        return NewTicket(f"new report naming closed ticket #{ticket.number:06d}",
                         linked_to=ticket.number, answer=_may_answer(s))
    return ClosedTicketGuidance(ticket.number, name_ticket=s.authorised,
                                reason="mail on a closed ticket", answer=_may_answer(s))


def check_new_report(s: Situation) -> Decision | None:
    if s.to_intake:
        reason = "new report"
        if s.ticket is not None:
            reason += f" (names #{s.ticket.number:06d}, sender not authorised for it)"
        return NewTicket(reason, answer=_may_answer(s))
    return None


def check_unknown(s: Situation) -> Decision | None:
    named = s.named_ref is not None
    reason = (f"token #{s.named_ref:06d} names no ticket" if named
              else "no ticket token and no known thread")
    return UnknownTicketGuidance(reason, content_free=named, answer=_may_answer(s))


CHECKS: tuple[Check, ...] = (
    check_duplicate,
    check_own_mail,
    check_automatic,
    check_forged,
    check_staff,
    check_open_ticket,
    check_closed_ticket,
    check_new_report,
    check_unknown,
)


def _may_answer(s: Situation) -> bool:
    return s.auto_replies_last_hour < s.policy.max_auto_replies_per_hour


def decide(situation: Situation) -> Decision:
    for check in CHECKS:
        decision = check(situation)
        if decision is not None:
            return decision
    raise AssertionError("check_unknown always decides")  # pragma: no cover


def is_authorised(sender: str, ticket: TicketView, *, staff_domains: tuple[str, ...],
                  reply_policy: str) -> bool:
    """SPEC §4: the reporter, addresses on the first message's To/Cc, staff domains
    (pass `()` unless the sender is verified: SPEC §10); "domain" also admits the
    reporter's domain, "any" everyone."""
    sender = sender.lower()
    if not sender:
        return reply_policy == "any"
    domain = sender.rpartition("@")[2]
    if reply_policy == "any":
        return True
    if sender == ticket.reporter_email.lower() or sender in ticket.participants:
        return True
    if domain in staff_domains:
        return True
    return reply_policy == "domain" and domain == ticket.reporter_email.lower().rpartition("@")[2]
