"""The router on its own: `decide(Situation(...))` for every check, in its order (SPEC §4).

Pure tests: no database, no SMTP. Each check has a case it alone decides, and the order
conflicts (a message two checks would claim) are pinned: deleting or reordering a
check in `router.CHECKS` fails a test here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from gateway.model import UNVERIFIED, AuthResult, Fields, Outcome, Report, Status, Verdict
from gateway.router import (AppendToTicket, ClosedTicketGuidance, HoldForOperator, NewTicket,
                            Policy, Situation, StaffMail, StaffRefused, StoreOnly, TicketView,
                            UnknownTicketGuidance, decide)

PASS = Verdict(AuthResult.PASS, "dmarc=pass", "s4e.pl")
FAIL = Verdict(AuthResult.FAIL, "dmarc=fail", "example.com")
OPEN = TicketView(123456, Status.IN_PROGRESS, "jan@example.com", ("jan@example.com",))
CLOSED = replace(OPEN, status=Status.CLOSED)


def report(text: str = "Serwer nie działa.", auto_reasons: tuple[str, ...] = (),
           bounced_ids: tuple[str, ...] = ()) -> Report:
    return Report(message_id="<m1@example.com>", in_reply_to=(), references=(),
                  sender="jan@example.com", sender_name="Jan Kowalski", reply_to="",
                  to=("serwis@s4e.pl",), cc=(), subject="Awaria", date=None, text=text,
                  fields=Fields(), missing=(), attachments=(), ticket_refs=(),
                  auto_reasons=auto_reasons, bounced_ids=bounced_ids, rating=None)


def situation(**changes: Any) -> Situation:
    """A plain new report to the intake address; `changes` make it the case at hand."""
    base = Situation(report=report(), mail_from="jan@example.com", to_intake=True,
                     to_crm=False, named_ref=None, ticket=None, authorised=False,
                     own_mail=False, duplicate_of=None, auto_replies_last_hour=0)
    return replace(base, **changes)


def on_ticket(ticket: TicketView = OPEN, **changes: Any) -> Situation:
    """A reply from the reporter to crm@ on `ticket`."""
    return situation(**{"to_intake": False, "to_crm": True, "named_ref": ticket.number,
                        "ticket": ticket, "authorised": True, "is_participant": True,
                        **changes})


def staff(ticket: TicketView = OPEN, text: str = "Wymieniliśmy dysk.",
          verdict: Verdict = PASS, **changes: Any) -> Situation:
    """An engineer's mail to crm@ on `ticket` (authorised: staff domains are)."""
    return on_ticket(ticket, **{"report": replace(report(text), sender="inz@s4e.pl"),
                                "mail_from": "inz@s4e.pl", "staff_sender": True,
                                "verdict": verdict, "is_participant": False, **changes})


# --- duplicate ---------------------------------------------------------------------------

def test_a_duplicate_is_stored_only() -> None:
    assert decide(situation(duplicate_of=7)) == StoreOnly("same Message-ID as inbound 7",
                                                          Outcome.DUPLICATE)


@pytest.mark.parametrize("other", [
    {"verdict": FAIL},  # a duplicate of a forged message: not held twice
    {"own_mail": True},
    {"mail_from": "", "report": report(auto_reasons=("auto-submitted",))},
    {"ticket": OPEN, "authorised": True, "to_crm": True, "to_intake": False},
])
def test_a_duplicate_wins_over_every_later_check(other: dict[str, Any]) -> None:
    decision = decide(situation(duplicate_of=7, **other))
    assert isinstance(decision, StoreOnly) and decision.outcome is Outcome.DUPLICATE


def test_a_duplicate_of_a_staff_mail_is_not_relayed_again() -> None:
    decision = decide(staff(duplicate_of=9))
    assert decision.outcome is Outcome.DUPLICATE


# --- own mail ----------------------------------------------------------------------------

def test_our_own_mail_coming_back_is_stored_only() -> None:
    assert decide(situation(own_mail=True)) == StoreOnly("our own mail came back",
                                                         Outcome.IGNORED_AUTO)


