"""Bearer JWTs from an identity provider (`OUTLAST_JWT_*`): the tenant a token names, once the token proves it came
from the provider. server/auth.py sends here every bearer credential with two dots that is not an API key.

A token is accepted only when
- its `alg` is an asymmetric signature (RS*, PS*, ES*, EdDSA) *and* the algorithm of the provider's key its `kid`
  names: that key's own `alg`, or, for a key without one, what its type allows (RSA: RS*/PS*; EC: the ES* of its
  curve; OKP: EdDSA). `none` and HS* never are, and symmetric keys in the JWKS are skipped, so a public key is never
  taken for an HMAC secret whatever the header says;
- its signature verifies with that key;
- `iss` is OUTLAST_JWT_ISSUER, `aud` is or contains OUTLAST_JWT_AUDIENCE, `exp` is present and not past and `nbf`
  (when present) not ahead, each within `LEEWAY_S` of clock skew;
- the tenant claim (OUTLAST_JWT_TENANT_CLAIM) names a tenant id. A tenant the provider names is the provider's to
  make: it is created on its first valid token, as `outlast keys create` creates one.

The keys come from the provider's JWKS, fetched with httpx's async client so the event loop never waits on it: at
start-up, when the copy is older than `MAX_AGE_S` (a key the provider withdrew stops verifying), and when a token
names a `kid` the copy lacks (the provider rotated), at most once every `REFETCH_S`, so that tokens with made-up kids
cannot make this process hammer the provider. Concurrent requests share one fetch. Header fields that point at keys
elsewhere (`jku`, `x5u`, `jwk`) are never followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx
import jwt
import msgspec
from databases import Database

from server.problems import Unavailable
from worker import Config, keys

log = logging.getLogger("outlast.web")

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
CURVE_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "Ed25519": "EdDSA"}
ASYMMETRIC = RSA_ALGORITHMS | frozenset(CURVE_ALGORITHMS.values())
LEEWAY_S = 30  # clock skew allowed on exp, nbf and iat
REFETCH_S = 30.0  # a token's unknown kid fetches the JWKS again at most this often
MAX_AGE_S = 3600.0  # the JWKS copy is fetched again when older than this
FETCH_TIMEOUT_S = 5.0
MAX_JWKS_BYTES = 1 << 20
TENANTS_KEPT = 10_000  # tenants this process knows exist: a bound on memory

# Why PyJWT refused a token, for the 401's detail (most specific first: some of these subclass others).
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired (exp)"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf, iat)"),
    (jwt.InvalidIssuerError, "the token is from another issuer (iss) than this server trusts"),
    (jwt.InvalidAudienceError, "the token is for another audience (aud) than this server"),
    (jwt.InvalidSignatureError, "the token's signature does not verify with the identity provider's key"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not its key's"),
)

Keys = dict[str | None, dict[str, jwt.PyJWK]]  # kid: {algorithm: key}


class InvalidToken(Exception):
    """A token refused; the message says why, for the 401."""


class Identity(NamedTuple):
    """What a valid token says about its holder."""

    tenant: str
    subject: str  # `sub`, or "" when the token has none
    read_only: bool


def algorithms_of(jwk: Mapping[str, Any]) -> frozenset[str]:
    """The algorithms a JWKS key may verify: none for a symmetric key, an encryption key or an unknown type."""
    if jwk.get("use", "sig") != "sig":
        return frozenset()
    if "alg" in jwk:
        return frozenset({jwk["alg"]}) & ASYMMETRIC
    if jwk.get("kty") == "RSA":
        return RSA_ALGORITHMS
    algorithm = CURVE_ALGORITHMS.get(jwk.get("crv", ""))
    return frozenset({algorithm}) if algorithm and jwk.get("kty") in ("EC", "OKP") else frozenset()


def parse_jwks(document: bytes) -> Keys:
    """Every usable signing key of a JWK Set (RFC 7517), by kid; the rest are left out (and logged)."""
    data = msgspec.json.decode(document)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWK Set: no `keys` list")
    found: Keys = {}
    for jwk in data["keys"]:
        kid = jwk.get("kid") if isinstance(jwk, dict) else None
        if not isinstance(jwk, dict) or not isinstance(kid, str | None):
            continue
        try:
            by_algorithm = {algorithm: jwt.PyJWK(jwk, algorithm) for algorithm in algorithms_of(jwk)}
        except (jwt.PyJWTError, KeyError, TypeError, ValueError) as exc:
            log.warning("jwt: JWKS key %r is skipped: %s", kid, exc)
            continue
        if by_algorithm:
            found[kid] = by_algorithm
    return found


def check_url(url: str) -> None:
    """A JWKS is fetched over https (a key injected on the way would open every tenant), or plain http on this
    machine only (a development provider, the tests)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback:
        raise RuntimeError(f"OUTLAST_JWT_JWKS_URL must be an https:// URL (plain http only on loopback), not {url!r}")


