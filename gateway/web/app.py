"""The engineers' web desk (SPEC §11): a Starlette app over the gateway's database.

Every page needs a session (else 303 to /login); every POST carries the session's CSRF
token; every action calls the same `staff` / `stages` functions as the CLI, so a
reply from the browser is the same mail as one from `tickets reply`. Each request has
its own SQLite connection: reads are WAL readers and never wait for the daemon; the
few writes wait at most busy_timeout. The desk wakes no mailer: the daemon's mailer
notices the commit (PRAGMA data_version) within about 50 ms.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiosqlite
import jinja2
from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import context, staff, store
from gateway.attachment_store import AttachmentStore, attachment_store
from gateway.attachments import AttachmentMissing
from gateway.config import Config, parse_duration
from gateway.errors import GatewayError, NotFoundError, TransitionError
from gateway.model import FIELD_NAMES, TRANSITIONS, HeldStatus, OutAttachment, OutboxStatus, Status
from gateway.store import AttachmentRow
from gateway.web import accounts, queries
from gateway.web.accounts import Session
from gateway.web.i18n import WORDS, Language

log = logging.getLogger(__name__)

SESSION_COOKIE = "s4e_session"
LOGIN_COOKIE = "s4e_login"  # double-submit CSRF token of the sign-in form
TEXT_VIEW_LIMIT = 1024 * 1024  # a log shown in the browser: its first MiB
MAX_REQUEST = 3 * staff.MAX_STAFF_ATTACHMENT  # a reply with its attachments
MAX_FILES = 10
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
DONE_MESSAGES = {"status", "reply", "note", "assign", "phone", "field", "release", "drop",
                 "retry"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def templates_folder() -> Path:
    return Path(str(resources.files("gateway.templates"))) / "web"


class SecurityHeaders:
    """Pure ASGI middleware: CSP and friends on every response; no caching of pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", [])
                           if h[0].lower() not in {n for n, _ in SECURITY_HEADERS}]
                headers += SECURITY_HEADERS
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclass(frozen=True, slots=True)
class Signed:
    """The request's user, and a fresh session token to set when SSO just signed in."""

    session: Session
    new_token: str | None = None


Handler = Callable[[Request, "Desk", Session, aiosqlite.Connection, FormData | None],
                   Awaitable[Response]]


