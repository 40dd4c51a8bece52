"""atheris target: raw bytes -> gateway.parser.parse_report.

The parser's contract: it never raises, always returns a Report, and never has to catch
its own bug (the notes "parser failed", "... could not be read" mean a stage raised).
Each of those is a finding here, as is a hang (-timeout) or a memory blow-up.

    .venv/bin/python fuzz/fuzz_parser.py -max_total_time=600          # seeded run
    .venv/bin/python fuzz/fuzz_parser.py CORPUS_DIR -runs=100000       # own corpus dir
    .venv/bin/python fuzz/fuzz_parser.py crash-<sha1>                  # replay one input

With no directory argument the seeds (tests/data/*.eml and the shared corpus,
$S4E_CORPUS or ../shared/corpus) are copied into fuzz/.corpus/parser/, which then
keeps what the fuzzer finds between runs. See fuzz/README.md.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["gateway"]):
    from gateway.model import Report
    from gateway.parser import parse_report

INTERNAL_FAILURE = re.compile(r"parser failed|could not be read")
WORK_CORPUS = ROOT / "fuzz" / ".corpus" / "parser"


def seed_dirs() -> list[Path]:
    shared = Path(os.environ.get("S4E_CORPUS", ROOT.parent / "shared" / "corpus"))
    return [ROOT / "tests" / "data", shared]


def prepare_corpus() -> Path:
    """fuzz/.corpus/parser with every seed message in it (kept across runs)."""
    WORK_CORPUS.mkdir(parents=True, exist_ok=True)
    for folder in seed_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.eml")):
            target = WORK_CORPUS / ("seed-" + "_".join(path.relative_to(folder).parts))
            if not target.exists():
                shutil.copyfile(path, target)
    return WORK_CORPUS


def check(data: bytes) -> Report:
    report = parse_report(data)
    if not isinstance(report, Report):
        raise AssertionError(f"parse_report returned {type(report).__name__}")
    failures = [n for n in report.notes if INTERNAL_FAILURE.search(n)]
    if failures:
        raise AssertionError(f"a parser stage raised: {failures}")
    for att in report.attachments:
        if att.size != len(att.data) or not att.filename or "\n" in att.filename:
            raise AssertionError(f"attachment out of contract: {att.filename!r}")
    for text in (report.subject, report.sender_name, report.text, *report.notes,
                 *(a.filename for a in report.attachments)):
        text.encode("utf-8")  # no lone surrogates reach the store
    return report


def test_one_input(data: bytes) -> None:
    check(data)


def main() -> None:
    logging.disable(logging.CRITICAL)  # the parser logs what it survives; findings raise
    args = list(sys.argv)
    if not any(not a.startswith("-") and Path(a).exists() for a in args[1:]):
        args.append(str(prepare_corpus()))
    if not any(a.startswith("-max_len") for a in args):
        args.append("-max_len=131072")
    if not any(a.startswith("-timeout") for a in args):
        args.append("-timeout=20")
    if not any(a.startswith("-artifact_prefix") for a in args):
        args.append(f"-artifact_prefix={ROOT / 'fuzz'}/")
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
