"""Who is looking at the dashboard: a session cookie that an API key was exchanged for at /ui/login, or
development's open mode; and the checks every /ui request passes before its handler.

    outlast_session   HttpOnly, SameSite=Strict (Secure over https): the key's id, an expiry and a nonce, signed
                      with HMAC-SHA256 under OUTLAST_SECRET_KEY as job read tokens are. Never the key itself: the
                      key's tenant and read-only flag are looked up on every request through the API's key cache
                      (server/keycache.py), so revoking the key ends its sessions as it ends its API access.
    csrf              every POST carries a token derived from the session's nonce (a form field, or the
                      X-CSRF-Token header), and an Origin, when sent, that is this server's.

A request without a usable session is sent to /ui/login with the page it asked for; a read-only key's POST
answers 403. Pure ASGI, as server/auth.py is: the event streams under /ui must not be buffered.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Final
from urllib.parse import parse_qsl, quote, urlsplit

import msgspec
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import b64
from server.auth import DEFAULT_TENANT, SCOPE_KEY, Caller
from server.state import Web
from worker import database

log = logging.getLogger("outlast.web")
COOKIE: Final = "outlast_session"
SESSION_TTL_S: Final = 8 * 3600  # a working day: then sign in again
UI_KEY: Final = "outlast.ui"
MAX_FORM_BYTES: Final = 256 * 1024  # a job's input from the form, or a filter
PUBLIC: Final = ("/ui/login", "/ui/static/")
_CONTEXT: Final = b"outlast dashboard session v1\0"
_CSRF_CONTEXT: Final = b"outlast dashboard csrf v1\0"


class Session(msgspec.Struct, frozen=True, array_like=True):
    key_id: str
    expires_at: int  # Unix time
    nonce: str


@dataclass(frozen=True)
class Viewer:
    """A /ui request's caller, as its pages need it."""

    caller: Caller | None  # None: nobody signed in (only /ui/login and the assets)
    csrf: str
    open_mode: bool  # development's open mode: no sign-in, and every page says so

    @property
    def read_only(self) -> bool:
        return self.caller is not None and self.caller.read_only


def sign(secret: bytes, session: Session) -> str:
    payload = msgspec.msgpack.encode(session)
    return f"{b64.encode(payload)}.{b64.encode(hmac.digest(secret, _CONTEXT + payload, 'sha256'))}"


def read(secret: bytes, cookie: str) -> Session | None:
    """The session a cookie this server signed holds, unless it has expired."""
    body, dot, mac = cookie.partition(".")
    if not dot:
        return None
    try:
        payload, signature = b64.decode(body), b64.decode(mac)
    except ValueError:
        return None
    if not hmac.compare_digest(hmac.digest(secret, _CONTEXT + payload, "sha256"), signature):
        return None
    try:
        session = msgspec.msgpack.decode(payload, type=Session)
    except msgspec.DecodeError:
        return None
    return session if session.expires_at > time.time() else None


def new_session(key_id: str) -> Session:
    return Session(key_id, int(time.time()) + SESSION_TTL_S, secrets.token_urlsafe(16))


def csrf_token(secret: bytes, nonce: str) -> str:
    return b64.encode(hmac.digest(secret, _CSRF_CONTEXT + nonce.encode(), "sha256"))


def is_https(scope: Scope, trusted_proxy_hops: int) -> bool:
    if scope.get("scheme") == "https":
        return True
    forwarded = Headers(scope=scope).get("x-forwarded-proto", "")
    return trusted_proxy_hops > 0 and forwarded.split(",")[-1].strip() == "https"


def set_cookie(response: Response, request: Request, value: str, *, max_age: int) -> None:
    web: Web = request.app.state.web
    response.set_cookie(
        COOKIE,
        value,
        max_age=max_age,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=is_https(request.scope, web.config.trusted_proxy_hops),
    )


def safe_next(target: str | None) -> str:
    """Where to go after sign-in: a page of the dashboard, never another site."""
    if not target or not _is_ui(target) or "\\" in target:
        return "/ui/"
    parts = urlsplit(target)
    return "/ui/" if parts.scheme or parts.netloc else target


def viewer_of(request: Request) -> Viewer:
    viewer: Viewer = request.scope[UI_KEY]
    return viewer


def _is_ui(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/")


def _cookie(scope: Scope) -> str | None:
    raw = Headers(scope=scope).get("cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # a malformed Cookie header is no session, not a 500
        return None
    morsel = jar.get(COOKIE)
    return None if morsel is None else morsel.value


class UiAccess:
    """ASGI middleware for /ui: the Viewer in `scope[UI_KEY]` (and its Caller where /v1 handlers look for it), the
    sign-in redirect, the CSRF check and read-only's 403."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_ui(scope["path"]):
            await self.app(scope, receive, send)
            return
        web: Web = scope["app"].state.web
        path, method = scope["path"], scope["method"]
        try:
            viewer = await self._viewer(scope, web)
        except database.UNAVAILABLE:
            await PlainTextResponse("the database is unreachable; retry shortly", 503)(scope, receive, send)
            return
        scope[UI_KEY] = viewer
        if viewer.caller is not None:
            scope[SCOPE_KEY] = viewer.caller
        public = path.startswith(PUBLIC)
        if viewer.caller is None and not public:
            await self._sign_in(scope, receive, send)
            return
        if method in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        body = await _body(receive)
        if body is None:
            await PlainTextResponse("the form is too large", 413)(scope, receive, send)
            return
        refusal = self._refusal(scope, viewer, body)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, replay(body), send)

    async def _viewer(self, scope: Scope, web: Web) -> Viewer:
        secret = web.auth.secret
        cookie = _cookie(scope)
        session = None if cookie is None else read(secret, cookie)
        if session is not None:
            grant = await web.auth.keys.grant_of(web.deps.db, session.key_id)  # cached as an API key is
            if grant is not None:
                caller = Caller(grant.tenant, session.key_id, read_only=grant.read_only)
                return Viewer(caller, csrf_token(secret, session.nonce), open_mode=False)
        if await web.auth.open_now(web.deps.db):
            return Viewer(Caller(DEFAULT_TENANT, None), csrf_token(secret, "open mode"), open_mode=True)
        return Viewer(None, "", open_mode=False)

    async def _sign_in(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path.endswith("/events"):  # an EventSource: it can't follow a redirect to a page; the page reloads
            await PlainTextResponse("sign in again", 401)(scope, receive, send)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        target = path + (f"?{query}" if query else "") if scope["method"] == "GET" else "/ui/"
        await RedirectResponse(f"/ui/login?next={quote(target, safe='/')}", 303)(scope, receive, send)

    def _refusal(self, scope: Scope, viewer: Viewer, body: bytes) -> Response | None:
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is not None and origin != "null" and urlsplit(origin).netloc != headers.get("host", ""):
            return PlainTextResponse("a form of another site may not post here", 403)
        if scope["path"] == "/ui/login":
            return None
        sent = headers.get("x-csrf-token") or dict(parse_qsl(body.decode("latin-1"))).get("csrf", "")
        if not viewer.csrf or not hmac.compare_digest(sent.encode(), viewer.csrf.encode()):
            return PlainTextResponse("the form's CSRF token is missing or stale: reload the page and try again", 403)
        if viewer.read_only and scope["path"] != "/ui/logout":
            return PlainTextResponse("this key is read-only: it may look, not change anything", 403)
        return None


async def _body(receive: Receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay(body: bytes) -> Receive:
    """An ASGI receive that gives `body` as the whole request, then a disconnect: for a handler that reads a body
    already read (the middleware's CSRF check), or one never sent (server/ui/api.py's in-process call)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive
