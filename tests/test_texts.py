"""One typed context per event: every template has its class and every class its
template, in both languages; the Polish texts use the right plural forms and keep
their diacritics."""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from pathlib import Path

import pytest

from gateway.model import REQUIRED_FIELDS, Fields, Status
from gateway.texts import (
    EVENTS,
    LANGUAGES,
    TEXTS,
    Acknowledgement,
    Common,
    HeldDigest,
    HeldItem,
    MissingFields,
    Renderer,
    Resolved,
    StaffCopy,
    StaffFile,
    Text,
    sample_texts,
)

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
RENDERERS = {language: Renderer(TEMPLATES, language) for language in LANGUAGES}
COMMON = Common(number=123456, subject="Awaria macierzy")


def template_events(language: str) -> set[str]:
    return {p.name.removesuffix(".txt.j2") for p in (TEMPLATES / language).glob("*.txt.j2")
            if not p.name.startswith("_")}


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_template_has_a_context_class_and_vice_versa(language: str) -> None:
    assert template_events(language) == set(TEXTS) == set(EVENTS)
    for event, cls in TEXTS.items():
        assert cls.event == event and issubclass(cls, Text)
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        assert params.frozen, f"{cls.__name__} must be frozen"
        assert next(f.name for f in dataclasses.fields(cls)) == "common"


def test_every_event_has_a_sample() -> None:
    assert {text.event for text in sample_texts()} == set(EVENTS)


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("text", list(sample_texts()),
                         ids=lambda t: t.event)
def test_every_context_renders(language: str, text: Text) -> None:
    body = RENDERERS[language].render(text)
    assert body.strip() and body.endswith("\n") and not body.endswith("\n\n")
    assert "None" not in body and "{{" not in body and "{%" not in body
    assert unicodedata.is_normalized("NFC", body)


# What an ASCII-only Polish text would say instead of the real words.
TRANSLITERATED = re.compile(
    r"zgloszen|Zgloszen|Panstw|wiadomosc|powazaniem|uzupelnien|Przyjete|Zamkniete|"
    r"Rozwiazane|zalacznik|Otrzymalismy|Dziekujemy|prosimy podac|"
    r"wylacznie|Tresc|Zalaczniki|Powod")
# A word with diacritics each Polish text must carry (it is about a ticket, or names one).
PL_WORD = {
    "acknowledgement": "zgłoszenie", "missing_fields": "zgłoszenia",
    "status_changed": "zgłoszenie", "resolved": "Rozwiązane", "closed": "Zamknięte",
    "closed_ticket_guidance": "zamknięte", "unknown_ticket_guidance": "zgłoszenia",
    "staff_reply": "Zgłoszenie", "held_notice": "wiadomość", "staff_copy": "Załączniki",
    "rating_request": "Rozwiązane", "staff_notice": "wiadomość",
    "held_digest": "Wiadomości",
}


@pytest.mark.parametrize("text", list(sample_texts()), ids=lambda t: t.event)
def test_polish_texts_keep_their_diacritics(text: Text) -> None:
    body = RENDERERS["pl"].render(text)
    assert PL_WORD[text.event] in body, (text.event, body)
    assert not TRANSLITERATED.search(body), (text.event, TRANSLITERATED.search(body))


def test_the_polish_word_list_names_every_event() -> None:
    assert set(PL_WORD) == set(EVENTS)


@pytest.mark.parametrize("count, files, logs", [
    (1, "1 załącznik", "1 plik z logami"),
    (2, "2 załączniki", "2 pliki z logami"),
    (4, "4 załączniki", "4 pliki z logami"),
    (5, "5 załączników", "5 plików z logami"),
    (12, "12 załączników", "12 plików z logami"),
    (14, "14 załączników", "14 plików z logami"),
    (21, "21 załączników", "21 plików z logami"),
    (22, "22 załączniki", "22 pliki z logami"),
    (25, "25 załączników", "25 plików z logami"),
    (112, "112 załączników", "112 plików z logami"),
    (123, "123 załączniki", "123 pliki z logami"),
])
def test_polish_plural_forms_of_attachments(count: int, files: str, logs: str) -> None:
    for text in (Acknowledgement(COMMON, attachments=count, log_attachments=count),
                 MissingFields(COMMON, missing=("device_id",), attachments=count,
                               log_attachments=count)):
        body = RENDERERS["pl"].render(text)
        assert f"Otrzymaliśmy {files}, w tym {logs}.\n" in body, body
    english = RENDERERS["en"].render(Acknowledgement(COMMON, attachments=count))
    assert f"We received {count} attachment{'' if count == 1 else 's'}." in english


