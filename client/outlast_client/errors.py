"""Every error the client raises, typed by the problem the server answered (RFC 9457, its `type` slug).

OutlastError                  the base: catch it for anything the client raises
 ├── Unreachable              no answer: network errors and timeouts, tried again until `retry_for` ran out
 └── APIError                 a problem+json answer: .status, .type, .title, .detail, .errors
      ├── InvalidInput        400, 413, 415, 422, 431: validation-error, invalid-body, … (.errors names fields)
      │    ├── UnknownJobType        unknown-job-type
      │    └── IdempotencyKeyReused  idempotency-key-reused: the key made another job
      ├── Unauthorized        401: no valid API key or read token
      ├── Forbidden           403: the key may not do this (a read-only key's write)
      ├── NotFound            404: unknown id, or another tenant's
      ├── Conflict            409: the job's state does not allow it (cancel a finished job, retry a live one)
      │    ├── JobNotDone     job-not-done; also wait() when its timeout passes (.job: the job as last seen)
      │    └── JobFailed      job-failed: result() of a failed, cancelled or expired job (.error: the job's)
      ├── Gone                410: the result is past its retention
      ├── RateLimited         429 (.retry_after), once tries ran out
      ├── Unavailable         503 (.retry_after), once tries ran out
      └── ServerError         any other 5xx
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
import msgspec

from outlast_client.models import Error, Job


class FieldError(msgspec.Struct, frozen=True):
    loc: str  # a JSON path into the request, e.g. `$.input.data[0]`, or a header's or parameter's name
    msg: str


class Problem(msgspec.Struct, frozen=True):
    type: str = "about:blank"
    title: str = ""
    status: int = 0
    detail: str | None = None
    errors: list[FieldError] = []
    error: Error | None = None


class OutlastError(Exception):
    """Anything the client raises."""


class Unreachable(OutlastError):
    """The server did not answer: every try failed on the network, until the client's `retry_for` ran out."""


class APIError(OutlastError):
    """The server answered with a problem (application/problem+json)."""

    def __init__(self, problem: Problem, *, retry_after: float | None = None, job_id: str | None = None) -> None:
        super().__init__(problem.detail or problem.title or f"HTTP {problem.status}")
        self.problem = problem
        self.status = problem.status
        self.type = problem.type  # `/problems/<slug>`
        self.title = problem.title
        self.detail = problem.detail
        self.errors = problem.errors
        self.retry_after = retry_after  # seconds, from the answer's Retry-After
        self.job_id = job_id  # the job the request named, if any

    @property
    def slug(self) -> str:
        return self.type.rpartition("/")[2]


class InvalidInput(APIError):
    """The request was refused as it is: `errors` names the fields (`loc`) and what is wrong with each (`msg`)."""


class UnknownJobType(InvalidInput):
    pass


class IdempotencyKeyReused(InvalidInput):
    pass


class Unauthorized(APIError):
    pass


class Forbidden(APIError):
    pass


class NotFound(APIError):
    pass


class Conflict(APIError):
    pass


class JobNotDone(Conflict, TimeoutError):
    """The job has not finished yet; from wait(), `job` is the job as last seen."""

    def __init__(
        self, problem: Problem, *, retry_after: float | None = None, job_id: str | None = None, job: Job | None = None
    ) -> None:
        super().__init__(problem, retry_after=retry_after, job_id=job_id)
        self.job = job


class JobFailed(Conflict):
    """The job ended without a result: `error` is the job's own (its type, message and whether it was retryable)."""

    def __init__(self, problem: Problem, *, retry_after: float | None = None, job_id: str | None = None) -> None:
        super().__init__(problem, retry_after=retry_after, job_id=job_id)
        self.error = problem.error


class Gone(APIError):
    pass


class RateLimited(APIError):
    pass


class Unavailable(APIError):
    pass


class ServerError(APIError):
    pass


BY_SLUG: dict[str, type[APIError]] = {
    "validation-error": InvalidInput,
    "invalid-body": InvalidInput,
    "unknown-job-type": UnknownJobType,
    "idempotency-key-reused": IdempotencyKeyReused,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not-found": NotFound,
    "conflict": Conflict,
    "job-not-done": JobNotDone,
    "job-failed": JobFailed,
    "gone": Gone,
    "rate-limited": RateLimited,
    "unavailable": Unavailable,
}
BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: InvalidInput,
    415: InvalidInput,
    422: InvalidInput,
    429: RateLimited,
    431: InvalidInput,
    503: Unavailable,
}

_decode_problem = msgspec.json.Decoder(Problem).decode


def retry_after(response: httpx.Response) -> float | None:
    """The answer's Retry-After in seconds (delta-seconds or an HTTP date, RFC 9110); None: absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def problem_of(response: httpx.Response) -> Problem:
    """The answer's problem; one made from its status when the body is not problem JSON (e.g. a proxy's HTML page)."""
    try:
        problem = _decode_problem(response.content)
    except msgspec.DecodeError:
        text = response.text.strip()
        return Problem(status=response.status_code, title=response.reason_phrase, detail=text[:200] or None)
    return problem if problem.status else msgspec.structs.replace(problem, status=response.status_code)


def error_of(response: httpx.Response, job_id: str | None = None) -> APIError:
    """The typed error for a 4xx or 5xx answer whose body has been read."""
    problem = problem_of(response)
    cls = BY_SLUG.get(problem.type.rpartition("/")[2]) or BY_STATUS.get(response.status_code)
    if cls is None:
        cls = ServerError if response.status_code >= 500 else APIError
    return cls(problem, retry_after=retry_after(response), job_id=job_id)


def not_done(job: Job, waited_s: float) -> JobNotDone:
    detail = f"the job is still {job.status} after {waited_s:g} s of waiting"
    problem = Problem("/problems/job-not-done", "The job has not finished yet.", 409, detail)
    return JobNotDone(problem, job_id=str(job.id), job=job)


def unreachable(exc: BaseException, tried_s: float, what: str) -> Unreachable:
    return Unreachable(f"{what}: no answer after trying for {tried_s:.0f} s; last: {type(exc).__name__}: {exc}")
