"""/ui/login and /ui/logout: an API key exchanged for a session cookie (server/ui/session.py), and given back.

The key arrives in a POST body only, is checked as the API checks it (the key cache, the same failure throttle per
address), and is never stored, logged or shown again: the cookie holds its id."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from server.auth import client_address
from server.state import web_of
from server.ui.actions import form_of
from server.ui.render import page
from server.ui.session import COOKIE, SESSION_TTL_S, new_session, safe_next, set_cookie, sign, viewer_of
from worker import keys


async def show(request: Request) -> Response:
    target = safe_next(request.query_params.get("next"))
    if viewer_of(request).caller is not None:
        return RedirectResponse(target, 303)
    return page(request, "login.html", next=target, problem=None)


async def sign_in(request: Request) -> Response:
    web = web_of(request)
    form = await form_of(request)
    target = safe_next(form.get("next"))
    client = client_address(request.scope, web.config.trusted_proxy_hops)
    left = web.auth.throttle.blocked(client)
    key = form.get("key", "").strip()
    grant = None if left is not None or not key else await web.auth.keys.verify(web.deps.db, key)
    key_id = keys.key_id(key)
    if grant is None or key_id is None:
        if left is None and key:
            left = await web.auth.throttle.failed(web.deps.redis, client)
        problem = f"too many failed sign-ins from this address: retry in {left} s" if left else "unknown or revoked key"
        return page(request, "login.html", status_code=429 if left else 401, next=target, problem=problem)
    response = RedirectResponse(target, 303)
    set_cookie(response, request, sign(web.auth.secret, new_session(key_id)), max_age=SESSION_TTL_S)
    return response


async def sign_out(request: Request) -> Response:
    response = RedirectResponse("/ui/login", 303)
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response
