"""The desk's words in Polish (default) and English ([tickets] language), and local times."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo

WORDS: dict[str, tuple[str, str]] = {
    "desk": ("Biuro serwisu S4E", "S4E service desk"),
    "sign_in": ("Zaloguj się", "Sign in"),
    "sign_out": ("Wyloguj", "Sign out"),
    "username": ("Nazwa użytkownika", "User name"),
    "password": ("Hasło", "Password"),
    "bad_login": ("Nieprawidłowa nazwa użytkownika lub hasło.", "Wrong user name or password."),
    "too_many": ("Zbyt wiele nieudanych prób logowania. Spróbuj ponownie później.",
                 "Too many failed sign-ins. Try again later."),
    "bad_csrf": ("Formularz wygasł lub nie pochodzi z tej strony. Odśwież stronę i spróbuj "
                 "ponownie.", "The form expired or did not come from this site. Reload the "
                 "page and try again."),
    "attention": ("Wymagają uwagi", "Needing attention"),
    "attention_help": ("Zgłoszenia, w których czeka klient, i zgłoszenia z niepotwierdzonym "
                       "telefonem; najstarsze najpierw.",
                       "Tickets where the customer waits, and tickets whose phone call is not "
                       "confirmed yet; oldest first."),
    "tickets": ("Zgłoszenia", "Tickets"),
    "held": ("Wstrzymane", "Held"),
    "outbox": ("Poczta wychodząca", "Outgoing mail"),
    "search": ("Szukaj", "Search"),
    "search_help": ("numer, numer seryjny, CommCell ID, nadawca, temat, treść",
                    "number, serial, CommCell ID, sender, subject, text"),
    "any_status": ("dowolny status", "any status"),
    "number": ("Numer", "Number"),
    "status": ("Status", "Status"),
    "subject": ("Temat", "Subject"),
    "reporter": ("Zgłaszający", "Reporter"),
    "created": ("Utworzone", "Created"),
    "updated": ("Zmienione", "Updated"),
    "waiting_since": ("Klient czeka od", "Customer waiting since"),
    "why": ("Powód", "Why"),
    "customer_waiting": ("czeka klient", "customer waiting"),
    "phone_pending": ("telefon do potwierdzenia", "phone call to confirm"),
    "none_found": ("Brak zgłoszeń.", "No tickets."),
    "fields": ("Dane zgłoszenia", "Report"),
    "reporter_name": ("Imię i nazwisko", "Name"),
    "reporter_email": ("E-mail", "E-mail"),
    "reporter_phone": ("Telefon", "Phone"),
    "install_address": ("Adres instalacji", "Installation address"),
    "description": ("Opis problemu", "Description"),
    "serial_number": ("Numer seryjny", "Serial number"),
    "commcell_id": ("CommCell ID", "CommCell ID"),
    "assignee": ("Przypisane do", "Assignee"),
    "missing": ("Brakuje", "Missing"),
    "rating": ("Ocena", "Rating"),
    "phone_call": ("Telefon potwierdzający", "Confirming call"),
    "phone_required_yes": ("wymagany (umowa poniżej 24 h), potwierdzony",
                           "required (contract under 24 h), confirmed"),
    "phone_required_no": ("wymagany (umowa poniżej 24 h), NIEPOTWIERDZONY",
                          "required (contract under 24 h), NOT CONFIRMED"),
    "bounced": ("Poczta do zgłaszającego wróciła jako niedoręczona.",
                "Mail to the reporter bounced."),
    "thread": ("Wątek", "Thread"),
    "history": ("Historia", "History"),
    "attachments": ("Załączniki", "Attachments"),
    "no_attachments": ("Brak załączników.", "No attachments."),
    "download": ("pobierz", "download"),
    "view_text": ("pokaż jako tekst", "view as text"),
    "truncated": ("Pokazano początek pliku; pełny plik można pobrać.",
                  "Only the start of the file is shown; download it for the whole file."),
    "from": ("Od", "From"),
    "to": ("Do", "To"),
    "date": ("Data", "Date"),
    "kind_customer": ("klient", "customer"),
    "kind_staff_reply": ("odpowiedź serwisu", "staff reply"),
    "kind_staff_note": ("notatka wewnętrzna", "internal note"),
    "kind_notice": ("powiadomienie", "notice"),
    "auth_pass": ("nadawca zweryfikowany", "sender verified"),
    "auth_fail": ("weryfikacja nadawcy NIEUDANA", "sender verification FAILED"),
    "auth_none": ("nadawca niezweryfikowany", "sender not verified"),
    "actions": ("Działania", "Actions"),
    "change_status": ("Zmień status", "Change status"),
    "note_for_customer": ("Uwaga dla klienta (opcjonalnie)", "Note for the customer (optional)"),
    "reply": ("Odpowiedz klientowi", "Reply to the customer"),
    "message": ("Treść", "Message"),
    "files": ("Załączniki", "Attachments"),
    "send": ("Wyślij", "Send"),
    "internal_note": ("Notatka wewnętrzna (nie trafia do klienta)",
                      "Internal note (never sent to the customer)"),
    "save": ("Zapisz", "Save"),
    "assign": ("Przypisz", "Assign"),
    "engineer_email": ("Adres e-mail inżyniera", "Engineer's e-mail address"),
    "confirm_phone": ("Potwierdź rozmowę telefoniczną", "Record the confirming call"),
    "edit_field": ("Popraw pole", "Edit a field"),
    "field": ("Pole", "Field"),
    "value": ("Wartość", "Value"),
    "done_status": ("Status zmieniony; klient został powiadomiony.",
                    "Status changed; the reporter is notified."),
    "done_reply": ("Odpowiedź czeka na wysłanie do klienta.", "The reply is queued to the reporter."),
    "done_note": ("Notatka zapisana.", "Note saved."),
    "done_assign": ("Przypisanie zapisane.", "Assignee saved."),
    "done_phone": ("Rozmowa telefoniczna zapisana.", "Phone call recorded."),
    "done_field": ("Pole poprawione.", "Field updated."),
    "done_release": ("Wiadomość dołączona do zgłoszenia.", "The message went into its ticket."),
    "done_drop": ("Wiadomość odrzucona (pozostaje w skrzynce odbiorczej).",
                  "Message dropped (it stays stored in the inbox)."),
    "done_retry": ("Wiadomość ponownie w kolejce do wysłania.", "The mail is queued again."),
    "not_done": ("Nie wykonano", "Not done"),
    "back": ("Wróć", "Back"),
    "not_found": ("Nie znaleziono.", "Not found."),
    "held_help": ("Wiadomości, których nie dołączono do zgłoszenia: nadawca nie jest do tego "
                  "uprawniony lub nie został zweryfikowany.",
                  "Messages not added to a ticket: the sender is not authorised for it or "
                  "not verified."),
    "no_held": ("Brak wstrzymanych wiadomości.", "No held messages."),
    "sender": ("Nadawca", "Sender"),
    "ticket": ("Zgłoszenie", "Ticket"),
    "reason": ("Powód", "Reason"),
    "release": ("Dołącz do zgłoszenia", "Release into the ticket"),
    "drop": ("Odrzuć", "Drop"),
    "release_new": ("Otwórz z niej nowe zgłoszenie", "Open a new ticket from it"),
    "verdict": ("Weryfikacja nadawcy", "Sender verdict"),
    "message_text": ("Treść wiadomości", "Message text"),
    "headers": ("Nagłówki", "Headers"),
    "raw": ("pobierz oryginał (.eml)", "download the original (.eml)"),
    "inbound": ("Wiadomość przychodząca", "Inbound message"),
    "outcome": ("Wynik", "Outcome"),
    "received": ("Odebrano", "Received"),
    "size": ("Rozmiar", "Size"),
    "html_only": ("Wiadomość ma tylko część HTML; pokazano jej tekst (HTML nie jest "
                  "wyświetlany).", "The message has only an HTML part; its text is shown "
                  "(HTML is never rendered)."),
    "outbox_help": ("Poczta, której nie udało się doręczyć (nieudana lub zwrócona).",
                    "Mail that could not be delivered (failed or bounced)."),
    "no_outbox": ("Brak niedoręczonej poczty.", "No undelivered mail."),
    "recipient": ("Odbiorca", "Recipient"),
    "kind": ("Rodzaj", "Kind"),
    "attempts": ("Próby", "Attempts"),
    "error": ("Błąd", "Error"),
    "retry": ("Wyślij ponownie", "Send again"),
    "signed_in_as": ("Zalogowano jako", "Signed in as"),
    "next_page": ("Następna strona", "Next page"),
    "first_page": ("Pierwsza strona", "First page"),
    "on_this_page": ("na tej stronie", "on this page"),
}

STATUS_LABELS: dict[str, tuple[str, str]] = {
    "awaiting_info": ("Oczekuje na uzupełnienie", "Awaiting information"),
    "accepted": ("Przyjęte", "Accepted"),
    "in_progress": ("W realizacji", "In progress"),
    "resolved": ("Rozwiązane", "Resolved"),
    "closed": ("Zamknięte", "Closed"),
}

# (one, few, many) in Polish; (one, other) in English.
NOUNS: dict[str, tuple[tuple[str, str, str], tuple[str, str]]] = {
    "ticket": (("zgłoszenie", "zgłoszenia", "zgłoszeń"), ("ticket", "tickets")),
    "message": (("wiadomość", "wiadomości", "wiadomości"), ("message", "messages")),
    "mail": (("wiadomość", "wiadomości", "wiadomości"), ("mail", "mails")),
}


def polish_form(count: int) -> int:
    """0: one, 1: few (2-4, 22-24, ...), 2: many (0, 5-21, 25-31, ...)."""
    if count == 1:
        return 0
    if count % 10 in (2, 3, 4) and count % 100 not in (12, 13, 14):
        return 1
    return 2


class Language:
    """What templates call: `t("key")`, `status("accepted")`, `count(3, "ticket")`,
    `when(iso_text)` in the configured time zone."""

    def __init__(self, language: str, timezone: str) -> None:
        self.code = language
        self._en = language == "en"
        self._zone = ZoneInfo(timezone)

    def t(self, key: str) -> str:
        return WORDS[key][self._en]

    def status(self, value: str) -> str:
        labels = STATUS_LABELS.get(value)
        return labels[self._en] if labels else value

    def count(self, number: int, noun: str) -> str:
        polish, english = NOUNS[noun]
        word = (english[0] if number == 1 else english[1]) if self._en \
            else polish[polish_form(number)]
        return f"{number} {word}"

    def when(self, iso_text: str | None) -> str:
        if not iso_text:
            return "-"
        try:
            moment = datetime.fromisoformat(iso_text)
        except ValueError:
            return iso_text
        return moment.astimezone(self._zone).strftime("%Y-%m-%d %H:%M")

    def helpers(self) -> dict[str, Callable[..., str]]:
        return {"t": self.t, "status_label": self.status, "count": self.count,
                "when": self.when}
