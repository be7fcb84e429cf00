"""Configuration: one frozen Struct, read from the environment once at each process's edge."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec

# Platforms set these three without a prefix; everything else is OUTLAST_<FIELD>.
_PLATFORM_NAMES = {"database_url": "DATABASE_URL", "redis_url": "REDIS_URL", "port": "PORT"}

Seconds = Annotated[float, msgspec.Meta(gt=0)]


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    database_url: str = "postgresql://postgres@127.0.0.1:5432/outlast"
    redis_url: str = "redis://127.0.0.1:6379/0"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    # Extra modules whose JOB_TYPE / JOB_TYPES are registered next to the built-in ones.
    job_modules: str = ""
    # Webhooks (worker/webhooks/): see docs/webhooks.md.
    webhook_secret: Annotated[str, msgspec.Meta(pattern=r"^(whsec_[A-Za-z0-9+/]+={0,2})?$")] = ""
    allowed_callback_networks: str = ""  # comma-separated CIDRs a callback_url may reach besides global addresses
    callback_ports: str = "80,443,8080,8443"  # comma-separated ports and ranges (`8000-8999`)
    allow_http_callbacks: bool = False  # https only unless set
    webhook_timeout_s: Seconds = 10.0  # one attempt, DNS to status line, whatever the receiver does
    webhook_concurrency: Annotated[int, msgspec.Meta(ge=1)] = 16  # attempts in flight per worker process
    webhook_retry_window_s: Annotated[float, msgspec.Meta(ge=86_400)] = 36 * 3600.0  # keep trying this long
    webhook_max_result_bytes: Annotated[int, msgspec.Meta(ge=0)] = 262_144  # larger results go as a link
    # The least time between a worker's claims of deliveries while new ones keep coming (each notifies the workers:
    # worker/notify.py), and its poll when it can't LISTEN (a transaction pooler without direct_database_url).
    webhook_poll_s: Seconds = 1.0
    # A job's own requests (ctx.http, worker/egress.py): the same guard as callbacks, with a policy of its own, so
    # opening a private network to webhook receivers never opens it to every job's code. docs/job-types.md
    egress_allowed_networks: str = ""  # comma-separated CIDRs ctx.http may reach besides global addresses
    egress_ports: str = "80,443,8080,8443"  # comma-separated ports and ranges
    egress_allow_http: bool = True  # plain http too: much of the web a job reads is not https
    egress_timeout_s: Seconds = 30.0  # one request, DNS to the last byte of the body, redirects included
    egress_max_bytes: Annotated[int, msgspec.Meta(ge=1)] = 10_485_760  # a response body past this fails the request
    egress_breaker_failures: Annotated[int, msgspec.Meta(ge=1)] = 5  # failures in a row that open a host's circuit
    egress_breaker_cooldown_s: Seconds = 30.0  # an open circuit skips its host this long, then lets one request try
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1_048_576
    # The blob store (worker/blobs.py): results past inline_result_bytes, ctx.output files and uploads. Empty
    # blob_url: chunks in PostgreSQL; `s3://bucket/prefix`: S3-compatible storage (credentials from AWS_* variables).
    blob_url: Annotated[str, msgspec.Meta(pattern=r"^(s3://[^/]+(/.*)?)?$")] = ""
    inline_result_bytes: Annotated[int, msgspec.Meta(ge=0)] = 262_144  # a larger result goes to the blob store
    max_upload_bytes: Annotated[int, msgspec.Meta(ge=1)] = 1_073_741_824  # POST /v1/uploads past this: 413
    max_batch_jobs: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1_000  # jobs in one POST /v1/jobs/batch
    max_timeout_s: Annotated[int, msgspec.Meta(ge=1)] = 86_400
    default_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    job_ttl_s: Seconds = 7 * 86_400  # expires_at = created_at + this: past it, a live job ends `expired`
    result_retention_s: Seconds = 7 * 86_400  # after it a result answers 410 Gone
    job_retention_s: Seconds = 30 * 86_400  # after it a terminal job and its events are deleted
    lease_s: Seconds = 30.0  # a running attempt is presumed lost this long after its last heartbeat
    progress_interval_s: Seconds = 0.25  # at most one progress write per job this often
    sweep_interval_s: Annotated[int, msgspec.Meta(ge=1, le=30)] = 5
    redispatch_after_s: Seconds = 30.0  # a queued job not picked up this long after dispatch is enqueued again
    sweep_batch: Annotated[int, msgspec.Meta(ge=1)] = 500
    backoff_base_s: Seconds = 1.0
    backoff_cap_s: Seconds = 300.0
    worker_max_jobs: Annotated[int, msgspec.Meta(ge=1)] = 100
    # A tenant without a cap of its own may run at most this share of the live workers' slots, once two or more
    # tenants hold API keys (1: no default cap). worker/capacity.py
    tenant_max_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    # Each priority level is worth this much waiting: a job at -10 behind a steady stream at 10 starts within 20
    # of these. worker/queue.py
    priority_step_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 60.0
    # A busy worker polls arq's queue this often; an idle one when the doorbell rings, a delayed job is due, or its
    # health key wants refreshing (every worker_health_check_interval_s). worker/wake.py
    worker_poll_delay_s: Seconds = 0.05
    worker_health_check_interval_s: Annotated[int, msgspec.Meta(ge=1)] = 5
    # Names this worker's health key, so `arq --check` checks this instance, not any sibling. Empty: the
    # platform's instance name (DYNO, FLY_MACHINE_ID, RENDER_INSTANCE_ID) or the host name.
    worker_name: str = ""
    # The worker's GET /metrics (worker/metrics.py) listens here; unset: not served. 0: any free port (tests).
    worker_metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    shutdown_grace_s: Annotated[int, msgspec.Meta(ge=0)] = 25  # under Heroku's 30 s between SIGTERM and SIGKILL
    redis_outage_s: Seconds = 60.0  # the worker rides out a Redis outage this long, then exits non-zero
    db_pool_min: Annotated[int, msgspec.Meta(ge=0)] = 1
    db_pool_max: Annotated[int, msgspec.Meta(ge=1)] = 10
    db_timeout_s: Seconds = 5.0  # connect and command timeout: a down database answers 503 quickly
    # `transaction`: DATABASE_URL is a transaction pooler (PgBouncer's pool_mode=transaction, as Heroku, Render and
    # Supabase give), where a session lasts one transaction: no statement cache, and the key cache polls unless
    # direct_database_url is set. docs/operations.md "PgBouncer"
    database_pooler: Literal["none", "transaction"] = "none"
    direct_database_url: str = ""  # PostgreSQL itself, past the pooler: the key cache's LISTEN, and migrations
    redis_timeout_s: Seconds = 2.0
    redis_pool_max: Annotated[int, msgspec.Meta(ge=1)] = 32  # Redis connections per web process
    # rediss:// only (worker/connections.py tls): `required` checks the server's certificate and name against the
    # system's CAs, or against redis_tls_ca_file (a managed plan's own CA); `none` encrypts without checking who
    # answers (the URL's ?ssl_cert_reqs=none says the same).
    redis_tls_verify: Literal["required", "none"] = "required"
    # one JSON object per line (worker/logs.py), or the console lines uvicorn and arq write for a person
    log_format: Literal["console", "json"] = "console"
    # OpenTelemetry traces (the `otel` extra, worker/tracing.py): `auto` traces when OTEL_EXPORTER_OTLP_ENDPOINT (or
    # its _TRACES_ variant) is set, the variable every OTLP setup sets anyway; `on` always (to the SDK's default
    # endpoint if none is set); `off` never. docs/operations.md "Tracing"
    tracing: Literal["auto", "on", "off"] = "auto"
    redis_tls_ca_file: str = ""
    retry_after_s: Annotated[int, msgspec.Meta(ge=1)] = 5  # Retry-After on 503
    # -- security: docs/security.md -------------------------------------------------------------------
    secret_key: str = ""  # signs job read tokens; required unless the web runs open for development
    dev_open: bool = False  # set by `outlast run` with its embedded database: open while no API key exists
    token_ttl_s: Annotated[int, msgspec.Meta(ge=1)] = 900  # job read tokens in `links` live this long
    idempotency_ttl_s: Seconds = 86_400  # an Idempotency-Key replays its job this long, then may be used again
    submit_rate_per_s: Annotated[float, msgspec.Meta(gt=0)] = 20.0  # per API key, refilled continuously...
    submit_burst: Annotated[int, msgspec.Meta(ge=1)] = 100  # ...into a bucket this deep
    redelivers_per_min: Annotated[int, msgspec.Meta(ge=1)] = 10  # POST …/redeliver per API key: then 429
    max_streams_per_key: Annotated[int, msgspec.Meta(ge=1)] = 10  # open event streams per API key
    max_streams_per_token: Annotated[int, msgspec.Meta(ge=1)] = 5  # ...and per job, opened with its read token
    auth_failures_per_min: Annotated[int, msgspec.Meta(ge=1)] = (
        30  # per client address; past it: 429 till the minute ends
    )
    # Proxies in front of the web that each append the address they were connected from to X-Forwarded-For (one
    # on Heroku, Render and Fly): the client address that failed authentications count against. docs/security.md
    # Origins (comma-separated, e.g. `https://app.example.com`) whose pages may call /v1 from a browser (CORS).
    cors_origins: str = ""
    trusted_proxy_hops: Annotated[int, msgspec.Meta(ge=0, le=10)] = 0
    # Bearer JWTs from an identity provider, beside API keys, once the JWKS URL is set (then issuer and audience
    # must be too): docs/security.md "Tokens from an identity provider".
    jwt_jwks_url: str = ""
    jwt_issuer: str = ""  # the `iss` every token must carry
    jwt_audience: str = ""  # an `aud` every token must carry
    jwt_tenant_claim: Annotated[str, msgspec.Meta(min_length=1)] = "tenant"  # the claim naming the token's tenant
    jwt_write_scope: str = ""  # set: only a token granted this scope writes; the rest read only
    body_timeout_s: Seconds = 30.0  # the whole request body must arrive within this, else 408
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 16_384  # request line and headers, else 431
    header_timeout_s: Seconds = 10.0  # the request line and headers must arrive within this, else 408
    stream_keepalive_s: Annotated[float, msgspec.Meta(gt=0, le=15)] = 10.0  # the SSE comment that keeps proxies open
    stream_max_s: Seconds = 1800.0  # an event stream then ends with a `reconnect` event, so connections rebalance
    events_poll_s: Seconds = 5.0  # followers re-read the event log this often without a notification (Redis down)


def env_name(field: str) -> str:
    return _PLATFORM_NAMES.get(field, f"OUTLAST_{field.upper()}")


STORES_FILE: Final = "stores.env"  # under OUTLAST_DATA_DIR (.outlast): the stores a running `make run` uses


def data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where `make run` keeps its embedded stores and says which stores it runs on."""
    return Path(environ.get("OUTLAST_DATA_DIR") or ".outlast").resolve()


