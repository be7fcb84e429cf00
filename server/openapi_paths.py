"""The operations of /openapi.json under /v1, with their parameters, headers and answers (the public ones outside it
are in server/openapi_ops.py). The schemas they name are built from the msgspec types in server/openapi.py."""

from __future__ import annotations

from typing import Any

from server.openapi_blobs import RESULT_ANSWERS, RESULT_PARAMETERS, uploads
from worker.schedules import ID_PATTERN

REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


_PROBLEM = {"application/problem+json": {"schema": _ref("Problem")}}
_INTEGER = {"schema": {"type": "integer"}}


def _problem(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": _PROBLEM}
    if headers:
        answer["headers"] = {name.replace("_", "-"): header for name, header in headers.items()}
    return answer


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
# The read token of a Job's links, for a caller without an API key (a browser's EventSource). Declared as a
# parameter as well as a security scheme: generators pass parameters, and most ignore apiKey-in-query schemes.
_TOKEN = {
    "name": "token",
    "in": "query",
    "description": "the job read token in a Job's `links` (`?token=olt_…`), instead of an API key: this job's"
    " GET routes only, for 15 minutes by default",
    "schema": {"type": "string"},
}
_READ: list[dict[str, list[str]]] = [{"apiKey": []}, {"jobReadToken": []}]
_PREFER = {
    "name": "Prefer",
    "in": "header",
    "description": "`wait=N` (RFC 7240, N ≤ 60): hold the answer until the job is done or N seconds pass",
    "schema": {"type": "string"},
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds before polling again", **_INTEGER}}
_LOCATION = {"Location": {"description": "the job's URL", "schema": {"type": "string"}}}
_REPLAYED = {
    "Idempotent-Replayed": {
        "description": "present when this Idempotency-Key already made the job: that job is answered again",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
_APPLIED = {
    "Preference-Applied": {"description": "`wait=N`, echoing the Prefer honoured", "schema": {"type": "string"}}
}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "description": "the same key and body again returns the same job (Idempotent-Replayed: true); kept 24 h",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
}
# Every /v1 operation may answer these, whatever it does.
_GUARDED = {
    "401": {
        "description": "missing, malformed, unknown or revoked API key (or job read token)",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        "content": _PROBLEM,
    },
    "429": _problem("a rate limit: too many submits, streams or failed authentications", Retry_After=_INTEGER),
    "503": _problem("the database is unreachable", Retry_After=_INTEGER),
}
_WRITES = {"403": _problem("a read-only key: it may read, never write")}
# A body that does not arrive as JSON, whatever the route.
_BODY = {
    "400": _problem("the body is not JSON, is empty, too deep or repeats a key"),
    "408": _problem("the body did not arrive in time"),
    "413": _problem("the body is too large"),
    "415": _problem("the body is not declared application/json"),
}
_NOT_FOUND = {"404": _problem("unknown or malformed id, or another tenant's job")}
# After a submit, its job can be read, waited on and cancelled: what schemathesis's stateful phase follows.
_JOB_LINKS = {
    name: {"operationId": operation, "parameters": {"id": "$response.body#/id"}}
    for name, operation in (("GetJob", "getJob"), ("GetJobResult", "getJobResult"), ("CancelJob", "cancelJob"))
}


_LAST_EVENT_ID = {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string", "pattern": "^[0-9]{1,9}$"}}


def _event_stream(operation: str, of: str, events: str, missing: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A GET answered with Server-Sent Events: a job's stream, or a workflow's."""
    stream = {"text/event-stream": {"schema": _ref("ServerSentEvent")}}
    responses = {
        "200": {"description": f"{events}; `reconnect` when it ends early", "content": stream},
        "204": {"description": f"the {of} ended and nothing follows Last-Event-ID"},
        **missing,
        "422": _problem("Last-Event-ID is not an event id"),
    }
    summary = f"The {of}'s events as Server-Sent Events: replayed after Last-Event-ID, then live"
    return {"get": {"operationId": operation, "summary": summary, **extra, "responses": responses}}


def _submits(submit: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
    return {
        "/v1/jobs": {
            "post": {
                "operationId": "submitJob",
                "summary": "Submit a job: 202 at once with the queued Job, or 200 with the finished one",
                "description": "With `Prefer: wait=N`, a job done within N seconds answers 200 with the final Job"
                " and `Preference-Applied`; any other answers 202 as without it.",
                "parameters": [_IDEMPOTENCY_KEY, _PREFER],
                "requestBody": {"required": True, "content": {"application/json": {"schema": submit}}},
                "responses": {
                    "200": {
                        "description": "done within the `Prefer: wait=N` asked for: the final Job",
                        "headers": {**_LOCATION, **_APPLIED, **_REPLAYED},
                        "content": _json("Job"),
                        "links": _JOB_LINKS,
                    },
                    "202": {
                        "description": "accepted, or the job this Idempotency-Key made (then Idempotent-Replayed)",
                        "headers": {**_LOCATION, **_RETRY_AFTER, **_REPLAYED},
                        "content": _json("Job"),
                        "links": _JOB_LINKS,
                    },
                    **_BODY,
                    "422": _problem("unknown type, a field fails the schema, or the Idempotency-Key was reused"),
                },
            },
        },
        "/v1/jobs/batch": {
            "post": {
                "operationId": "submitJobs",
                "summary": "Submit many jobs in one transaction: all are created, or none",
                "description": "Each item may carry its own `idempotency_key`. One bad item answers 422 for the"
                " whole batch, its `errors[].loc` naming the item (`$.jobs[17].input.data`).",
                "requestBody": {"required": True, "content": {"application/json": {"schema": batch}}},
                "responses": {
                    "202": {"description": "the Jobs, in the order given", "content": _json("JobItems")},
                    **_BODY,
                    "422": _problem("an item fails as a submit would, or the batch is empty or too long"),
                },
            }
        },
        "/v1/jobs/{id}/retry": {
            "post": {
                "operationId": "retryJob",
                "summary": "A new job with the same type, input, limits, metadata and callback, naming this one",
                "parameters": [_ID],
                "responses": {
                    "202": {
                        "description": "the new Job, its `retry_of` the job retried",
                        "headers": _LOCATION,
                        "content": _json("Job"),
                        "links": _JOB_LINKS,
                    },
                    **_NOT_FOUND,
                    "409": _problem("the job is not failed, cancelled or expired"),
                    "422": _problem("the job's type is no longer registered"),
                },
            }
        },
    }


def _reads() -> dict[str, Any]:
    return {
        "/v1/jobs/{id}": {
            "get": {
                "operationId": "getJob",
                "security": _READ,
                "summary": "The Job; `Prefer: wait=N` holds the answer until it is done or N seconds pass",
                "parameters": [_ID, _PREFER, _TOKEN],
                "responses": {
                    "200": {
                        "description": "the job; Retry-After while it is not done",
                        "headers": {**_RETRY_AFTER, **_APPLIED},
                        "content": _json("Job"),
                    },
                    **_NOT_FOUND,
                },
            }
        },
        "/v1/jobs/{id}/result": {
            "get": {
                "operationId": "getJobResult",
                "security": _READ,
                "summary": "The result alone, as the job's code returned it; a large one streams, with Range",
                "parameters": [_ID, _TOKEN, *RESULT_PARAMETERS],
                "responses": {
                    "200": {"description": "the result", "content": {"application/json": {"schema": {}}}},
                    **RESULT_ANSWERS,
                    **_NOT_FOUND,
                    "409": _problem(
                        "not done yet (job-not-done, with Retry-After), or ended without a result (job-failed,"
                        " carrying the job's error)",
                        Retry_After=_INTEGER,
                    ),
                    "410": _problem("past retention"),
                },
            }
        },
        "/v1/jobs/{id}/events": _event_stream(
            "followJobEvents",
            "job",
            "`status` (data: the Job), `progress`, `log`",
            _NOT_FOUND,
            security=_READ,
            parameters=[_ID, _LAST_EVENT_ID, _TOKEN],
        ),
        "/v1/events": {
            "get": {
                "operationId": "followEvents",
                "summary": "The tenant's job changes as Server-Sent Events, resumable after Last-Event-ID",
                "parameters": [
                    {"name": "status", "in": "query", "schema": _ref("JobStatus")},
                    {"name": "type", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "follow",
                        "in": "query",
                        "description": "false: the changes after Last-Event-ID up to now, then the stream ends",
                        "schema": {"type": "boolean", "default": True},
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,20}[.][0-9]{1,19}$"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "`job` events (data: the Job without input and result, as it is now), an"
                        " `id:` line alone past changes the filters hid; `reconnect` when it ends",
                        "content": {"text/event-stream": {"schema": _ref("ServerSentEvent")}},
                    },
                    "422": _problem("Last-Event-ID is not an event id of this stream, or a bad filter"),
                },
            },
        },
        "/v1/jobs": {
            "get": {
                "operationId": "listJobs",
                "summary": "The tenant's jobs, newest first",
                "parameters": [
                    {"name": "status", "in": "query", "schema": _ref("JobStatus")},
                    {"name": "type", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "a page; next_cursor fetches the next", "content": _json("JobList")},
                    "422": _problem("bad query"),
                },
            },
        },
        "/v1/job-types": {
            "get": {
                "operationId": "listJobTypes",
                "summary": "The registered job types with their input JSON Schemas",
                "responses": {"200": {"description": "the types", "content": _json("JobTypeList")}},
            }
        },
        "/v1/stats": {
            "get": {
                "operationId": "stats",
                "summary": "The tenant's queue: live counts by type, the oldest due job's age, workers, the last hour",
                "responses": {"200": {"description": "the queue", "content": _json("Stats")}},
            }
        },
    }


def _changes() -> dict[str, Any]:
    return {
        "/v1/jobs/cancel": {
            "post": {
                "operationId": "cancelJobs",
                "summary": "Cancel the tenant's live jobs matching every filter given, at most 10,000 a call",
                "requestBody": {"required": True, "content": _json("CancelFilter")},
                "responses": {
                    "202": {"description": "how many were cancelled or asked to stop", "content": _json("Cancelled")},
                    **_BODY,
                    "422": _problem("a filter fails the schema"),
                },
            }
        },
        "/v1/jobs/{id}/cancel": {
            "post": {
                "operationId": "cancelJob",
                "summary": "Cancel: a queued job at once, a running one as soon as its task is interrupted",
                "parameters": [_ID],
                "responses": {
                    "202": {
                        "description": "cancelled, or cancel requested",
                        "headers": _LOCATION,
                        "content": _json("Job"),
                    },
                    **_NOT_FOUND,
                    "409": _problem("already done"),
                },
            }
        },
        "/v1/jobs/{id}/deliveries": {
            "get": {
                "operationId": "listDeliveries",
                "tags": ["webhooks"],
                "summary": "The job's webhook deliveries, oldest first, each with every attempt",
                "parameters": [_ID],
                "responses": {"200": {"description": "the deliveries", "content": _json("DeliveryList")}, **_NOT_FOUND},
            }
        },
        "/v1/jobs/{id}/deliveries/redeliver": {
            "post": {
                "operationId": "redeliver",
                "tags": ["webhooks"],
                "summary": "Queue a fresh delivery of the finished job to its callback_url",
                "parameters": [_ID],
                "responses": {
                    "202": {
                        "description": "queued, or the delivery already pending",
                        "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": _json("Delivery"),
                    },
                    **_NOT_FOUND,
                    "409": _problem("not done yet, or no callback_url", Retry_After=_INTEGER),
                },
            }
        },
    }


_SCHEDULE_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": f"^{ID_PATTERN}$"},
}
_SCHEDULE_422 = {"422": _problem("a bad cron or timezone, an unknown type, or a field failing the schema")}


def _schedules() -> dict[str, Any]:
    """/v1/schedules: server/schedules.py."""
    one = {"description": "the schedule", "content": _json("ScheduleResource")}
    missing = {"404": _problem("no such schedule (or another tenant's)")}
    declared = _problem("declared in a job module's SCHEDULES: only `paused` may change here")
    return {
        "/v1/schedules": {
            "get": {
                "operationId": "listSchedules",
                "summary": "The tenant's cron schedules, by id",
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "a page", "content": _json("ScheduleList")},
                    "422": _problem("bad query"),
                },
            },
            "post": {
                "operationId": "createSchedule",
                "summary": "A cron schedule: each tick of `cron` in `timezone` makes one job",
                "requestBody": {"required": True, "content": _json("NewSchedule")},
                "responses": {
                    "201": {**one, "headers": {"Location": {"schema": {"type": "string"}}}},
                    **_BODY,
                    "409": _problem("a schedule of that id exists"),
                    **_SCHEDULE_422,
                },
            },
        },
        "/v1/schedules/{id}": {
            "get": {"operationId": "getSchedule", "parameters": [_SCHEDULE_ID], "responses": {"200": one, **missing}},
            "patch": {
                "operationId": "changeSchedule",
                "summary": "Change the given fields; `paused` pauses and resumes",
                "parameters": [_SCHEDULE_ID],
                "requestBody": {"required": True, "content": _json("ScheduleChange")},
                "responses": {"200": one, **_BODY, **missing, "409": declared, **_SCHEDULE_422},
            },
            "delete": {
                "operationId": "deleteSchedule",
                "parameters": [_SCHEDULE_ID],
                "responses": {"204": {"description": "deleted"}, **missing, "409": declared},
            },
        },
        "/v1/schedules/{id}/trigger": {
            "post": {
                "operationId": "triggerSchedule",
                "summary": "A job of the schedule now, paused or not; its next tick stays",
                "parameters": [_SCHEDULE_ID],
                "responses": {
                    "202": {
                        "description": "the job",
                        "headers": _LOCATION,
                        "content": _json("Job"),
                        "links": _JOB_LINKS,
                    },
                    **missing,
                    "422": _problem("the schedule's type is no longer registered"),
                },
            }
        },
    }


def _workflows() -> dict[str, Any]:
    """/v1/workflows: server/workflows.py."""
    one = {"description": "the workflow", "content": _json("Workflow")}
    missing = {"404": _problem("unknown or malformed id, or another tenant's workflow")}
    return {
        "/v1/workflows": {
            "post": {
                "operationId": "submitWorkflow",
                "summary": "A DAG of steps: each a job, or (`map`) a job per item of another step's list result",
                "requestBody": {"required": True, "content": _json("SubmitWorkflow")},
                "responses": {
                    "202": {**one, "headers": {**_LOCATION, **_RETRY_AFTER}},
                    **_BODY,
                    "422": _problem("a cycle, an unknown step or type, or a step's field failing its type's schema"),
                },
            },
        },
        "/v1/workflows/{id}": {
            "get": {"operationId": "getWorkflow", "parameters": [_ID], "responses": {"200": one, **missing}},
        },
        "/v1/workflows/{id}/events": _event_stream(
            "followWorkflowEvents",
            "workflow",
            "`step` (data: the step and its status), `workflow` (its status, error and finished_at)",
            missing,
            parameters=[_ID, _LAST_EVENT_ID],
        ),
        "/v1/workflows/{id}/cancel": {
            "post": {
                "operationId": "cancelWorkflow",
                "summary": "End it `cancelled`: its queued jobs are cancelled, its running ones asked to stop",
                "parameters": [_ID],
                "responses": {
                    "202": {**one, "headers": _LOCATION},
                    **missing,
                    "409": _problem("the workflow has already ended"),
                },
            }
        },
    }


def paths(submit: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
    """Every operation, given the submit and batch body schemas (a union over the job types)."""
    found: dict[str, Any] = {}
    for group in (_submits(submit, batch), _reads(), _changes(), uploads()):
        for path, operations in group.items():
            found.setdefault(path, {}).update(operations)
    for path, operations in _schedules().items():
        found[path] = {method: {**op, "tags": ["schedules"]} for method, op in operations.items()}
    for path, operations in _workflows().items():
        found[path] = {method: {**op, "tags": ["workflows"]} for method, op in operations.items()}
    for operation in (op for ops in found.values() for op in ops.values()):
        operation.setdefault("tags", ["jobs"])
        writes = _WRITES if operation["operationId"] in _WRITING else {}
        operation["responses"] = {**_GUARDED, **writes, **operation["responses"]}
    found = {path: found[path] for path in sorted(found, key=_ORDER.index)}
    return found


# As /docs lists them: a job's life in order.
_ORDER = (
    "/v1/jobs",
    "/v1/jobs/batch",
    "/v1/jobs/{id}",
    "/v1/jobs/{id}/events",
    "/v1/jobs/{id}/result",
    "/v1/jobs/{id}/cancel",
    "/v1/jobs/cancel",
    "/v1/jobs/{id}/retry",
    "/v1/events",
    "/v1/job-types",
    "/v1/stats",
    "/v1/uploads",
    "/v1/jobs/{id}/deliveries",
    "/v1/jobs/{id}/deliveries/redeliver",
    "/v1/schedules",
    "/v1/schedules/{id}",
    "/v1/schedules/{id}/trigger",
    "/v1/workflows",
    "/v1/workflows/{id}",
    "/v1/workflows/{id}/events",
    "/v1/workflows/{id}/cancel",
)
_WRITING = frozenset({"submitJob", "submitJobs", "retryJob", "cancelJob", "cancelJobs", "redeliver"})
_WRITING |= {"createSchedule", "changeSchedule", "deleteSchedule", "triggerSchedule"}
_WRITING |= {"submitWorkflow", "cancelWorkflow", "createUpload"}
