"""Who is calling. Every `/v1` request is authenticated here, once, before routing, so a route added later is covered
without a line of its own; handlers read the result with `tenant_of(request)` (or `caller_of`).

    Authorization: Bearer olk_…   an API key: its tenant, on every /v1 route (a read-only key: GET, HEAD, OPTIONS)
    Authorization: Bearer a.b.c   a JWT from the identity provider, when one is configured (server/idp.py): the
                                  tenant it names, on every /v1 route (read-only without the write scope)
    ?token=olt_…                  a job read token (from a Job's `links`): one job, read-only, on TOKEN_ROUTES only
    neither                       development's open mode, as tenant `default`, only while `may_run_open` and no
                                  usable key exists; else 401

Anything else answers 401 with `WWW-Authenticate: Bearer`, and a read-only credential's write (any method but READS)
403. An API key in the query string is refused even beside a valid header: it is already in access logs and browser
history. An address that keeps failing (a bad key or JWT alike) gets 429 for the rest of a minute
(server/limits.py); a request without credentials never counts, and a valid credential always passes.

Pure ASGI, not BaseHTTPMiddleware, which would buffer and break streaming responses such as the event stream.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit
from uuid import UUID

import msgspec
from databases import Database
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server import b64
from server.idp import IdentityProvider, InvalidToken
from server.keycache import KeyCache
from server.limits import AuthThrottle, pruned
from server.problems import Forbidden, ProblemError, RateLimited, Unauthorized, Unavailable, as_response
from server.state import Web, web_of
from worker import Config, Deps, Job, Links, database, keys, tokens

log = logging.getLogger("outlast.web")

SCOPE_KEY = "outlast.caller"
DEFAULT_TENANT = "default"
TOKEN_PREFIX = tokens.PREFIX
# The routes a job read token opens: GET (and HEAD) only, and only for the job named in the path. Data: a route
# that should follow a job from a browser is one more line here.
TOKEN_ROUTES: tuple[re.Pattern[str], ...] = (
    re.compile(r"/v1/jobs/(?P<id>[^/]+)"),
    re.compile(r"/v1/jobs/(?P<id>[^/]+)/events"),
    re.compile(r"/v1/jobs/(?P<id>[^/]+)/result"),
)
# Query parameters that would carry an API key: refused whatever they hold (a value shaped like a key is refused
# under any name, `token` included).
KEY_PARAMS = frozenset({"api_key", "apikey", "api-key", "key", "access_token", "auth", "authorization"})
TOUCH_EVERY_S = 300.0  # api_keys.last_used_at is written at most this often per key and process
_TOKEN_CONTEXT = tokens.CONTEXT
LINK_TOKEN_REUSE_S = 60.0
READS = frozenset({"GET", "HEAD", "OPTIONS"})  # what a read-only credential may send; anything else is a write


@dataclass(frozen=True)
class Caller:
    tenant: str
    key_id: str | None  # the API key's id; None for a JWT, a job read token or development's open mode
    job: UUID | None = None  # a read token's one job
    expires_at: float | None = None  # a read token's end, in Unix time: nothing it opened outlives it
    read_only: bool = False  # a read-only key or JWT: every write answers 403
    subject: str | None = None  # a JWT's `sub` ("" when it has none)

    @property
    def limit_key(self) -> str:
        """What per-key limits count against: the key; for a JWT, its subject within its tenant; for a read token,
        its job (a leaked link uses up that job's streams, not every browser's of the tenant); in open mode, the
        tenant."""
        if self.key_id is not None:
            return self.key_id
        if self.subject is not None:
            return f"jwt:{self.tenant}:{self.subject}"
        return f"job:{self.job}" if self.job is not None else f"open:{self.tenant}"


class Token(NamedTuple):
    """What a valid job read token says."""

    tenant: str
    job: UUID
    expires_at: int  # Unix time


def caller_of(request: Request) -> Caller:
    caller: Caller = request.scope[SCOPE_KEY]
    return caller


def tenant_of(request: Request) -> str:
    """The tenant every query of this request is scoped to."""
    return caller_of(request).tenant


def is_local(database_url: str) -> bool:
    """True for a database on this machine (a loopback address or a Unix socket), as the embedded one is."""
    host = urlsplit(database_url).hostname or ""
    if host in ("", "localhost") or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AuthState:
    """What authentication keeps between requests: the token secret, the failure throttle, and whether
    development's open mode is allowed at all. Built once at start-up by `setup()`."""

    LINK_TOKENS = 10_000  # jobs whose link token is kept for reuse, per process

    def __init__(
        self, config: Config, secret: bytes, *, may_run_open: bool, idp: IdentityProvider | None = None
    ) -> None:
        self.config = config
        self.secret = secret
        self.may_run_open = may_run_open
        self.idp = idp  # None: bearer JWTs are not accepted
        self.throttle = AuthThrottle(config.auth_failures_per_min)
        self.keys = KeyCache()
        self._touched: dict[str, float] = {}
        self._link_tokens: dict[tuple[str, UUID], tuple[str, float]] = {}  # (tenant, job): (token, minted at)

    def token(self, tenant: str, job_id: UUID, *, ttl_s: int | None = None) -> str:
        """A read-only token for one job: its id, its tenant and an expiry, signed with HMAC-SHA256."""
        return tokens.mint(self.secret, tenant, job_id, self.config.token_ttl_s if ttl_s is None else ttl_s)

    def link_token(self, tenant: str, job_id: UUID) -> str:
        """`token` for a Job's links, minted again at most once a minute per job (and at least every quarter of the
        token's life, so that a Job never carries a token far into its life, let alone an expired one): a poller
        reading the job every 50 ms gets the same token instead of a new HMAC each time."""
        now = time.monotonic()
        reuse_s = min(LINK_TOKEN_REUSE_S, self.config.token_ttl_s / 4)
        minted = self._link_tokens.get((tenant, job_id))
        if minted is not None and now - minted[1] < reuse_s:
            return minted[0]
        self._link_tokens = pruned(self._link_tokens, lambda v: now - v[1] < reuse_s, self.LINK_TOKENS)
        token = self.token(tenant, job_id)
        self._link_tokens[(tenant, job_id)] = (token, now)
        return token

    def read_token(self, token: str) -> Token | None:
        """What a token this server signed says, unless it has expired; else None. Only the one spelling `token`
        mints is accepted: base64 that decodes to the same bytes (padding, unused bits, the other alphabet) is
        refused, so a token can't be varied into another string that is just as good."""
        body, dot, mac = token.removeprefix(TOKEN_PREFIX).partition(".")
        if not token.startswith(TOKEN_PREFIX) or not dot:
            return None
        try:
            payload, signature = b64.decode(body), b64.decode(mac)
        except ValueError:
            return None
        expected = hmac.digest(self.secret, _TOKEN_CONTEXT + payload, "sha256")
        if not hmac.compare_digest(expected, signature) or len(payload) < 24:
            return None
        expires_at = int.from_bytes(payload[16:24], "big")
        if expires_at < time.time():
            return None
        try:
            tenant = payload[24:].decode()
        except UnicodeDecodeError:
            return None
        return Token(tenant, UUID(bytes=payload[:16]), expires_at)

    async def open_now(self, db: Database) -> bool:
        """Development's open mode: allowed at start-up, and still no usable key (creating one closes it)."""
        return self.may_run_open and not await keys.any_active(db)

    async def used(self, db: Database, key_id: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(key_id, -TOUCH_EVERY_S) >= TOUCH_EVERY_S:
            self._touched[key_id] = now
            await keys.touch(db, key_id)


async def setup(config: Config, db: Database) -> AuthState:
    """Decide, at start-up, how this web process authenticates, and say so. Production never runs open by accident:
    open mode needs OUTLAST_DEV_OPEN (set by `outlast run` with its embedded database) *and* a database on this
    machine, and ends as soon as a key exists."""
    may_run_open = config.dev_open and is_local(config.database_url)
    if config.dev_open and not may_run_open:
        log.error("OUTLAST_DEV_OPEN is ignored: the database is not on this machine, so this is no development setup")
    secret = config.secret_key
    if not secret:
        if not may_run_open:
            raise RuntimeError(
                "OUTLAST_SECRET_KEY is not set: it signs the job read tokens in Job links. Set it to a random string of"
                ' 32 or more characters, e.g. python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        secret = secrets.token_urlsafe(32)  # development: tokens die with this process, which is fine there
    if len(secret) < 32:
        raise RuntimeError("OUTLAST_SECRET_KEY is too short: use 32 or more random characters")
    if may_run_open and not await keys.any_active(db):
        log.warning(
            "\n%s\n  OUTLAST IS RUNNING OPEN: no API key exists and this is the development database, so every /v1"
            "\n  route answers without authentication. Create a key to close it:  outlast keys create default\n%s",
            "!" * 100,
            "!" * 100,
        )
    idp = None
    if config.jwt_jwks_url:
        idp = IdentityProvider(config)
        # Fetched now, so the first token is answered at once. A provider down at start-up is no reason to refuse API
        # keys: it is logged, and its JWKS is tried again when a token arrives.
        await idp.jwks.fetch()
    return AuthState(config, secret.encode(), may_run_open=may_run_open, idp=idp)


def signed_links(request: Request, job: Job) -> Job:
    """The Job with a read token in `links.self` and `links.events`, so a browser's EventSource can follow it.

    Not for a caller that came with a token itself: reading the job must not renew its own access for ever."""
    caller = caller_of(request)
    if caller.job is not None:
        return job
    token = web_of(request).auth.link_token(caller.tenant, job.id)
    links = Links(
        self=f"{job.links.self}?token={token}",
        events=f"{job.links.events}?token={token}",
        result=f"{job.links.result}?token={token}",
    )
    return msgspec.structs.replace(job, links=links)


def _is_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class Authenticate:
    """ASGI middleware: put the request's Caller in `scope[SCOPE_KEY]`, or answer 401 / 429 / 503 itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_v1(scope["path"]):
            await self.app(scope, receive, send)
            return
        web: Web = scope["app"].state.web
        try:
            scope[SCOPE_KEY] = caller = await _authenticate(scope, web.auth, web.deps)
            if caller.read_only and scope["method"] not in READS:
                what = "key" if caller.key_id is not None else "token"
                raise Forbidden(f"this {what} is read-only: it may read (GET) but not {scope['method']}")
        except ProblemError as exc:
            await as_response(exc)(scope, receive, send)
            return
        except database.UNAVAILABLE as exc:
            log.warning("%s %s: database unavailable during authentication: %r", scope["method"], scope["path"], exc)
            retry_after = web.config.retry_after_s
            await as_response(Unavailable("the database is unreachable; retry shortly", retry_after))(
                scope, receive, send
            )
            return
        await self.app(scope, receive, send)


def client_address(scope: Scope, proxy_hops: int) -> str:
    """The address a request came from, as far as the deployment can trust it: the socket's peer, or behind
    `proxy_hops` proxies that each append the address they were connected from to X-Forwarded-For, the entry that
    many places from the right. Entries further left are whatever the client wrote, so they are never read."""
    peer = str((scope.get("client") or ("unknown", 0))[0])
    if proxy_hops <= 0:
        return peer
    forwarded = [
        entry.strip()
        for name, value in scope.get("headers", ())
        if name == b"x-forwarded-for"
        for entry in value.decode("latin-1").split(",")
    ]
    return forwarded[-proxy_hops] if len(forwarded) >= proxy_hops else peer


async def _authenticate(scope: Scope, guard: AuthState, deps: Deps) -> Caller:
    """The caller, or Unauthorized. Only requests that present credentials, and fail, count against their address:
    one without any can't guess anything, and a valid key is never refused for what others sent from its address
    (everyone behind one NAT)."""
    try:
        return await _identify(scope, guard, deps)
    except Unauthorized as exc:
        if not exc.presented:
            raise
        client = client_address(scope, guard.config.trusted_proxy_hops)
        left = guard.throttle.blocked(client) or await guard.throttle.failed(deps.redis, client)
        if left is not None:
            raise RateLimited(f"too many failed authentications from this address; retry in {left} s", left) from None
        raise


async def _identify(scope: Scope, guard: AuthState, deps: Deps) -> Caller:
    raw_query = scope.get("query_string", b"")
    query = parse_qsl(raw_query.decode("latin-1"), keep_blank_values=True) if raw_query else []
    if any(name.lower() in KEY_PARAMS or keys.looks_like_key(value) for name, value in query):
        raise Unauthorized(
            "API keys are never accepted in the query string (it ends up in logs): send `Authorization: Bearer"
            " <key>`, and revoke a key that was sent this way"
        )
    authorization = Headers(scope=scope).get("authorization")
    if authorization is not None:
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise Unauthorized("malformed Authorization header: send `Authorization: Bearer <key>`")
        credential = credential.strip()
        if credential.count(".") == 2 and not keys.looks_like_key(credential):
            return await _jwt_caller(guard, deps, credential)
        return await _key_caller(guard, deps, credential)
    tokens = [value for name, value in query if name == "token"]
    if tokens:
        return _token_caller(scope, guard, tokens)
    if await guard.open_now(deps.db):
        return Caller(DEFAULT_TENANT, None)
    raise Unauthorized("this route needs an API key: send `Authorization: Bearer <key>`", presented=False)


async def _key_caller(guard: AuthState, deps: Deps, key: str) -> Caller:
    grant = await guard.keys.verify(deps.db, key)
    key_id = keys.key_id(key)
    if grant is None or key_id is None:
        raise Unauthorized("unknown or revoked API key")
    await guard.used(deps.db, key_id)
    return Caller(grant.tenant, key_id, read_only=grant.read_only)


async def _jwt_caller(guard: AuthState, deps: Deps, token: str) -> Caller:
    if guard.idp is None:
        raise Unauthorized("this server takes no JWTs (no identity provider is configured): send an API key")
    try:
        identity = await guard.idp.identify(deps.db, token)
    except InvalidToken as exc:
        raise Unauthorized(f"invalid JWT: {exc}") from None
    return Caller(identity.tenant, None, read_only=identity.read_only, subject=identity.subject)


def _token_caller(scope: Scope, guard: AuthState, tokens: list[str]) -> Caller:
    if scope["method"] not in ("GET", "HEAD"):
        raise Unauthorized("a job read token only reads: this needs an API key")
    job_in_path = next((m["id"] for route in TOKEN_ROUTES if (m := route.fullmatch(scope["path"]))), None)
    if job_in_path is None:
        raise Unauthorized("a job read token is accepted only on GET /v1/jobs/{id}, its /events and its /result")
    claims = guard.read_token(tokens[0]) if len(tokens) == 1 else None
    if claims is None:
        raise Unauthorized("the job read token is invalid or expired: read the job again for a fresh one")
    if job_in_path.lower() != str(claims.job):
        raise Unauthorized("this job read token is for another job")
    return Caller(claims.tenant, None, claims.job, float(claims.expires_at))