class Jwks:
    """The provider's signing keys: a copy, and when to fetch it again."""

    def __init__(self, url: str, *, retry_after_s: int) -> None:
        self.url = url
        self.retry_after_s = retry_after_s  # on the 503 while no copy of the keys could be fetched
        self._keys: Keys | None = None  # None: never fetched
        self._fetched_at = -math.inf  # the last good fetch (monotonic)
        self._asked_at = -math.inf  # the last fetch a request asked for: the rate limit
        self._lock = asyncio.Lock()

    async def fetch(self) -> bool:
        """Fetch the key set now; False (logged) when the provider did not answer with one: the copy stays."""
        try:
            async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S) as client:
                async with client.stream("GET", self.url, headers={"Accept": "application/json"}) as response:
                    response.raise_for_status()
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_JWKS_BYTES:
                            raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
            found = parse_jwks(bytes(body))
        except (httpx.HTTPError, ValueError, msgspec.DecodeError) as exc:
            log.error("jwt: the JWKS at %s could not be fetched: %s", self.url, exc or type(exc).__name__)
            return False
        self._keys, self._fetched_at = found, time.monotonic()
        log.info("jwt: %d signing keys from %s: %s", len(found), self.url, ", ".join(map(str, found)) or "none")
        return True

    async def key(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        """The key that verifies a token with this header; InvalidToken or Unavailable when there is none."""
        stale = time.monotonic() - self._fetched_at > MAX_AGE_S
        if stale or self._find(kid) is None:
            await self._fetch_again()
        if self._keys is None:
            raise Unavailable("the identity provider's keys (its JWKS) could not be fetched yet", self.retry_after_s)
        found = self._find(kid)
        if found is None:
            raise InvalidToken(
                "the token names no key (kid) of the identity provider's" if kid else "the token has no kid"
            )
        if algorithm not in found:
            raise InvalidToken(f"the token's algorithm {algorithm} is not its key's ({', '.join(sorted(found))})")
        return found[algorithm]

    def _find(self, kid: str | None) -> dict[str, jwt.PyJWK] | None:
        keys = self._keys or {}
        if kid is None and len(keys) == 1:  # a provider with one key may leave the kid out
            return next(iter(keys.values()))
        return keys.get(kid) if kid is not None else None

    async def _fetch_again(self) -> None:
        if time.monotonic() - self._asked_at < REFETCH_S:
            return
        async with self._lock:
            if time.monotonic() - self._asked_at < REFETCH_S:  # another request fetched while this one waited
                return
            self._asked_at = time.monotonic()
            await self.fetch()


class IdentityProvider:
    """Checks a bearer JWT against the configured provider."""

    def __init__(self, config: Config) -> None:
        check_url(config.jwt_jwks_url)
        if not config.jwt_issuer or not config.jwt_audience:
            # Without `aud`, any token the provider signs for any other application would open this one.
            raise RuntimeError("OUTLAST_JWT_JWKS_URL is set: set OUTLAST_JWT_ISSUER and OUTLAST_JWT_AUDIENCE too")
        self.config = config
        self.jwks = Jwks(config.jwt_jwks_url, retry_after_s=config.retry_after_s)
        self._tenants: set[str] = set()

    async def identify(self, db: Database, token: str) -> Identity:
        """Who the token says is calling, its tenant created on first use; InvalidToken when it proves nothing."""
        claims = await self._claims(token)
        name = self.config.jwt_tenant_claim
        tenant = claims.get(name)
        if not isinstance(tenant, str):
            raise InvalidToken(f"the token has no `{name}` claim naming its tenant")
        if not keys.TENANT.fullmatch(tenant):
            raise InvalidToken(f"the token's `{name}` claim is not a tenant id: 1 to 63 lowercase letters, digits, - _")
        if tenant not in self._tenants:
            await keys.ensure_tenant(db, tenant)
            if len(self._tenants) >= TENANTS_KEPT:
                self._tenants.clear()
            self._tenants.add(tenant)
        write = self.config.jwt_write_scope
        return Identity(tenant, str(claims.get("sub") or ""), bool(write) and write not in scopes(claims))

    async def _claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("the token is malformed") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in ASYMMETRIC:
            raise InvalidToken(
                f"the token's algorithm {str(algorithm)[:16]!r} is refused: only an asymmetric signature (RS*, PS*,"
                " ES*, EdDSA) with the identity provider's key"
            )
        if not isinstance(kid, str | None):
            raise InvalidToken("the token's kid is not a string")
        key = await self.jwks.key(kid, algorithm)
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.config.jwt_audience,
                issuer=self.config.jwt_issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"the token has no `{exc.claim}` claim") from None
        except jwt.PyJWTError as exc:
            reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), "the token is malformed")
            raise InvalidToken(reason) from None


def scopes(claims: Mapping[str, Any]) -> set[str]:
    """The scopes a token was granted: `scope`, space-separated (RFC 9068), or `scp`, a list or a string (Okta,
    Microsoft Entra)."""
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return found