@pytest.mark.parametrize("days, phrase", [
    (1, "w ciągu 1 dnia,"), (2, "w ciągu 2 dni,"), (5, "w ciągu 5 dni,"),
    (14, "w ciągu 14 dni,"), (30, "w ciągu 30 dni,"),
])
def test_polish_rating_window(days: int, phrase: str) -> None:
    assert phrase in RENDERERS["pl"].render(Resolved(COMMON, rating_window_days=days))


def test_polish_missing_fields_agree_in_number() -> None:
    one = RENDERERS["pl"].render(MissingFields(COMMON, missing=("device_id",)))
    assert "brakuje następującej wymaganej informacji:" in one
    assert "Prosimy podać ją w odpowiedzi" in one and "Po otrzymaniu brakującej informacji" in one
    many = RENDERERS["pl"].render(MissingFields(COMMON, missing=REQUIRED_FIELDS))
    assert "brakuje następujących wymaganych informacji:" in many
    assert "Prosimy podać je w odpowiedzi na tę wiadomość, każdą w osobnym wierszu" in many
    assert "Po otrzymaniu brakujących informacji" in many
    again = RENDERERS["pl"].render(MissingFields(COMMON, missing=("device_id",), again=True))
    assert "nadal brakuje następującej informacji:" in again


def test_staff_texts_in_polish() -> None:
    copy = RENDERERS["pl"].render(StaffCopy(
        COMMON, copy_kind="new", fields=Fields(reporter_name="Łucja Żądło"),
        missing=("device_id",), status=Status.AWAITING_INFO,
        files=(StaffFile(filename="żółw.log", size=3000, is_log=True),)))
    assert "Nowe zgłoszenie #123456, status: Oczekuje na uzupełnienie\n" in copy
    assert "Imię i nazwisko: Łucja Żądło\n" in copy
    assert "Brakujące informacje: Numer seryjny urządzenia / numer Commcell ID\n" in copy
    assert "Załączniki (1):\n- żółw.log, 3 KB, plik z logami\n" in copy
    digest = RENDERERS["pl"].render(HeldDigest(COMMON, held=(
        HeldItem(id=3, sender="obcy@example.com", subject="Zażółć", reason="podejrzany",
                 received="2026-12-01 10:15", ticket=42),)))
    assert "Wiadomości wstrzymane do decyzji operatora: 1\n" in digest
    assert "3. 2026-12-01 10:15 od obcy@example.com, zgłoszenie #000042\n" in digest
    assert "Temat: Zażółć\n   Powód: podejrzany\n" in digest


def test_a_misspelled_field_fails_where_the_context_is_built() -> None:
    with pytest.raises(TypeError, match="phone_confirmation_requried"):
        Acknowledgement(COMMON, phone_confirmation_requried=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="missing"):
        MissingFields(COMMON)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        COMMON.number = 1  # type: ignore[misc]


def test_mypy_finds_a_misspelled_or_missing_field(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of typed contexts: the type checker finds the mistake before it runs."""
    api = pytest.importorskip("mypy.api", reason="mypy is not installed")
    monkeypatch.setenv("MYPYPATH", str(TEMPLATES.parent))
    snippet = tmp_path / "call_site.py"
    snippet.write_text(
        "from gateway.texts import Acknowledgement, Common, MissingFields\n"
        "Acknowledgement(Common(number=1), phone_confirmation_requried=True)\n"
        "MissingFields(Common(number=1))\n"
        "Acknowledgement(Common(number=1), attachments='2')\n", encoding="utf-8")
    out, _, status = api.run([str(snippet), "--follow-imports=silent", "--no-incremental",
                              "--ignore-missing-imports"])
    assert status == 1, out
    assert 'Unexpected keyword argument "phone_confirmation_requried"' in out
    assert 'Missing named argument "missing"' in out
    assert 'Argument "attachments" to "Acknowledgement" has incompatible type "str"' in out


@pytest.mark.parametrize("event", ["held_notice", "unknown_ticket_guidance"])
def test_content_free_texts_never_name_the_ticket(tmp_path: Path, event: str) -> None:
    """Even an operator's template that prints the number gets none to print."""
    (tmp_path / "pl").mkdir()
    (tmp_path / "pl" / f"{event}.txt.j2").write_text("[{{ ticket }}|{{ number }}]\n",
                                                    encoding="utf-8")
    renderer = Renderer(TEMPLATES, "pl", override_dir=tmp_path)
    assert renderer.render(TEXTS[event](COMMON)) == "[|]\n"