def test_own_mail_that_is_also_automatic_is_own_mail_and_marks_nothing_bounced() -> None:
    """A null reverse-path DSN would mark the Message-IDs it names bounced: when it is
    our own mail come back, own mail decides first and nothing is marked."""
    s = situation(own_mail=True, mail_from="",
                  report=report(auto_reasons=("dsn",), bounced_ids=("<a@s4e.pl>",)))
    decision = decide(s)
    assert decision == StoreOnly("our own mail came back", Outcome.IGNORED_AUTO)
    assert isinstance(decision, StoreOnly) and decision.bounced_ids == ()


def test_own_mail_on_an_open_ticket_is_not_appended() -> None:
    assert decide(on_ticket(own_mail=True)).outcome is Outcome.IGNORED_AUTO


def test_own_mail_with_a_forged_verdict_is_not_held() -> None:
    assert decide(situation(own_mail=True, verdict=FAIL)).outcome is Outcome.IGNORED_AUTO


# --- automatic ---------------------------------------------------------------------------

def test_automatic_mail_is_stored_only_with_its_reasons() -> None:
    decision = decide(situation(report=report(auto_reasons=("auto-submitted", "list-id"))))
    assert decision == StoreOnly("automatic mail: auto-submitted, list-id", Outcome.IGNORED_AUTO)


def test_a_null_reverse_path_is_automatic_and_its_dsn_marks_bounces() -> None:
    s = situation(mail_from="", report=report(auto_reasons=("dsn",),
                                              bounced_ids=("<a@s4e.pl>",)))
    assert decide(s) == StoreOnly("automatic mail: null reverse-path, dsn",
                                  Outcome.IGNORED_AUTO, bounced_ids=("<a@s4e.pl>",))


def test_a_null_reverse_path_alone_is_automatic() -> None:
    assert decide(situation(mail_from="")) == StoreOnly("automatic mail: null reverse-path",
                                                        Outcome.IGNORED_AUTO)


def test_a_strangers_mail_naming_our_message_ids_marks_nothing_bounced() -> None:
    s = situation(report=report(auto_reasons=("dsn",), bounced_ids=("<a@s4e.pl>",)))
    decision = decide(s)
    assert isinstance(decision, StoreOnly) and decision.outcome is Outcome.IGNORED_AUTO
    assert decision.bounced_ids == ()


def test_automatic_mail_that_fails_verification_is_not_held() -> None:
    s = on_ticket(verdict=FAIL, report=report(auto_reasons=("auto-submitted",)))
    assert decide(s).outcome is Outcome.IGNORED_AUTO


def test_automatic_mail_from_staff_is_not_relayed() -> None:
    s = staff(report=replace(report(auto_reasons=("auto-submitted",)), sender="inz@s4e.pl"))
    assert decide(s).outcome is Outcome.IGNORED_AUTO


# --- forged ------------------------------------------------------------------------------

def test_a_forged_reply_on_an_open_ticket_is_held_unanswered() -> None:
    assert decide(on_ticket(verdict=FAIL)) == HoldForOperator(
        123456, "sender verification failed: dmarc=fail", answer=False)


def test_a_forged_report_naming_no_ticket_is_held_with_the_number_it_named() -> None:
    decision = decide(situation(verdict=FAIL, named_ref=5))
    assert decision == HoldForOperator(5, "sender verification failed: dmarc=fail",
                                       answer=False)


def test_a_forged_new_report_is_held_not_opened() -> None:
    assert decide(situation(verdict=FAIL)) == HoldForOperator(
        None, "sender verification failed: dmarc=fail", answer=False)


def test_a_forged_staff_mail_is_held_not_relayed() -> None:
    decision = decide(staff(verdict=FAIL))
    assert isinstance(decision, HoldForOperator)
    assert decision.reason.startswith("sender verification failed") and not decision.answer


# --- staff -------------------------------------------------------------------------------

def test_verified_staff_reply_on_an_open_ticket_is_relayed() -> None:
    assert decide(staff()) == StaffMail(123456, internal=False, reason="verified staff reply")


