"""`users add/list/remove`, `web` as its own process, and the [web] config keys."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import Desk, run_cli_sync, run_sql, write_config
from tests.webdesk import EMAIL, PASSWORD, USER, add_user, running_web, sign_in

BOTH_DATABASES = True  # conftest: every test here on SQLite and on PostgreSQL


async def test_users_add_list_remove(desk: Desk, tmp_path: Path) -> None:
    await add_user(desk, tmp_path)
    users = await desk.cli_json("users", "list")
    assert users == [{"name": USER, "email": EMAIL, "created_at": users[0]["created_at"]}]
    _, out, _ = await desk.cli("users", "list")
    assert USER in out and EMAIL in out
    ((stored,),) = run_sql(desk.db, "SELECT password_hash FROM users")
    assert stored.startswith("$argon2id$") and PASSWORD not in stored

    async with running_web(desk) as web:
        async with web.client() as client:
            assert (await sign_in(client)).status_code == 303
            assert (await client.get("/")).status_code == 200
            _, out, _ = await desk.cli("users", "remove", USER)
            assert "1 signed-in session(s) ended" in out
            response = await client.get("/")  # removed: the session is gone at once
            assert (response.status_code, response.headers["location"]) == (303, "/login")
            assert (await sign_in(client)).status_code == 401
    assert await desk.cli_json("users", "list") == []


@pytest.mark.parametrize("argv, password, message", [
    (["users", "add", "Anna Nowak", "--email", EMAIL], PASSWORD, "not a user name"),
    (["users", "add", "anna", "--email", "anna@example.com"], PASSWORD, "is not a staff address"),
    (["users", "add", "anna", "--email", "anna"], PASSWORD, "not an e-mail address"),
    (["users", "add", "anna", "--email", EMAIL], "krótkie", "the password is too short"),
    (["users", "remove", "nikt"], None, "user 'nikt' not found"),
])
async def test_users_errors_are_one_line(desk: Desk, tmp_path: Path, argv: list[str],
                                         password: str | None, message: str) -> None:
    if password is not None:
        (tmp_path / "pw").write_text(password, "utf-8")
        argv = [*argv, "--password-file", str(tmp_path / "pw")]
    code, out, err = await desk.cli(*argv, ok=False)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


async def test_user_names_are_unique_and_password_file_must_exist(desk: Desk,
                                                                  tmp_path: Path) -> None:
    await add_user(desk, tmp_path)
    code, _, err = await desk.cli("users", "add", USER, "--email", EMAIL, "--password-file",
                                  str(tmp_path / f"{USER}.password"), ok=False)
    assert code == 1 and "exists already" in err
    code, _, err = await desk.cli("users", "add", "ewa", "--email", "ewa@s4e.pl",
                                  "--password-file", str(tmp_path / "nope"), ok=False)
    assert code == 1 and "password file not found" in err


def test_web_keys_are_checked_by_name(tmp_path: Path) -> None:
    cases = [
        ('[web]\nlisten = "8080"\n', "web.listen:"),
        ('[web]\nremote_user_header = "X-Remote-User"\n', "web.trusted_proxies: required"),
        ('[web]\ntrusted_proxies = ["proxy.example"]\n', "web.trusted_proxies: not an IP"),
        ('[web]\nremote_user_header = "X User"\ntrusted_proxies = ["127.0.0.1"]\n',
         "web.remote_user_header: not a header name"),
        ('[web]\nsession_lifetime = "forever"\n', "web.session_lifetime:"),
        ('[web]\nlogin_attempts = 0\n', "web.login_attempts: must be positive"),
        ('[web]\nsecure_cookies = "yes"\n', "web.secure_cookies: expected true or false"),
        ('[web]\nport = 80\n', "web.port: unknown key"),
    ]
    for text, message in cases:
        path = tmp_path / "bad.toml"
        path.write_text(text)
        code, _, err = run_cli_sync("check-config", "--config", str(path))
        assert code == 78 and message in err, (text, err)  # EX_CONFIG
    path = tmp_path / "public.toml"
    path.write_text('[web]\nlisten = "0.0.0.0:8080"\n')
    code, _, err = run_cli_sync("check-config", "--config", str(path))
    assert code == 0 and "web.listen: 0.0.0.0:8080 is not a loopback address" in err


def test_web_with_a_bad_config_exits_78(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[web]\nlisten = "nowhere"\n')
    code, _, err = run_cli_sync("web", "--config", str(path))
    assert code == 78 and "web.listen" in err and "Traceback" not in err


@pytest.mark.sqlite_only  # no SQLite file yet; for PostgreSQL see the next test
def test_web_without_a_database_is_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    code, _, err = run_cli_sync("web", "--config", str(path))
    assert code == 1 and "no database yet" in err and "Traceback" not in err


@pytest.mark.sqlite_only  # runs once: it names its own (unreachable) PostgreSQL
@pytest.mark.parametrize("argv", [("web",), ("tickets", "list"), ("migrate",)])
def test_an_unreachable_postgresql_is_one_line(tmp_path: Path, argv: tuple[str, ...]) -> None:
    url = f"postgresql://s4e:secret@127.0.0.1:{_free_port()}/gw"  # nothing listens there
    path = tmp_path / "gw.toml"
    path.write_text(f'[storage]\ndatabase = "{url}"\nattachments = "{tmp_path}/att"\n')
    code, out, err = run_cli_sync(*argv, "--config", str(path))
    assert code == 1 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert "cannot connect to PostgreSQL" in err and "127.0.0.1" in err
    assert "secret" not in err  # the password never reaches a log or a terminal


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_web_runs_as_its_own_process_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    path = write_config(tmp_path, f'[web]\nlisten = "127.0.0.1:{port}"\n')
    code, _, err = await asyncio.to_thread(run_cli_sync, "migrate", "--config", str(path))
    assert code == 0, err
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    process = subprocess.Popen([sys.executable, "-m", "gateway", "web", "--config", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        def fetch(path: str) -> tuple[int, str]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
            opener = urllib.request.build_opener(_NoRedirect)
            try:
                with opener.open(request, timeout=30) as response:  # a loaded CI machine
                    return response.status, response.headers.get("location", "")
            except urllib.error.HTTPError as err:
                return err.code, err.headers.get("location", "")

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60  # the process starting on a loaded CI machine
        while loop.time() < deadline:
            try:
                status = await asyncio.to_thread(fetch, "/login")
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"web desk did not answer: {process.stderr.read1().decode()}")
        assert status == (200, "")
        assert await asyncio.to_thread(fetch, "/tickets") == (303, "/login")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=15)
    assert process.returncode == 0, stderr.decode()
    assert f"web desk listening on http://127.0.0.1:{port}/" in stderr.decode()




class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None
