"""The parser's fuzz target in the suite: a short bounded atheris run (fuzz/README.md),
and every input the fuzzer ever found as a regression test."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.parser import parse_report

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fuzz"))

needs_atheris = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                   reason="atheris is not installed")


@needs_atheris
def test_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for folder in (ROOT / "tests" / "data",):
        for path in folder.glob("*.eml"):
            (corpus / path.name).write_bytes(path.read_bytes())
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "fuzz_parser.py"), str(corpus), "-runs=20000",
         "-max_total_time=45", "-seed=1", "-timeout=60", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    # A finding: its input (to make a regression test of) and the fuzzer's last words.
    found = sorted(p for p in tmp_path.iterdir() if p.name.split("-")[0] in ("crash", "timeout", "oom"))
    detail = "".join(f"{p.name}: {p.read_bytes()[:2000]!r}\n" for p in found) + run.stderr[-3000:]
    assert run.returncode == 0 and not found, detail
    assert "Done" in run.stderr


@needs_atheris
def test_the_target_checks_the_contract() -> None:
    from fuzz_parser import check  # the same checks as the fuzzer

    report = check(b"From: a@b.pl\nSubject: x\n\nOpis: y\n")
    assert report.fields.description == "y"


# Inputs the fuzzer found (each failed before its fix), checked as the target checks them:
# tests/data/fuzz-*.eml as found, and each one reduced to its cause.
FOUND_FILES = sorted((ROOT / "tests" / "data").glob("fuzz-*.eml"))
REDUCED = [
    # utf-7 encoded word holding UTF-8: the stdlib's address parser returned the name as
    # surrogate-escaped bytes, which cannot be stored (UnicodeEncodeError)
    (b"From: =?utf-7?b?xYF1a2FzeiDFu8OzxYLEhw==?= <lukasz@example.pl>, b@example.pl\n\nx\n",
     "sender_name", "Łukasz Żółć"),
    (b"From: a@b.pl\nSubject: =?utf-7?q?+2AA-?=\n\nx\n", "subject", "\ufffd"),  # a lone surrogate
    (b"From: a@b.pl\nContent-Type: text/plain; charset=unicode_escape\n\nOpis: \\ud800\n", "text",
     "Opis: \ufffd"),
    # a control character in the tail text of a dropped <style>: lxml refused to move it
    # (ValueError) and the whole HTML body was lost
    (b"From: a@b.pl\nContent-Type: text/html\n\n<p>x</p><style>p{}</style>\x01Opis: dysk\n",
     "text", "x\n\nOpis: dysk"),
]


@pytest.mark.parametrize("path", FOUND_FILES, ids=[p.name for p in FOUND_FILES])
def test_fuzz_findings_as_found(path: Path) -> None:
    report = parse_report(path.read_bytes())
    assert not [n for n in report.notes if "failed" in n or "could not be read" in n]
    for text in (report.subject, report.sender_name, report.text, *report.notes,
                 *(a.filename for a in report.attachments)):
        text.encode("utf-8")


@pytest.mark.parametrize(("raw", "field", "value"), REDUCED, ids=[r[1] for r in REDUCED])
def test_fuzz_findings_reduced(raw: bytes, field: str, value: str) -> None:
    assert getattr(parse_report(raw), field) == value