def test_verified_staff_note_is_kept_internal() -> None:
    decision = decide(staff(text="#wewnętrzne\nKlient dzwonił."))
    assert decision == StaffMail(123456, internal=True, reason="verified staff note")
    assert decision.outcome is Outcome.STAFF_NOTE


def test_verified_staff_mail_to_the_intake_address_is_a_note() -> None:
    decision = decide(staff(to_crm=False, to_intake=True))
    assert decision == StaffMail(
        123456, internal=True,
        reason="verified staff mail to the intake address: kept as a note")


def test_verified_staff_mail_with_a_bad_command_is_refused() -> None:
    decision = decide(staff(text="Status: zrobione\nGotowe."))
    assert isinstance(decision, StaffRefused)
    assert (decision.number, decision.problem, decision.reason) == (
        123456, "bad_command", "staff mail with a bad command")
    assert "unknown status 'zrobione'" in decision.detail
    assert decision.outcome is Outcome.STAFF_NOTE


def test_a_staff_transition_the_ticket_cannot_take_is_refused() -> None:
    waiting = replace(OPEN, status=Status.AWAITING_INFO)
    decision = decide(staff(waiting, text="Status: resolved\nNaprawione."))
    assert isinstance(decision, StaffRefused) and decision.problem == "bad_command"
    assert "cannot go from awaiting_info to resolved" in decision.detail


def test_verified_staff_mail_without_text_is_refused() -> None:
    assert decide(staff(text="  \n")) == StaffRefused(123456, "empty",
                                                      "staff mail without text")


def test_a_staff_command_alone_is_not_empty() -> None:
    decision = decide(staff(text="Status: resolved"))
    assert decision == StaffMail(123456, internal=False, reason="verified staff reply")


def test_verified_staff_reply_on_a_closed_ticket_is_refused() -> None:
    decision = decide(staff(CLOSED))
    assert decision == StaffRefused(123456, "closed",
                                    "staff reply on a closed ticket: not sent")
    assert decision.outcome is Outcome.CLOSED_GUIDANCE


def test_verified_staff_report_to_intake_naming_a_closed_ticket_opens_a_new_one() -> None:
    decision = decide(staff(CLOSED, to_crm=False, to_intake=True))
    assert decision == NewTicket("new report naming closed ticket #123456",
                                 linked_to=123456)


@pytest.mark.parametrize("verdict", [UNVERIFIED, Verdict(AuthResult.NONE, "no DKIM, SPF none")])
def test_unverified_staff_mail_on_an_open_ticket_is_held_even_when_authorised(
        verdict: Verdict) -> None:
    """Staff domains admit mail only from a verified sender (SPEC §10): the open-ticket
    check would append it; the staff check holds it first."""
    decision = decide(staff(verdict=verdict))
    assert decision == HoldForOperator(
        123456, f"staff-domain sender not verified ({verdict.reason}): never relayed")


def test_unverified_staff_mail_on_a_closed_ticket_to_crm_is_held() -> None:
    decision = decide(staff(CLOSED, verdict=UNVERIFIED))
    assert isinstance(decision, HoldForOperator) and decision.ticket == 123456


def test_unverified_staff_report_to_intake_naming_a_closed_ticket_is_anybodys() -> None:
    decision = decide(staff(CLOSED, verdict=UNVERIFIED, to_crm=False, to_intake=True,
                            authorised=False))
    assert decision == NewTicket("new report naming closed ticket #123456",
                                 linked_to=123456)


def test_unverified_staff_hold_answers_only_below_the_cap() -> None:
    decision = decide(staff(verdict=UNVERIFIED, auto_replies_last_hour=20))
    assert isinstance(decision, HoldForOperator) and decision.answer is False


def test_staff_mail_naming_no_ticket_is_a_new_report() -> None:
    s = situation(staff_sender=True, verdict=PASS, mail_from="inz@s4e.pl")
    assert decide(s) == NewTicket("new report")


# --- open ticket -------------------------------------------------------------------------

def test_an_authorised_reply_on_an_open_ticket_is_appended() -> None:
    assert decide(on_ticket()) == AppendToTicket(123456, "reply on an open ticket")


