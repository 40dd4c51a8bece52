"""The web desk as engineers meet it: a real uvicorn server on 127.0.0.1:0 serving the
desk over the database of a running gateway, users made with the real CLI."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import httpx

from gateway import store
from gateway.attachment_store import AttachmentStore
from gateway.config import Config, WebConfig, load_config
from gateway.web.app import create_app
from gateway.web.server import make_server
from tests.conftest import REPORT_BODY, Desk, make_mail

USER, EMAIL, PASSWORD = "anna", "anna.nowak@s4e.pl", "Tajne-hasło-123"
JAN = "jan.kowalski@example.com"
STRANGER = "mallory@evil.example"  # not a participant: what such a sender writes is held
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Clock:
    """A clock the test can move forward (session expiry without sleeping)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> datetime:
        from datetime import timedelta

        return store.utcnow() + timedelta(seconds=self.offset)


@dataclass
class Web:
    url: str
    desk: Desk
    config: Config
    clock: Clock

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        options = {"follow_redirects": False, "timeout": 20, **kwargs}
        return httpx.AsyncClient(base_url=self.url, **options)  # type: ignore[arg-type]


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match, html[:500]
    return match.group(1)


async def add_user(desk: Desk, tmp_path: Path, name: str = USER, email: str = EMAIL,
                   password: str = PASSWORD) -> None:
    secret = tmp_path / f"{name}.password"
    secret.write_text(password + "\n", "utf-8")
    await desk.cli("users", "add", name, "--email", email, "--password-file", str(secret))


async def sign_in(client: httpx.AsyncClient, name: str = USER,
                  password: str = PASSWORD) -> httpx.Response:
    page = await client.get("/login")
    return await client.post("/login", data={"username": name, "password": password,
                                             "csrf": csrf_of(page.text)})


@asynccontextmanager
async def signed_in(web: Web, **kwargs: object) -> AsyncIterator[httpx.AsyncClient]:
    async with web.client(**kwargs) as client:
        response = await sign_in(client)
        assert response.status_code == 303 and response.headers["location"] == "/", response.text
        yield client


async def form_token(client: httpx.AsyncClient, path: str = "/") -> str:
    response = await client.get(path)
    assert response.status_code == 200, (path, response.status_code)
    return csrf_of(response.text)


@asynccontextmanager
async def running_web(desk: Desk, web_config: WebConfig | None = None,
                      clock: Clock | None = None,
                      attachments: AttachmentStore | None = None) -> AsyncIterator[Web]:
    """`s4e-gateway web` in this event loop, on an ephemeral loopback port
    (`attachments`: another attachment store than the configuration's)."""
    config = load_config(desk.config_file)
    if web_config is not None:
        config = replace(config, web=web_config)
    clock = clock or Clock()
    server = make_server(config, create_app(config, clock=clock, attachments=attachments))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60  # a loaded CI machine
        while not (server.started or task.done()) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert server.started, "the web desk did not start"
        yield Web(f"http://127.0.0.1:{port}", desk, config, clock)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()


async def open_ticket(desk: Desk, body: str = REPORT_BODY, subject: str = "Awaria serwera",
                      mid: str = "<r1@example.com>", **kwargs: object) -> str:
    raw = kwargs.pop("raw", None) or make_mail(subject=subject, body=body,
                                               sender=f"Jan Kowalski <{JAN}>", message_id=mid)
    row = await desk.mail(raw, mail_from=JAN)  # type: ignore[arg-type]
    assert row["outcome"] == "new", row
    return row["ticket"]