def running_stores(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """DATABASE_URL, REDIS_URL and OUTLAST_URL of the `make run` up in this checkout, if one is: what `outlast run`
    wrote to .outlast/stores.env, so that a command in another terminal finds them without copied URLs."""
    try:
        text = (data_dir(environ) / STORES_FILE).read_text()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def from_env(
    environ: Mapping[str, str] = os.environ, *, needs: tuple[str, ...] = ("DATABASE_URL", "REDIS_URL")
) -> Config:
    """Build the Config from environment strings; a bad value raises naming its variable.

    DATABASE_URL and REDIS_URL come from the environment or, unset there, from a `make run` up in this checkout;
    with neither, one line says what to set (of the stores this process `needs`): never a silent connection to
    whatever answers on 5432 and 6379."""
    stores = {name: value for name, value in running_stores(environ).items() if name in ("DATABASE_URL", "REDIS_URL")}
    environ = {**stores, **{name: value for name, value in environ.items() if value != ""}}
    missing = [name for name in needs if name not in environ]
    if missing:
        raise SystemExit(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set, and no `make run` is up in this"
            f" directory ({data_dir(environ) / STORES_FILE}): set {' and '.join(missing)}, or start `make run` here"
        )
    raw = {f.name: environ[env_name(f.name)] for f in msgspec.structs.fields(Config) if env_name(f.name) in environ}
    try:
        return msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        field = str(exc).rpartition("$.")[2].rstrip("`")
        raise SystemExit(f"configuration error in {env_name(field)}: {exc}") from None
