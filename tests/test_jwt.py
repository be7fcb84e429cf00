"""Bearer JWTs from an identity provider (server/idp.py): keys minted here, their JWKS served from a real socket."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from server.auth import setup
from tests.conftest import Processes, bearer, open_app, process_env, wait_done
from worker import Config, Deps, keys

ISSUER = "https://idp.example.com/"
AUDIENCE = "https://outlast.example.com"
SQUARES = {"type": "square_sum", "input": {"data": [1, 2, 3]}}


@dataclass
class Provider:
    """An identity provider as Outlast sees one: signing keys, and a JWKS endpoint that counts its fetches."""

    rsa_key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    ec_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    published: list[dict[str, Any]] = field(default_factory=list)
    fetches: int = 0
    url: str = ""

    def publish(self, *extra: dict[str, Any], rsa_kid: str = "rsa-1", ec_kid: str = "ec-1") -> None:
        rsa_jwk = RSAAlgorithm.to_jwk(self.rsa_key.public_key(), as_dict=True) | {"kid": rsa_kid, "use": "sig"}
        ec_jwk = ECAlgorithm.to_jwk(self.ec_key.public_key(), as_dict=True) | {"kid": ec_kid, "alg": "ES256"}
        self.published = [rsa_jwk, ec_jwk, *extra]

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "tenant": "acme", "iat": now, "exp": now + 300}
        return {k: v for k, v in (claims | changes).items() if v is not None}

    def rs256(self, *, kid: str = "rsa-1", key: rsa.RSAPrivateKey | None = None, **changes: Any) -> str:
        return jwt.encode(self.claims(**changes), key or self.rsa_key, algorithm="RS256", headers={"kid": kid})

    def es256(self, *, kid: str = "ec-1", **changes: Any) -> str:
        return jwt.encode(self.claims(**changes), self.ec_key, algorithm="ES256", headers={"kid": kid})

    def public_pem(self) -> bytes:
        return self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """header.claims. — what a token looks like before its signature (PyJWT won't make the bad ones below)."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."


def hs256(secret: bytes, claims: dict[str, Any], kid: str) -> str:
    signing_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": kid}, claims)[:-1]
    return f"{signing_input}.{b64(hmac.digest(secret, signing_input.encode(), hashlib.sha256))}"


@pytest.fixture
def provider() -> Iterator[Provider]:
    idp = Provider()
    idp.publish()

    class Jwks(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            idp.fetches += 1
            body = json.dumps({"keys": idp.published}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    idp.url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    try:
        yield idp
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def with_idp(config: Config, provider: Provider, **changes: Any) -> Config:
    settings = {"jwt_jwks_url": provider.url, "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}
    return msgspec.structs.replace(config, **{**settings, **changes})


@pytest.fixture
async def idp_client(config: Config, deps: Deps, provider: Provider) -> AsyncIterator[httpx.AsyncClient]:
    async with open_app(with_idp(config, provider)) as client:
        yield client


def assert_refused(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "/problems/unauthorized"
    assert reason in problem["detail"], problem["detail"]
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_a_valid_token_opens_its_own_tenants_jobs_only(
    idp_client: httpx.AsyncClient, deps: Deps, provider: Provider, api_key: str
) -> None:
    assert provider.fetches == 1  # at start-up, not on the first request
    submitted = await idp_client.post("/v1/jobs", json=SQUARES, headers=bearer(provider.rs256()))
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()["id"]
    # The EC key of the same provider, same tenant: the same jobs.
    listed = await idp_client.get("/v1/jobs", headers=bearer(provider.es256()))
    assert listed.status_code == 200 and [j["id"] for j in listed.json()["items"]] == [job]
    # The tenant came from the claim, and was made on first use.
    assert await deps.db.fetch_val("SELECT tenant_id FROM jobs WHERE id = :id", {"id": job}) == "acme"
    assert await deps.db.fetch_val("SELECT count(*) FROM tenants WHERE id = 'acme'") == 1
    # Another tenant's token, and an API key of `default`, don't see it.
    globex = bearer(provider.rs256(tenant="globex"))
    assert (await idp_client.get(f"/v1/jobs/{job}", headers=globex)).status_code == 404
    assert (await idp_client.get(f"/v1/jobs/{job}", headers=bearer(api_key))).status_code == 404
    assert provider.fetches == 1  # every token was checked against the copy


def expired(p: Provider) -> str:
    return p.rs256(iat=int(time.time()) - 900, exp=int(time.time()) - 120)


def a_foreign_rsa_key_under_our_kid(p: Provider) -> str:
    return p.rs256(key=rsa.generate_private_key(65537, 2048))


def a_tampered_payload(p: Provider) -> str:
    header, _, signature = p.rs256().split(".")
    return ".".join((header, b64(json.dumps(p.claims(tenant="globex")).encode()), signature))


# (what is wrong, the token, what the 401's detail says)
BAD_TOKENS = [
    ("expired", expired, "expired"),
    ("not yet valid", lambda p: p.rs256(nbf=int(time.time()) + 120), "not valid yet"),
    ("wrong issuer", lambda p: p.rs256(iss="https://evil.example.com/"), "issuer (iss)"),
    ("wrong audience", lambda p: p.rs256(aud="https://another-app.example.com"), "audience (aud)"),
    ("signed by another key", a_foreign_rsa_key_under_our_kid, "signature does not verify"),
    ("payload changed after signing", a_tampered_payload, "signature does not verify"),
    ("alg none", lambda p: unsigned({"alg": "none", "typ": "JWT"}, p.claims()), "'none' is refused"),
    ("alg None", lambda p: unsigned({"alg": "None", "kid": "rsa-1"}, p.claims()), "'None' is refused"),
    ("HS256, the public key's PEM as secret", lambda p: hs256(p.public_pem(), p.claims(), "rsa-1"), "'HS256'"),
    ("HS256, a symmetric key the JWKS publishes", lambda p: hs256(b"s3cret", p.claims(), "oct-1"), "'HS256'"),
    ("RS256 under the EC key's kid", lambda p: p.rs256(kid="ec-1"), "algorithm RS256 is not its key's (ES256)"),
    ("unknown kid", lambda p: p.rs256(kid="rsa-unknown"), "names no key (kid)"),
    ("no tenant claim", lambda p: p.rs256(tenant=None), "no `tenant` claim"),
    ("tenant claim not a tenant id", lambda p: p.rs256(tenant="Not A Tenant"), "not a tenant id"),
    ("tenant claim not a string", lambda p: p.rs256(tenant=["acme"]), "no `tenant` claim"),
    ("no exp", lambda p: p.rs256(exp=None), "no `exp` claim"),
    ("no aud", lambda p: p.rs256(aud=None), "no `aud` claim"),
    ("garbage in three parts", lambda p: "not.a.jwt", "malformed"),
]


@pytest.mark.parametrize(("name", "make", "reason"), BAD_TOKENS, ids=[b[0] for b in BAD_TOKENS])
async def test_each_bad_token_is_401_saying_what_is_wrong(
    config: Config, deps: Deps, provider: Provider, name: str, make: Any, reason: str
) -> None:
    provider.publish({"kty": "oct", "kid": "oct-1", "k": b64(b"s3cret"), "alg": "HS256"})
    async with open_app(with_idp(config, provider)) as client:
        for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs")):
            response = await client.request(method, path, headers=bearer(make(provider)), json=SQUARES)
            assert_refused(response, reason)
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 0


async def test_clock_skew_within_the_leeway_is_tolerated(idp_client: httpx.AsyncClient, provider: Provider) -> None:
    now = int(time.time())
    for token in (provider.rs256(exp=now - 5), provider.rs256(nbf=now + 5, iat=now + 5)):
        assert (await idp_client.get("/v1/jobs", headers=bearer(token))).status_code == 200


async def test_an_unknown_kid_fetches_the_jwks_once_and_then_accepts_the_rotated_key(
    idp_client: httpx.AsyncClient, provider: Provider
) -> None:
    assert (await idp_client.get("/v1/jobs", headers=bearer(provider.rs256()))).status_code == 200
    assert provider.fetches == 1
    withdrawn = provider.rsa_key
    provider.rsa_key = rsa.generate_private_key(65537, 2048)  # the provider rotates: a new key, a new kid
    provider.publish(rsa_kid="rsa-2")
    rotated = provider.rs256(kid="rsa-2")
    assert (await idp_client.get("/v1/jobs", headers=bearer(rotated))).status_code == 200
    assert provider.fetches == 2
    assert (await idp_client.get("/v1/jobs", headers=bearer(rotated))).status_code == 200
    # Tokens with made-up kids don't make the web hammer the provider: the next refetch waits its interval.
    for kid in ("made-up-1", "made-up-2", "made-up-3"):
        assert_refused(await idp_client.get("/v1/jobs", headers=bearer(provider.rs256(kid=kid))), "names no key")
    # The refetch also dropped the key the provider withdrew.
    assert_refused(await idp_client.get("/v1/jobs", headers=bearer(provider.rs256(key=withdrawn))), "names no key")
    assert provider.fetches == 2


async def test_a_token_without_the_write_scope_reads_and_gets_403_on_every_write(
    config: Config, deps: Deps, provider: Provider
) -> None:
    async with open_app(with_idp(config, provider, jwt_write_scope="outlast:write")) as client:
        writer = bearer(provider.rs256(scope="openid outlast:write"))
        job = (await client.post("/v1/jobs", json=SQUARES, headers=writer)).json()["id"]
        also_writer = bearer(provider.es256(scp=["outlast:write"]))  # the array form (Okta, Entra)
        assert (await client.post(f"/v1/jobs/{job}/cancel", headers=also_writer)).status_code != 403
        reader = bearer(provider.rs256(scope="openid outlast:read"))
        for path in ("/v1/jobs", f"/v1/jobs/{job}", "/v1/job-types"):
            assert (await client.get(path, headers=reader)).status_code == 200, path
        for path in ("/v1/jobs", f"/v1/jobs/{job}/cancel", f"/v1/jobs/{job}/retry"):
            response = await client.post(path, json=SQUARES, headers=reader)
            assert response.status_code == 403, response.text
            assert response.json()["type"] == "/problems/forbidden"
            assert "this token is read-only" in response.json()["detail"]
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 1


async def test_failed_jwts_count_toward_the_auth_throttle_but_a_valid_one_is_served(
    config: Config, deps: Deps, provider: Provider
) -> None:
    async with open_app(with_idp(config, provider, auth_failures_per_min=3)) as client:
        for _ in range(3):
            assert_refused(await client.get("/v1/jobs", headers=bearer(expired(provider))), "expired")
        throttled = await client.get("/v1/jobs", headers=bearer(expired(provider)))
        assert throttled.status_code == 429 and throttled.json()["type"] == "/problems/rate-limited"
        assert (await client.get("/v1/jobs", headers=bearer(provider.rs256()))).status_code == 200


async def test_api_keys_work_unchanged_beside_jwts(idp_client: httpx.AsyncClient, api_key: str) -> None:
    assert (await idp_client.post("/v1/jobs", json=SQUARES, headers=bearer(api_key))).status_code == 202
    for not_a_key in (keys.new_key() + ".a.b", "olk_x.y.z"):  # olk_ is a key, whatever its dots
        assert_refused(await idp_client.get("/v1/jobs", headers=bearer(not_a_key)), "unknown or revoked API key")


async def test_without_a_provider_a_jwt_is_401(client: httpx.AsyncClient, provider: Provider) -> None:
    response = await client.get("/v1/jobs", headers=bearer(provider.rs256()))
    assert_refused(response, "takes no JWTs")


async def test_a_provider_down_at_start_up_costs_jwts_a_503_and_api_keys_nothing(
    config: Config, deps: Deps, provider: Provider, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    down = msgspec.structs.replace(with_idp(config, provider), jwt_jwks_url="http://127.0.0.1:9/jwks.json")
    async with open_app(down) as client:
        assert "could not be fetched" in caplog.text
        assert (await client.get("/v1/jobs", headers=bearer(api_key))).status_code == 200
        response = await client.get("/v1/jobs", headers=bearer(provider.rs256()))
        assert response.status_code == 503 and response.json()["type"] == "/problems/unavailable"
        assert "retry-after" in response.headers


async def test_the_web_refuses_to_start_with_a_provider_half_configured(
    config: Config, deps: Deps, provider: Provider
) -> None:
    for changes, message in [
        ({"jwt_audience": ""}, "OUTLAST_JWT_AUDIENCE"),
        ({"jwt_issuer": ""}, "OUTLAST_JWT_ISSUER"),
        ({"jwt_jwks_url": "http://idp.example.com/jwks.json"}, "https://"),  # keys over plain http off this machine
        ({"jwt_jwks_url": "not a url"}, "https://"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            await setup(with_idp(config, provider, **changes), deps.db)


@pytest.mark.slow
async def test_a_web_process_fetches_the_jwks_at_start_up_and_runs_a_jobs_whole_life_on_a_token(
    config: Config, deps: Deps, provider: Provider, tmp_path: Path
) -> None:
    token = provider.es256(tenant="initech")
    processes = Processes(process_env(with_idp(config, provider)), tmp_path, key=token)
    try:
        processes.start_web()
        processes.start_worker()
        await processes.ready()
        assert provider.fetches == 1
        async with processes.client() as client:
            job = (await client.post("/v1/jobs", json=SQUARES)).json()
            assert (await wait_done(client, job["id"]))["status"] == "succeeded"
            assert (await client.get(f"/v1/jobs/{job['id']}/result")).json() == 14
            assert_refused(await client.get("/v1/jobs", headers=bearer(expired(provider))), "expired")
    finally:
        processes.stop()
    assert await deps.db.fetch_val("SELECT tenant_id FROM jobs") == "initech"
    logs = processes.log("web") + processes.log("worker")
    assert token not in logs and token.split(".")[2] not in logs  # nor its signature alone
