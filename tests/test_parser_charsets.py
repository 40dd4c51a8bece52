"""Charsets of issue 16 (class 5): raw 8-bit CJK header bytes, GB2312 read as GB18030,
ISO-2022-JP and Shift_JIS read through CP932 (NEC rows), as mail clients do."""

from __future__ import annotations

import json

import pytest

from gateway.parser import parse_report
from gateway.stages import report_json

RAW_HEADERS = [
    ("shift_jis", "山田太郎", "サーバー障害のお知らせ"),
    ("gbk", "王小明", "服务器故障报告"),
    ("cp932", "長谷川", "件名テスト"),
]


@pytest.mark.parametrize(("charset", "name", "subject"), RAW_HEADERS, ids=[c[0] for c in RAW_HEADERS])
def test_raw_8bit_cjk_headers(charset: str, name: str, subject: str) -> None:
    enc = lambda text: text.encode(charset)  # noqa: E731
    raw = (b"From: " + enc(name) + b" <user@example.jp>\nTo: serwis@s4e.pl\nSubject: " + enc(subject)
           + b"\nContent-Type: multipart/mixed; boundary=B\n\n--B\nContent-Type: text/plain\n\n"
           b"Opis: x\n--B\nContent-Type: application/octet-stream; name=\"" + enc(subject) + b".log\"\n\n"
           b"log\n--B--\n")
    report = parse_report(raw)
    assert (report.sender_name, report.subject, report.sender) == (name, subject, "user@example.jp")
    assert [a.filename for a in report.attachments] == [subject + ".log"]
    assert report.notes == ()
    # What the store and the CLI write: no lone surrogates anywhere.
    json.loads(report_json(report)).__repr__().encode("utf-8")
    report_json(report).encode("utf-8")


def test_polish_8bit_headers_stay_polish() -> None:
    raw = "From: Łukasz Żółć <l@example.pl>\nSubject: żółć źdźbło\n\nx\n".encode("cp1250")
    report = parse_report(raw)
    assert (report.sender_name, report.subject) == ("Łukasz Żółć", "żółć źdźbło")


def test_gb2312_label_reads_as_gb18030() -> None:
    text = "测试：鍶镕 — 服务器"  # 鍶 and 镕 are GBK/GB18030, not GB2312
    raw = (b"From: a@example.cn\nSubject: =?gb2312?b?" + __import__("base64").b64encode(text.encode("gb18030"))
           + b"?=\nContent-Type: text/plain; charset=gb2312\nContent-Transfer-Encoding: 8bit\n\n"
           + ("Opis: " + text + "\n").encode("gb18030"))
    report = parse_report(raw)
    assert report.subject == text
    assert report.text == "Opis: " + text
    assert "\ufffd" not in report.text and report.notes == ()


def test_iso_2022_jp_with_nec_extensions() -> None:
    # ① (NEC row 13, 0x2D21), Ⅰ (0x2D35), ㈱ (0x2D6A): not in Python's iso2022_jp
    jis = b"\x1b$B-!-5-j%F%9%H\x1b(B"
    raw = (b"From: a@example.jp\nSubject: =?ISO-2022-JP?B?" + __import__("base64").b64encode(jis) + b"?=\n"
           b"Content-Type: text/plain; charset=ISO-2022-JP\nContent-Transfer-Encoding: 7bit\n\n"
           b"Opis: " + jis + b"\n")
    report = parse_report(raw)
    assert report.subject == "①Ⅰ㈱テスト"
    assert report.text == "Opis: ①Ⅰ㈱テスト"
    assert report.notes == ()


def test_shift_jis_label_reads_as_cp932() -> None:
    raw = (b"From: a@example.jp\nSubject: x\nContent-Type: text/plain; charset=Shift_JIS\n\n"
           + "Opis: ①髙﨑\n".encode("cp932"))
    assert parse_report(raw).text == "Opis: ①髙﨑"