class Desk:
    """The app's state: config, templates, language, clock."""

    def __init__(self, config: Config, clock: Callable[[], datetime] = store.utcnow,
                 attachments: AttachmentStore | None = None) -> None:
        self.config = config
        self.clock = clock
        self.attachments = attachments or attachment_store(config)
        self.lang = Language(config.tickets.language, config.tickets.timezone)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(templates_folder()), autoescape=True,
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.globals.update(self.lang.helpers(), lang=self.lang.code, words=WORDS)
        self.env.filters["addresses"] = ", ".join
        self.lifetime = parse_duration(config.web.session_lifetime)
        self.window = parse_duration(config.web.login_window)
        self.proxies = tuple(ipaddress.ip_network(p, strict=False)
                             for p in config.web.trusted_proxies)

    @asynccontextmanager
    async def db(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = await store.connect(self.config.storage.database)
        try:
            yield conn
        finally:
            await conn.close()

    def render(self, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(name).render(**context),
                            status_code=status_code)

    def page(self, name: str, session: Session, status_code: int = 200,
             **context: Any) -> HTMLResponse:
        return self.render(name, status_code, user=session.user, csrf=session.csrf, **context)

    def cookie(self, response: Response, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True,
                            samesite="strict", secure=self.config.web.secure_cookies)

    # --- who is asking ---------------------------------------------------------------

    def from_proxy(self, request: Request) -> bool:
        peer = request.client.host if request.client else ""
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.proxies)

    def client_address(self, request: Request) -> str:
        """The peer, or behind a trusted proxy the client it names (last hop)."""
        peer = request.client.host if request.client else "?"
        forwarded = request.headers.get("x-forwarded-for", "")
        if forwarded and self.from_proxy(request):
            return forwarded.rsplit(",", 1)[-1].strip()[:64] or peer
        return peer

    async def signed_in(self, request: Request, conn: aiosqlite.Connection) -> Signed | None:
        now = self.clock()
        token = request.cookies.get(SESSION_COOKIE, "")
        session = await accounts.find_session(conn, token, now) if token else None
        header = self.config.web.remote_user_header
        remote = request.headers.get(header, "").strip().lower() if header else ""
        if not remote:
            return Signed(session) if session else None
        if not self.from_proxy(request):
            log.warning("%s header from %s ignored: not a trusted proxy", header,
                        request.client.host if request.client else "?")
            return Signed(session) if session else None
        if session and session.user.name == remote:
            return Signed(session)
        user = await accounts.get_user(conn, remote)
        if user is None:
            log.warning("%s names %r: no such user (add it with `users add`)", header, remote)
            return None
        new_token = await accounts.start_session(conn, user, self.lifetime, now)
        fresh = await accounts.find_session(conn, new_token, now)
        return Signed(fresh, new_token) if fresh else None

    # --- the wrapper every page goes through ---------------------------------------------

    def guarded(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            async with self.db() as conn:
                signed = await self.signed_in(request, conn)
                if signed is None:
                    return RedirectResponse("/login", status_code=303)
                form = None
                if request.method == "POST":
                    form = await self.read_form(request)
                    if form is None:
                        return self.page("error.html.j2", signed.session, 413,
                                         message=self.lang.t("not_done"),
                                         reason=f"> {MAX_REQUEST // 2**20} MiB")
                    sent = form.get("csrf")
                    if not isinstance(sent, str) or not hmac.compare_digest(
                            sent.encode(), signed.session.csrf.encode()):
                        return self.page("error.html.j2", signed.session, 403,
                                         message=self.lang.t("bad_csrf"), reason="")
                try:
                    response = await handler(request, self, signed.session, conn, form)
                except GatewayError as err:
                    code = (404 if isinstance(err, NotFoundError) else
                            409 if isinstance(err, TransitionError) else 400)
                    response = self.page("error.html.j2", signed.session, code,
                                         message=self.lang.t("not_done"), reason=str(err))
                if signed.new_token:
                    self.cookie(response, SESSION_COOKIE, signed.new_token, self.lifetime)
                return response

        return endpoint

    async def read_form(self, request: Request) -> FormData | None:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_REQUEST:
            return None
        try:
            return await request.form(max_files=MAX_FILES, max_fields=50,
                                      max_part_size=staff.MAX_STAFF_ATTACHMENT)
        except HTTPException:
            return FormData()


# --- sign-in ------------------------------------------------------------------------

async def login_page(request: Request) -> Response:
    desk: Desk = request.app.state.desk
    async with desk.db() as conn:
        if await desk.signed_in(request, conn):
            return RedirectResponse("/", status_code=303)
    return login_form(desk, request)


def login_form(desk: Desk, request: Request, status_code: int = 200, error: str = "",
               username: str = "") -> Response:
    token = request.cookies.get(LOGIN_COOKIE, "")
    if not re.fullmatch(r"[A-Za-z0-9_-]{40,64}", token):
        token = secrets.token_urlsafe(32)
    response = desk.render("login.html.j2", status_code, user=None, csrf=token, error=error,
                           username=username)
    desk.cookie(response, LOGIN_COOKIE, token, 3600)
    return response


async def login_submit(request: Request) -> Response:
    desk: Desk = request.app.state.desk
    form = await desk.read_form(request) or FormData()
    sent, expected = form.get("csrf"), request.cookies.get(LOGIN_COOKIE, "")
    if not (isinstance(sent, str) and expected
            and hmac.compare_digest(sent.encode(), expected.encode())):
        return login_form(desk, request, 403, desk.lang.t("bad_csrf"))
    username = str(form.get("username") or "").strip().lower()
    password = str(form.get("password") or "")
    client = desk.client_address(request)
    limit, window = desk.config.web.login_attempts, desk.window
    async with desk.db() as conn:
        now = desk.clock()
        if await accounts.sign_in_blocked(conn, username, client, limit=limit, window=window,
                                          now=now):
            log.warning("sign-in refused for %r from %s: too many failures", username, client)
            return login_form(desk, request, 429, desk.lang.t("too_many"), username)
        password_hash = await accounts.password_hash_of(conn, username)
        ok = await asyncio.to_thread(accounts.password_matches, password_hash, password)
        user = await accounts.get_user(conn, username) if ok else None
        if user is None:
            await accounts.record_failure(conn, username, client, now)
            log.warning("sign-in failed for %r from %s", username, client)
            return login_form(desk, request, 401, desk.lang.t("bad_login"), username)
        await accounts.forget_failures(conn, username, now, window)
        token = await accounts.start_session(conn, user, desk.lifetime, now)
    log.info("%s signed in from %s", user.name, client)
    response = RedirectResponse("/", status_code=303)
    desk.cookie(response, SESSION_COOKIE, token, desk.lifetime)
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


async def logout(request: Request, desk: Desk, session: Session, conn: aiosqlite.Connection,
                 form: FormData | None) -> Response:
    await accounts.end_session(conn, request.cookies.get(SESSION_COOKIE, ""))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# --- tickets ------------------------------------------------------------------------

async def attention(request: Request, desk: Desk, session: Session, conn: aiosqlite.Connection,
                    form: FormData | None) -> Response:
    after = None
    if request.query_params.get("after"):
        after = (request.query_params.get("since", ""), ticket_param(request))
    items = await queries.attention_page(conn, after=after, limit=LIST_PAGE + 1)
    more = len(items) > LIST_PAGE
    items = items[:LIST_PAGE]
    next_url = page_url("/", since=items[-1].since,
                        after=f"{items[-1].ticket.number:06d}") if more else ""
    return desk.page("attention.html.j2", session, items=items,
                     first_url="/" if after is not None else "", next_url=next_url)


async def ticket_list(request: Request, desk: Desk, session: Session,
                      conn: aiosqlite.Connection, form: FormData | None) -> Response:
    status = request.query_params.get("status", "")
    query = request.query_params.get("q", "")[:200]
    if status and status not in {s.value for s in Status}:
        status = ""
    after = None
    if request.query_params.get("after"):
        last = ticket_param(request)
        after = await store.ticket_cursor(conn, last)
        if after is None:
            raise NotFoundError(f"ticket #{last:06d} not found")
    error, tickets, more = "", list[store.TicketRow](), False
    try:
        listed = await staff.find_tickets(conn, search=query if query.strip() else None,
                                          status=status or None, after=after,
                                          limit=LIST_PAGE + 1)
        more = len(listed) > LIST_PAGE
        tickets = [item.ticket for item in listed[:LIST_PAGE]]
    except GatewayError as err:
        error = str(err)
    number = query.strip().lstrip("#")
    if after is None and len(number) == 6 and number.isdigit():  # not in the index
        found = await store.get_ticket(conn, int(number))
        if (found and (not status or found.status == status)
                and found.number not in {t.number for t in tickets}):
            tickets.insert(0, found)
    next_url = page_url("/tickets", status=status, q=query,
                        after=f"{tickets[-1].number:06d}") if more else ""
    return desk.page("tickets.html.j2", session, tickets=tickets, status=status, q=query,
                     statuses=[s.value for s in Status], error=error,
                     first_url=page_url("/tickets", status=status, q=query) if after else "",
                     next_url=next_url)


# --- pages of a list: `?after=` the last row of the previous page ------------------------

LIST_PAGE = 50  # rows per page of every list


def ticket_param(request: Request) -> int:
    """?after=NNNNNN: the ticket the previous page ended with."""
    return staff.parse_number(request.query_params.get("after", ""))


def id_param(request: Request) -> int | None:
    """?after=ID: the row id the previous page ended with (None: the first page)."""
    value = request.query_params.get("after", "")
    if not value:
        return None
    if not (value.isascii() and value.isdigit()):
        raise GatewayError(f"not a row id: {value[:40]!r}")
    return int(value)


def page_url(path: str, **params: str) -> str:
    given = {name: value for name, value in params.items() if value}
    return f"{path}?{urlencode(given)}" if given else path


def number_of(request: Request) -> int:
    try:
        return staff.parse_number(request.path_params["number"])
    except GatewayError as err:
        raise NotFoundError(str(err)) from None


async def ticket_page(request: Request, desk: Desk, session: Session,
                      conn: aiosqlite.Connection, form: FormData | None) -> Response:
    ticket = await staff.require_ticket(conn, number_of(request))
    done = request.query_params.get("done", "")
    return desk.page(
        "ticket.html.j2", session, ticket=ticket,
        messages=await store.ticket_thread(conn, ticket.number),
        history=await store.ticket_history(conn, ticket.number),
        attachments=await store.ticket_attachments(conn, ticket.number),
        # in the order of the procedure: closing, final, comes last (never preselected)
        targets=[s.value for s in Status if s in TRANSITIONS[Status(ticket.status)]],
        fields=FIELD_NAMES,
        done=done if done in DONE_MESSAGES else "", viewable=viewable)


def done(number: int, what: str) -> Response:
    return RedirectResponse(f"/tickets/{number:06d}?done={what}", status_code=303)


def text_field(form: FormData | None, name: str) -> str:
    value = form.get(name) if form is not None else None
    return value if isinstance(value, str) else ""


async def ticket_status(request: Request, desk: Desk, session: Session,
                        conn: aiosqlite.Connection, form: FormData | None) -> Response:
    number = number_of(request)
    note = text_field(form, "note").strip() or None
    ctx = await context.make_context(conn, desk.config, attachments=desk.attachments)
    await staff.set_status(conn, ctx, number, text_field(form, "status"), note,
                           actor=session.user.email)
    return done(number, "status")


async def uploaded(form: FormData | None) -> list[OutAttachment]:
    files = []
    for item in form.getlist("attachments") if form is not None else []:
        if not isinstance(item, UploadFile) or not item.filename:
            continue  # an empty file input
        data = await item.read()
        if len(data) > staff.MAX_STAFF_ATTACHMENT:
            raise GatewayError(f"{item.filename}: larger than "
                               f"{staff.MAX_STAFF_ATTACHMENT // 2**20} MiB")
        name = Path(item.filename.replace("\\", "/")).name
        files.append(OutAttachment(name, item.content_type or "application/octet-stream",
                                   data))
    return files


async def ticket_reply(request: Request, desk: Desk, session: Session,
                       conn: aiosqlite.Connection, form: FormData | None) -> Response:
    number = number_of(request)
    files = await uploaded(form)
    ctx = await context.make_context(conn, desk.config, attachments=desk.attachments)
    await staff.reply(conn, ctx, number, text_field(form, "text").replace("\r\n", "\n"), files,
                      actor=session.user.email)
    return done(number, "reply")


async def ticket_confirm_phone(request: Request, desk: Desk, session: Session,
                               conn: aiosqlite.Connection, form: FormData | None) -> Response:
    number = number_of(request)
    ctx = await context.make_context(conn, desk.config, attachments=desk.attachments)
    await staff.confirm_phone(conn, ctx, number, actor=session.user.email)
    return done(number, "phone")


async def ticket_note(request: Request, desk: Desk, session: Session,
                      conn: aiosqlite.Connection, form: FormData | None) -> Response:
    number = number_of(request)
    ctx = await context.make_context(conn, desk.config, attachments=desk.attachments)
    await staff.add_note(conn, ctx, number, text_field(form, "text").replace("\r\n", "\n"),
                         actor=session.user.email)
    return done(number, "note")


async def ticket_assign(request: Request, desk: Desk, session: Session,
                        conn: aiosqlite.Connection, form: FormData | None) -> Response:
    number = number_of(request)
    ctx = await context.make_context(conn, desk.config, attachments=desk.attachments)
    await staff.assign(conn, ctx, number, text_field(form, "engineer"), actor=session.user.email)
    return done(number, "assign")


async def ticket_field(request: Request, desk: Desk, session: Session,
                       conn: aiosqlite.Connection, form: FormData | None) -> Response:
    number = number_of(request)
    ctx = await context.make_context(conn, desk.config, attachments=desk.attachments)
    await staff.set_field(conn, ctx, number, text_field(form, "field"),
                          text_field(form, "value"), actor=session.user.email)
    return done(number, "field")


# --- attachments and messages ----------------------------------------------------------

def viewable(attachment: AttachmentRow) -> bool:
    name = attachment.filename.lower()
    return (attachment.content_type.startswith("text/")
            or name.endswith((".log", ".txt", ".csv", ".xml", ".json")))


def download_headers(filename: str) -> dict[str, str]:
    fallback = _UNSAFE_NAME.sub("_", filename).strip("._") or "attachment"
    return {"content-disposition": f"attachment; filename=\"{fallback}\"; "
                                   f"filename*=UTF-8''{quote(filename, safe='')}",
            "x-content-type-options": "nosniff"}


async def attachment(request: Request, desk: Desk, session: Session,
                     conn: aiosqlite.Connection, form: FormData | None) -> Response:
    number = number_of(request)
    sha256 = request.path_params["sha256"].lower()
    row = await queries.ticket_attachment(conn, number, sha256) if _SHA256.match(sha256) else None
    if row is None:
        raise NotFoundError(f"ticket #{number:06d} has no attachment {sha256[:64]}")
    try:
        data = await desk.attachments.load(conn, sha256)
    except AttachmentMissing as err:
        log.error("ticket #%06d: %s", number, err)
        raise NotFoundError(f"ticket #{number:06d}: {err}") from None
    if request.query_params.get("view") == "text" and viewable(row):
        return desk.page("text.html.j2", session, number=number, attachment=row,
                         text=data[:TEXT_VIEW_LIMIT].decode("utf-8", "replace"),
                         truncated=len(data) > TEXT_VIEW_LIMIT)
    return Response(data, media_type="application/octet-stream",
                    headers=download_headers(row.filename))


async def inbound_page(request: Request, desk: Desk, session: Session,
                       conn: aiosqlite.Connection, form: FormData | None) -> Response:
    message = await staff.inbound_json(conn, int(request.path_params["id"]),
                                       desk.attachments)
    return desk.page("inbound.html.j2", session, message=message)


async def inbound_raw(request: Request, desk: Desk, session: Session,
                      conn: aiosqlite.Connection, form: FormData | None) -> Response:
    inbound_id = int(request.path_params["id"])
    if await store.get_inbound(conn, inbound_id) is None:
        raise NotFoundError(f"inbound message {inbound_id} not found")
    raw = await store.read_raw(conn, inbound_id, desk.attachments)
    return Response(raw, media_type="application/octet-stream",
                    headers=download_headers(f"inbound-{inbound_id}.eml"))


# --- held and outbox --------------------------------------------------------------------

async def held_list(request: Request, desk: Desk, session: Session,
                    conn: aiosqlite.Connection, form: FormData | None) -> Response:
    after = id_param(request)
    rows = await store.list_held(conn, HeldStatus.HELD, after=after, limit=LIST_PAGE + 1)
    next_url = (page_url("/held", after=str(rows[LIST_PAGE - 1].id))
                if len(rows) > LIST_PAGE else "")
    return desk.page("held.html.j2", session, rows=rows[:LIST_PAGE],
                     done=request.query_params.get("done", ""),
                     first_url="/held" if after is not None else "", next_url=next_url)


async def held_page(request: Request, desk: Desk, session: Session,
                    conn: aiosqlite.Connection, form: FormData | None) -> Response:
    held = await staff.require_held(conn, int(request.path_params["id"]))
    message = await staff.inbound_json(conn, held.inbound_id,
                                       desk.attachments)
    return desk.page("held_one.html.j2", session, held=held, message=message)


async def held_release(request: Request, desk: Desk, session: Session,
                       conn: aiosqlite.Connection, form: FormData | None) -> Response:
    held_id = int(request.path_params["id"])
    new_ticket = text_field(form, "new_ticket") == "1"
    ctx = await context.make_context(conn, desk.config, attachments=desk.attachments)
    result = await staff.release_held(conn, ctx, held_id, new_ticket=new_ticket,
                                         actor=session.user.email)
    # Released mail always lands in a ticket: the checks that only store (own mail,
    # automatic) decided before the hold, and a release is never a duplicate.
    assert result.ticket is not None
    log.info("held %d released into #%06d by %s", held_id, result.ticket, session.user.email)
    return done(result.ticket, "release")


async def held_drop(request: Request, desk: Desk, session: Session,
                    conn: aiosqlite.Connection, form: FormData | None) -> Response:
    held_id = int(request.path_params["id"])
    await staff.drop_held(conn, held_id, desk.clock(), actor=session.user.email)
    log.info("held %d dropped by %s", held_id, session.user.email)
    return RedirectResponse("/held?done=drop", status_code=303)


async def outbox_page(request: Request, desk: Desk, session: Session,
                      conn: aiosqlite.Connection, form: FormData | None) -> Response:
    after = id_param(request)
    rows = await store.list_outbox(conn, statuses=(OutboxStatus.FAILED, OutboxStatus.BOUNCED),
                                   after=after, limit=LIST_PAGE + 1)
    next_url = (page_url("/outbox", after=str(rows[LIST_PAGE - 1].id))
                if len(rows) > LIST_PAGE else "")
    return desk.page("outbox.html.j2", session, rows=rows[:LIST_PAGE],
                     done=request.query_params.get("done", ""),
                     first_url="/outbox" if after is not None else "", next_url=next_url)


async def outbox_retry(request: Request, desk: Desk, session: Session,
                       conn: aiosqlite.Connection, form: FormData | None) -> Response:
    outbox_id = int(request.path_params["id"])
    await staff.retry_mail(conn, outbox_id, desk.clock())
    log.info("outbox %d queued again by %s", outbox_id, session.user.email)
    return RedirectResponse("/outbox?done=retry", status_code=303)


async def stylesheet(request: Request) -> Response:
    return FileResponse(templates_folder() / "static" / "desk.css", media_type="text/css")


async def not_found(request: Request, exc: Exception) -> Response:
    desk: Desk = request.app.state.desk
    return desk.render("error.html.j2", 404, user=None, csrf="",
                       message=desk.lang.t("not_found"), reason="")


def create_app(config: Config, *, clock: Callable[[], datetime] = store.utcnow,
               attachments: AttachmentStore | None = None) -> ASGIApp:
    """`attachments`: another attachment store than the configuration's (tests)."""
    desk = Desk(config, clock, attachments)
    g = desk.guarded
    routes: Sequence[Route] = [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route("/logout", g(logout), methods=["POST"]),
        Route("/static/desk.css", stylesheet, methods=["GET"]),
        Route("/", g(attention), methods=["GET"]),
        Route("/tickets", g(ticket_list), methods=["GET"]),
        Route("/tickets/{number}", g(ticket_page), methods=["GET"]),
        Route("/tickets/{number}/status", g(ticket_status), methods=["POST"]),
        Route("/tickets/{number}/reply", g(ticket_reply), methods=["POST"]),
        Route("/tickets/{number}/confirm-phone", g(ticket_confirm_phone), methods=["POST"]),
        Route("/tickets/{number}/note", g(ticket_note), methods=["POST"]),
        Route("/tickets/{number}/assign", g(ticket_assign), methods=["POST"]),
        Route("/tickets/{number}/field", g(ticket_field), methods=["POST"]),
        Route("/tickets/{number}/attachments/{sha256}", g(attachment), methods=["GET"]),
        Route("/held", g(held_list), methods=["GET"]),
        Route("/held/{id:int}", g(held_page), methods=["GET"]),
        Route("/held/{id:int}/release", g(held_release), methods=["POST"]),
        Route("/held/{id:int}/drop", g(held_drop), methods=["POST"]),
        Route("/inbox/{id:int}", g(inbound_page), methods=["GET"]),
        Route("/inbox/{id:int}/raw", g(inbound_raw), methods=["GET"]),
        Route("/outbox", g(outbox_page), methods=["GET"]),
        Route("/outbox/{id:int}/retry", g(outbox_retry), methods=["POST"]),
    ]
    app = Starlette(routes=list(routes), exception_handlers={404: not_found})
    app.state.desk = desk
    return SecurityHeaders(app)
