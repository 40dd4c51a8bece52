"""Configuration and the command line: one clear line and exit 1 for every mistake."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import tomllib
from pathlib import Path

import pytest

from gateway import cli
from gateway.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_every_config_field_is_documented_in_the_example() -> None:
    example = tomllib.loads(EXAMPLE.read_text("utf-8"))
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        assert section.name in example, f"[{section.name}] missing from config.example.toml"
        documented = set(example[section.name])
        declared = {f.name for f in dataclasses.fields(section.type if isinstance(section.type, type)
                                                       else section.default_factory())}
        assert documented == declared, section.name


def test_example_config_equals_the_built_in_defaults(tmp_path: Path) -> None:
    copy = tmp_path / "config.toml"
    copy.write_text(EXAMPLE.read_text("utf-8"))
    from_file = load_config(copy)
    defaults = load_config(None)
    for name in ("smtp", "addresses", "metrics", "tickets"):
        assert getattr(from_file, name) == getattr(defaults, name), name
    assert from_file.storage.database == tmp_path / "var/gateway.db"
    assert from_file.outbound.maildir == tmp_path / "var/outbox"
    assert dataclasses.replace(from_file.outbound, maildir=defaults.outbound.maildir) == defaults.outbound


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir("/")
    cfg = load_config(write(tmp_path, '[storage]\ndatabase = "data/x.db"\n'))
    assert cfg.storage.database == tmp_path / "data/x.db"
    assert cfg.storage.attachments == tmp_path / "var/attachments"


def test_no_config_means_defaults_under_cwd(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("S4E_GATEWAY_CONFIG", raising=False)
    cfg = load_config(None)
    assert cfg.smtp.listen == "127.0.0.1:2525"
    assert cfg.storage.database == tmp_path / "var/gateway.db"
    assert cfg.addresses.intake == "serwis@s4e.pl" and cfg.addresses.crm == "crm@s4e.pl"


@pytest.mark.parametrize("text, expected", [
    ("[smtp]\nlisten = 2525\n", "smtp.listen: expected a string, got int"),
    ("[smtp]\nlisten = \"localhost\"\n", 'smtp.listen: expected "host:port"'),
    ("[smtp]\nmax_message_size = \"25MB\"\n", "smtp.max_message_size: expected an integer"),
    ("[smtp]\nmax_message_size = -1\n", "smtp.max_message_size: must be positive"),
    ("[smtp]\ntimeout = \"5 minutes\"\n", "smtp.timeout: expected a duration"),
    ("[smtp]\nport = 25\n", "smtp.port: unknown key"),
    ("[smpt]\nlisten = \"x:1\"\n", "smpt: unknown section"),
    ("[addresses]\nintake = \"serwis\"\n", "addresses.intake: not an e-mail address"),
    ("[addresses]\nstaff_domains = \"s4e.pl\"\n", "addresses.staff_domains: expected a list"),
    ("[outbound]\ntransport = \"sendmail\"\n", "outbound.transport: expected one of"),
    ("[outbound]\nstarttls = \"yes\"\n", "outbound.starttls: expected true or false"),
    ("[outbound]\ntransport = \"smtp\"\n", "outbound.relay: required"),
    ("[tickets]\nlanguage = \"de\"\n", "tickets.language: expected one of 'pl', 'en'"),
    ("[tickets]\nreply_policy = \"all\"\n", "tickets.reply_policy: expected one of"),
    ("[tickets]\nclosed_action = \"bounce\"\n", "tickets.closed_action: expected one of"),
    ("[tickets]\nrating_window = \"two weeks\"\n", "tickets.rating_window: expected a duration"),
    ("[smtp]\ntls_cert = \"c.pem\"\n", "smtp.tls_key: tls_cert and tls_key must be set together"),
    ("smtp = 1\n", "smtp: expected a table"),
    ("[smtp\n", "not valid TOML"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, capsys, text, expected) -> None:
    path = write(tmp_path, text)
    code, out, err = run_cli(capsys, "check-config", "--config", str(path))
    assert code == 78  # EX_CONFIG: the unit does not restart on it
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_config_file_is_one_line(tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "check-config", "--config", str(tmp_path / "nope.toml"))
    assert code == 78 and "config file not found" in err and err.count("\n") == 1


def test_config_option_after_the_subcommand_and_from_environment(tmp_path, capsys, monkeypatch) -> None:
    path = write(tmp_path, "[smtp]\nlisten = \"127.0.0.1:2600\"\n")
    assert run_cli(capsys, "--config", str(path), "check-config")[0] == 0
    code, out, _ = run_cli(capsys, "check-config", "--config", str(path))
    assert code == 0 and str(path) in out
    monkeypatch.setenv("S4E_GATEWAY_CONFIG", str(path))
    code, out, _ = run_cli(capsys, "check-config")
    assert code == 0 and str(path) in out


def test_check_config_warns_about_risky_settings(tmp_path, capsys) -> None:
    path = write(tmp_path, '[smtp]\nlisten = "0.0.0.0:25"\n[outbound]\nrelay = "mail.example.com:25"\n')
    code, out, err = run_cli(capsys, "check-config", "--config", str(path))
    assert code == 0
    assert "smtp.listen" in err and "outbound.starttls" in err


def test_usage_error_is_one_line_exit_1(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["tickets-typo"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice" in err


# --- migrations ------------------------------------------------------------------

def test_migrate_creates_then_reports_up_to_date(tmp_path, capsys) -> None:
    path = write(tmp_path, "")
    code, out, _ = run_cli(capsys, "migrate", "--config", str(path))
    assert code == 0 and "applied 0001_initial.sql" in out
    code, out, _ = run_cli(capsys, "migrate", "--config", str(path))
    assert code == 0 and "up to date" in out
    db = sqlite3.connect(tmp_path / "var/gateway.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT max(version) FROM schema_version").fetchone()[0] >= 1
    db.close()


def test_database_newer_than_the_code_is_refused(tmp_path, capsys) -> None:
    path = write(tmp_path, "")
    assert run_cli(capsys, "migrate", "--config", str(path))[0] == 0
    db = sqlite3.connect(tmp_path / "var/gateway.db")
    db.execute("INSERT INTO schema_version VALUES (999, '0999_future.sql', 'x')")
    db.commit()
    db.close()
    for argv in (["migrate"], ["inbox", "list"]):
        code, _, err = run_cli(capsys, *argv, "--config", str(path))
        assert code == 1 and "newer than this gateway" in err and err.count("\n") == 1


def test_failed_migration_leaves_nothing_half_done(tmp_path) -> None:
    import asyncio

    from gateway import store

    async def scenario() -> None:
        conn = await store.connect(tmp_path / "x.db")
        await conn.execute("CREATE TABLE settings (key TEXT)")  # clashes with 0001
        with pytest.raises(sqlite3.OperationalError):
            await store.migrate(conn)
        assert await store.schema_version(conn) == 0
        rows = await conn.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE name = 'inbound'")
        assert rows == []
        await conn.close()

    asyncio.run(scenario())


def test_inbox_list_without_database_is_one_line(tmp_path, capsys) -> None:
    path = write(tmp_path, "")
    code, _, err = run_cli(capsys, "inbox", "list", "--config", str(path))
    assert code == 1 and "no database yet" in err


def test_inbox_list_json_shape(tmp_path, capsys) -> None:
    path = write(tmp_path, "")
    run_cli(capsys, "migrate", "--config", str(path))
    db = sqlite3.connect(tmp_path / "var/gateway.db")
    db.execute("INSERT INTO inbound (message_id, dedup_key, sha256, size, peer, mail_from, rcpt_tos,"
               " received_at) VALUES ('<a@b>', 'k', 's', 3, 'p', 'x@y.pl', '[\"serwis@s4e.pl\"]', 't')")
    db.commit()
    db.close()
    code, out, _ = run_cli(capsys, "inbox", "list", "--json", "--config", str(path))
    assert code == 0
    assert json.loads(out) == [{"id": 1, "message_id": "<a@b>", "mail_from": "x@y.pl",
                                "rcpt_tos": ["serwis@s4e.pl"], "received_at": "t", "size": 3,
                                "outcome": None, "ticket": None}]


@pytest.mark.parametrize("text, expected", [
    ('[smtp]\ntls_cert = "missing.pem"\ntls_key = "missing.key"\n', "smtp.tls_cert: "),
    ('[outbound]\nrelay = "127.0.0.1:25"\nusername = "u"\npassword_file = "nope"\n',
     "outbound.password_file: "),
    ('[tickets]\ncontracts = "nope.csv"\n', "tickets.contracts: "),
    ('[smtp]\nlmtp_socket = "no-such-dir/lmtp.sock"\n', "smtp.lmtp_socket: folder"),
])
def test_check_config_checks_the_files_it_names(tmp_path, capsys, text, expected) -> None:
    code, _, err = run_cli(capsys, "check-config", "--config", str(write(tmp_path, text)))
    assert code == 78 and expected in err and err.count("\n") == 1


def test_serve_names_the_key_it_cannot_bind(tmp_path, capsys) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write(tmp_path, f'[smtp]\nlisten = "127.0.0.1:{port}"\n')
        code, _, err = run_cli(capsys, "serve", "--config", str(path))
    assert code == 78 and f"smtp.listen: cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err


async def test_one_daemon_per_database(tmp_path) -> None:
    from gateway.daemon import Gateway
    from gateway.errors import ConfigError

    config = load_config(write(tmp_path, '[smtp]\nlisten = "127.0.0.1:0"\n'))
    first = Gateway(config)
    await first.start(port=0)
    try:
        with pytest.raises(ConfigError, match="in use by another running gateway"):
            await Gateway(config).start(port=0)
    finally:
        await first.stop(grace=1)


def test_inbox_outcome_is_checked(tmp_path, capsys) -> None:
    path = write(tmp_path, "")
    run_cli(capsys, "migrate", "--config", str(path))
    code, _, err = run_cli(capsys, "inbox", "list", "--outcome", "bogus", "--config", str(path))
    assert code == 1 and "unknown outcome 'bogus'" in err


def test_customer_text_cannot_drive_the_operators_terminal() -> None:
    assert cli.printable("Jan \x1b[8mNiewidzialny\x07\n") == "Jan \ufffd[8mNiewidzialny\ufffd\n"


def test_bidi_overrides_cannot_reorder_the_operators_terminal() -> None:
    assert cli.printable("Faktura \u202egpj.exe \u2066x\u2069") == "Faktura \ufffdgpj.exe \ufffdx\ufffd"
