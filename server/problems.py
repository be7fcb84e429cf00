"""Every error a client can see, as RFC 9457 problem+json, and the handlers that render them.

    ProblemError                 400 (the base: its subclasses are the slugs of API.md)
     ├── InvalidBody             400 invalid-body
     ├── Unauthorized            401 unauthorized (with WWW-Authenticate: Bearer)
     ├── Forbidden               403 forbidden (a read-only credential that tried to write)
     ├── ValidationError         422 validation-error
     ├── IdempotencyKeyReused    422 idempotency-key-reused
     ├── UnknownJobType          422 unknown-job-type
     ├── NotFound                404 not-found
     ├── Conflict                409 conflict
     │    ├── JobNotDone         409 job-not-done
     │    └── JobFailed          409 job-failed (carries the job's error)
     ├── RequestTimeout          408 request-timeout (the headers or the body did not arrive in time)
     ├── Gone                    410 gone
     ├── PayloadTooLarge         413 payload-too-large
     ├── UnsupportedMediaType    415 unsupported-media-type (the body is not declared JSON)
     ├── RangeNotSatisfiable     416 range-not-satisfiable (with Content-Range: bytes */size)
     ├── HeaderTooLarge          431 header-too-large (the request line and headers; server/protocol.py)
     ├── RateLimited             429 rate-limited (with Retry-After)
     └── Unavailable             503 unavailable (with Retry-After)

The `type` of a problem is `/problems/<slug>`, the class name in kebab case. No request gets a traceback:
an unexpected exception answers a generic 500 problem and is logged here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, ClassVar

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from server.responses import ProblemResponse
from server.state import web_of
from worker import Error, database, metrics

log = logging.getLogger("outlast.web")


class FieldError(msgspec.Struct, frozen=True):
    loc: str  # a JSON path into the request, e.g. `$.input.data[0]`, or a query parameter's name
    msg: str


class Problem(msgspec.Struct, frozen=True, omit_defaults=True):
    type: str
    title: str
    status: int
    detail: str | None = None
    errors: list[FieldError] = []
    error: Error | None = None  # job-failed: why the job ended


def slug(cls: type) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", cls.__name__).lower()


class ProblemError(Exception):
    """Bad request."""

    status: ClassVar[int] = 400
    headers: Mapping[str, str] = {}

    def __init__(self, detail: str | None = None, errors: list[FieldError] | None = None) -> None:
        self.title = (type(self).__doc__ or "").strip()
        super().__init__(detail or self.title)
        self.detail = detail
        self.errors = errors or []

    def problem(self) -> Problem:
        return Problem(f"/problems/{slug(type(self))}", self.title, self.status, self.detail, self.errors)


class InvalidBody(ProblemError):
    """The request body is not valid JSON."""


class ValidationError(ProblemError):
    """The request does not match the schema."""

    status = 422

    @classmethod
    def from_msgspec(cls, exc: msgspec.ValidationError, *, prefix: str = "$") -> ValidationError:
        """msgspec says ``Expected `int`, got `str` - at `$.data[1]` ``: keep the message, re-root the path."""
        text = str(exc)
        msg, sep, path = text.rpartition(" - at `")
        if not sep:
            return cls(text, [FieldError(prefix, text)])
        loc = prefix + path.rstrip("`").removeprefix("$")
        return cls(f"{msg} at {loc}", [FieldError(loc, msg)])


class Unauthorized(ProblemError):
    """A valid API key is required."""

    status = 401

    def __init__(self, detail: str, *, presented: bool = True) -> None:
        super().__init__(detail)
        self.presented = presented  # credentials came with the request (and were refused)
        # RFC 6750: name the error only when credentials were presented, so a bare request learns nothing more.
        challenge = 'Bearer realm="outlast"' + (', error="invalid_token"' if presented else "")
        self.headers = {"WWW-Authenticate": challenge}


class Forbidden(ProblemError):
    """This credential may not do this."""

    status = 403


class IdempotencyKeyReused(ProblemError):
    """This Idempotency-Key was already used with another request."""

    status = 422


class UnknownJobType(ProblemError):
    """Unknown job type."""

    status = 422


class NotFound(ProblemError):
    """No such resource."""

    status = 404


class Conflict(ProblemError):
    """The resource is not in a state that allows this."""

    status = 409


class JobNotDone(Conflict):
    """The job has not finished yet."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the job has not finished yet; poll the job or wait on it with `Prefer: wait=N`")
        self.headers = {"Retry-After": str(retry_after)}


class JobFailed(Conflict):
    """The job ended without a result."""

    def __init__(self, status: str, error: Error | None) -> None:
        super().__init__(f"the job ended {status}" + (f": {error.message}" if error else ""))
        self.error = error

    def problem(self) -> Problem:
        return msgspec.structs.replace(super().problem(), error=self.error)


class RequestTimeout(ProblemError):
    """The request did not arrive in time."""

    status = 408

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        # The rest of the request may still be on its way: this connection can't carry another one.
        self.headers = {"Connection": "close"}


class Gone(ProblemError):
    """The result is past its retention."""

    status = 410


class PayloadTooLarge(ProblemError):
    """The request body is too large."""

    status = 413


class UnsupportedMediaType(ProblemError):
    """The request body is not of a media type this route takes."""

    status = 415


class RangeNotSatisfiable(ProblemError):
    """The range asked for is not within the content."""

    status = 416

    def __init__(self, size: int) -> None:
        super().__init__(f"the content is {size} bytes long: a range must start before its end")
        self.headers = {"Content-Range": f"bytes */{size}"}


class HeaderTooLarge(ProblemError):
    """The request line and headers are too large."""

    status = 431

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        # The rest of the headers are unread: this connection can't carry another request.
        self.headers = {"Connection": "close"}


class RateLimited(ProblemError):
    """Too many requests."""

    status = 429

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(max(1, retry_after))}


class Unavailable(ProblemError):
    """A service this request needs is unavailable."""

    status = 503

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after)}


def _render(problem: Problem, headers: Mapping[str, str] | None = None) -> Response:
    return ProblemResponse(problem, status_code=problem.status, headers=dict(headers or {}))


def as_response(exc: ProblemError) -> Response:
    """The problem+json answer for `exc`, for code that runs outside the exception handlers (ASGI middleware)."""
    return _render(exc.problem(), exc.headers)


async def on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return as_response(exc)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return await on_problem(request, NotFound(f"no route for {request.url.path}"))
    phrase = HTTPStatus(exc.status_code).phrase
    problem = Problem(f"/problems/{phrase.lower().replace(' ', '-')}", phrase, exc.status_code, exc.detail)
    return _render(problem, exc.headers)


async def on_database_down(request: Request, exc: Exception) -> Response:
    log.warning("%s %s: database unavailable: %r", request.method, request.url.path, exc)
    metrics.database_errors.inc()
    retry_after = web_of(request).config.retry_after_s
    return await on_problem(request, Unavailable("the database is unreachable; retry shortly", retry_after))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _render(Problem("/problems/internal-error", "Internal server error", 500, "the error was logged"))


HANDLERS: Mapping[Any, Any] = {
    ProblemError: on_problem,
    HTTPException: on_http_exception,
    **dict.fromkeys(database.UNAVAILABLE, on_database_down),
    Exception: on_unexpected,
}