def test_a_strangers_mail_to_crm_on_an_open_ticket_is_held() -> None:
    decision = decide(on_ticket(authorised=False, is_participant=False))
    assert decision == HoldForOperator(123456, "sender not authorised for the ticket")


def test_a_strangers_mail_to_intake_naming_an_open_ticket_is_a_new_report() -> None:
    decision = decide(on_ticket(authorised=False, to_intake=True, to_crm=False))
    assert decision == NewTicket("new report (names #123456, sender not authorised for it)")


def test_an_authorised_mail_to_intake_on_an_open_ticket_is_appended() -> None:
    decision = decide(on_ticket(to_intake=True, to_crm=False))
    assert decision == AppendToTicket(123456, "reply on an open ticket")


@pytest.mark.parametrize("ticket_status", [s for s in Status if s is not Status.CLOSED])
def test_every_open_status_takes_replies(ticket_status: Status) -> None:
    decision = decide(on_ticket(replace(OPEN, status=ticket_status)))
    assert isinstance(decision, AppendToTicket)


def test_past_the_cap_a_reply_is_appended_without_an_answer() -> None:
    decision = decide(on_ticket(auto_replies_last_hour=20))
    assert decision == AppendToTicket(123456, "reply on an open ticket", answer=False)
    low_cap = on_ticket(auto_replies_last_hour=2, policy=Policy(max_auto_replies_per_hour=3))
    assert decide(low_cap).answer is True


# --- closed ticket -----------------------------------------------------------------------

def test_a_reply_on_a_closed_ticket_gets_guidance_naming_it() -> None:
    decision = decide(on_ticket(CLOSED))
    assert decision == ClosedTicketGuidance(123456, name_ticket=True,
                                            reason="mail on a closed ticket")
    assert decision.outcome is Outcome.CLOSED_GUIDANCE


def test_a_stranger_on_a_closed_ticket_gets_guidance_not_naming_it() -> None:
    decision = decide(on_ticket(CLOSED, authorised=False))
    assert isinstance(decision, ClosedTicketGuidance) and decision.name_ticket is False


def test_a_report_to_intake_naming_a_closed_ticket_opens_a_linked_one() -> None:
    decision = decide(on_ticket(CLOSED, to_intake=True, to_crm=False))
    assert decision == NewTicket("new report naming closed ticket #123456", linked_to=123456)
    assert decision.outcome is Outcome.CLOSED_NEW


def test_past_the_cap_closed_guidance_is_not_sent() -> None:
    assert decide(on_ticket(CLOSED, auto_replies_last_hour=99)).answer is False


# --- new report, unknown ticket ----------------------------------------------------------

def test_a_report_to_intake_opens_a_ticket() -> None:
    decision = decide(situation())
    assert decision == NewTicket("new report")
    assert decision.outcome is Outcome.NEW


def test_a_report_naming_a_number_no_ticket_has_is_a_new_report_to_intake() -> None:
    assert decide(situation(named_ref=5)) == NewTicket("new report")


def test_past_the_cap_a_new_ticket_is_opened_without_an_answer() -> None:
    assert decide(situation(auto_replies_last_hour=20)) == NewTicket("new report",
                                                                     answer=False)


def test_mail_to_crm_without_a_ticket_gets_unknown_ticket_guidance() -> None:
    decision = decide(situation(to_intake=False, to_crm=True))
    assert decision == UnknownTicketGuidance("no ticket token and no known thread",
                                             content_free=False)
    assert decision.outcome is Outcome.UNKNOWN_GUIDANCE


def test_a_token_naming_no_ticket_is_answered_content_free() -> None:
    decision = decide(situation(to_intake=False, to_crm=True, named_ref=5))
    assert decision == UnknownTicketGuidance("token #000005 names no ticket",
                                             content_free=True)


def test_past_the_cap_unknown_ticket_guidance_is_not_sent() -> None:
    s = situation(to_intake=False, to_crm=True, auto_replies_last_hour=20)
    assert decide(s).answer is False
