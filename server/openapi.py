"""/openapi.json, generated from the msgspec types (never written by hand), and /docs, a page that renders it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from server.bulk import CancelFilter, Cancelled
from server.deliveries import DeliveryList
from server.jobs import JobList, JobTypeList
from server.ops import Health, Readiness
from server.problems import Problem
from server.responses import MsgspecResponse
from server.schedules import NewSchedule, ScheduleChange, ScheduleList
from server.state import web_of
from server.submit import SubmitJob
from worker import Job, JobType, schedules, webhook_store

_REF = "#/components/schemas/{name}"


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(name=ref)}}}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": _REF.format(name="Problem")}}},
    }


# One Server-Sent Event as a client parses it: `data` is the JSON text of the Job, the progress or the log line.
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"enum": ["status", "progress", "log", "reconnect"]},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds before polling again"}}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "description": "the same key and body again returns the same job (Idempotent-Replayed: true); kept 24 h",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
}
_SECURITY_SCHEMES = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key from `outlast keys create TENANT`, as `Authorization: Bearer olk_…`",
    },
    "jobReadToken": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "the short-lived read-only token in a Job's links: that job, GET only",
    },
}
# Every /v1 operation may answer these, whatever it does.
_GUARDED = {
    "401": {
        "description": "missing, malformed, unknown or revoked API key",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        "content": {"application/problem+json": {"schema": {"$ref": _REF.format(name="Problem")}}},
    },
    "429": {
        "description": "a rate limit: too many submits, streams or failed authentications",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        "content": {"application/problem+json": {"schema": {"$ref": _REF.format(name="Problem")}}},
    },
    "503": {
        "description": "the database is unreachable",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        "content": {"application/problem+json": {"schema": {"$ref": _REF.format(name="Problem")}}},
    },
}
# After a submit, its job can be read, waited on and cancelled: what schemathesis's stateful phase follows.
_JOB_LINKS = {
    name: {"operationId": operation, "parameters": {"id": "$response.body#/id"}}
    for name, operation in (("GetJob", "getJob"), ("GetJobResult", "getJobResult"), ("CancelJob", "cancelJob"))
}


def _schema_hook(t: type) -> dict[str, Any]:
    if t is msgspec.Raw:  # job inputs and results: any JSON, described per type by /v1/job-types
        return {"description": "any JSON value; a job type's input schema is listed by GET /v1/job-types"}
    raise NotImplementedError


def _submit_schema(job_types: Mapping[str, JobType], components: dict[str, Any]) -> dict[str, Any]:
    """The submit body as one variant per registered job type (`type` fixed, `input` that type's schema), so the
    document says what each type accepts and a client generator, or a fuzzer, can produce jobs that run."""
    if not job_types:
        return {"$ref": _REF.format(name="SubmitJob")}
    (inputs, more) = msgspec.json.schema_components([t.input for t in job_types.values()], ref_template=_REF)
    components.update(more)
    generic = components["SubmitJob"]
    variants = []
    for job_type, input_schema in zip(job_types.values(), inputs, strict=True):
        properties = {**generic["properties"], "type": {"const": job_type.name}, "input": input_schema}
        variants.append({**generic, "title": f"Submit {job_type.name}", "properties": properties})
    return {"oneOf": variants}


_SCHEDULE_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": f"^{schedules.ID_PATTERN}$"},
}
_SCHEDULE_422 = _problem("a bad cron or timezone, an unknown type, or a field that fails the schema (named in errors)")


def _schedule_paths() -> dict[str, Any]:
    """/v1/schedules: server/schedules.py."""
    one = {"description": "the schedule", "content": _json("ScheduleResource")}
    missing = _problem("no such schedule")
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
                    "400": _problem("the body is not JSON"),
                    "409": _problem("a schedule of that id exists"),
                    "413": _problem("the body is too large"),
                    "422": _SCHEDULE_422,
                },
            },
        },
        "/v1/schedules/{id}": {
            "get": {
                "operationId": "getSchedule",
                "parameters": [_SCHEDULE_ID],
                "responses": {"200": one, "404": missing},
            },
            "patch": {
                "operationId": "changeSchedule",
                "summary": "Change the given fields; `paused` pauses and resumes",
                "parameters": [_SCHEDULE_ID],
                "requestBody": {"required": True, "content": _json("ScheduleChange")},
                "responses": {
                    "200": one,
                    "400": _problem("the body is not JSON"),
                    "404": missing,
                    "409": _problem("declared in code: only `paused` may change"),
                    "413": _problem("the body is too large"),
                    "422": _SCHEDULE_422,
                },
            },
            "delete": {
                "operationId": "deleteSchedule",
                "parameters": [_SCHEDULE_ID],
                "responses": {
                    "204": {"description": "deleted"},
                    "404": missing,
                    "409": _problem("declared in code: remove it there"),
                },
            },
        },
        "/v1/schedules/{id}/trigger": {
            "post": {
                "operationId": "triggerSchedule",
                "summary": "A job of the schedule now; its next tick stays",
                "parameters": [_SCHEDULE_ID],
                "responses": {
                    "202": {
                        "description": "the job",
                        "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": _json("Job"),
                        "links": _JOB_LINKS,
                    },
                    "404": missing,
                    "422": _problem("the schedule's type is no longer registered"),
                },
            }
        },
    }


def build(
    job_types: Mapping[str, JobType] | None = None, title: str = "Outlast", version: str = "0.1.0"
) -> dict[str, Any]:
    (_, components) = msgspec.json.schema_components(
        [
            *(SubmitJob, Job, JobList, JobTypeList, DeliveryList, webhook_store.Delivery, Problem, Health, Readiness),
            *(NewSchedule, ScheduleChange, schedules.ScheduleResource, ScheduleList, CancelFilter, Cancelled),
        ],
        ref_template=_REF,
        schema_hook=_schema_hook,
    )
    submit_body = {"application/json": {"schema": _submit_schema(job_types or {}, components)}}
    paths: dict[str, Any] = {
        "/v1/jobs": {
            "post": {
                "operationId": "submitJob",
                "summary": "Submit a job: answers 202 at once with the queued Job",
                "parameters": [_IDEMPOTENCY_KEY],
                "requestBody": {"required": True, "content": submit_body},
                "responses": {
                    "202": {
                        "description": "accepted, or the job this Idempotency-Key made (then Idempotent-Replayed)",
                        "headers": {
                            "Location": {"schema": {"type": "string"}},
                            **_RETRY_AFTER,
                            "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}},
                        },
                        "content": _json("Job"),
                        "links": _JOB_LINKS,
                    },
                    "400": _problem("the body is not JSON"),
                    "408": _problem("the body did not arrive in time"),
                    "413": _problem("the body is too large"),
                    "422": _problem("unknown type, a field fails the schema, or the Idempotency-Key was reused"),
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "The tenant's jobs, newest first",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"$ref": _REF.format(name="Job") + "/properties/status"},
                    },
                    {"name": "type", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "a page", "content": _json("JobList")},
                    "422": _problem("bad query"),
                },
            },
        },
        "/v1/jobs/cancel": {
            "post": {
                "operationId": "cancelJobs",
                "summary": "Cancel the tenant's live jobs matching every filter given, at most 10,000 a call",
                "requestBody": {"required": True, "content": _json("CancelFilter")},
                "responses": {
                    "202": {"description": "how many were cancelled or asked to stop", "content": _json("Cancelled")},
                    "400": _problem("the body is not JSON"),
                    "413": _problem("the body is too large"),
                    "422": _problem("a filter fails the schema"),
                },
            }
        },
        "/v1/jobs/{id}": {
            "get": {
                "operationId": "getJob",
                "security": [{"apiKey": []}, {"jobReadToken": []}],
                "summary": "The Job; `Prefer: wait=N` holds the answer until it is done or N seconds pass",
                "parameters": [_ID, {"name": "Prefer", "in": "header", "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "the job", "headers": _RETRY_AFTER, "content": _json("Job")},
                    "404": _problem("unknown or malformed id"),
                },
            }
        },
        "/v1/jobs/{id}/result": {
            "get": {
                "operationId": "getJobResult",
                "summary": "The result alone",
                "parameters": [_ID],
                "responses": {
                    "200": {"description": "the result", "content": {"application/json": {"schema": {}}}},
                    "404": _problem("unknown or malformed id"),
                    "409": _problem("not done yet, or ended without a result"),
                    "410": _problem("past retention"),
                },
            }
        },
        "/v1/jobs/{id}/cancel": {
            "post": {
                "operationId": "cancelJob",
                "summary": "Cancel: a queued job at once, a running one as soon as its task is interrupted",
                "parameters": [_ID],
                "responses": {
                    "202": {"description": "cancelled, or cancel requested", "content": _json("Job")},
                    "404": _problem("unknown or malformed id"),
                    "409": _problem("already done"),
                },
            }
        },
        "/v1/jobs/{id}/events": {
            "get": {
                "operationId": "followJobEvents",
                "security": [{"apiKey": []}, {"jobReadToken": []}],
                "summary": "The job's events as Server-Sent Events: replayed after Last-Event-ID, then live",
                "parameters": [
                    _ID,
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string", "pattern": "^[0-9]{1,9}$"}},
                ],
                "responses": {
                    "200": {
                        "description": "`status` (data: the Job), `progress`, `log`; `reconnect` when it ends early",
                        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
                    },
                    "204": {"description": "the job ended and nothing follows Last-Event-ID"},
                    "404": _problem("unknown or malformed id"),
                    "422": _problem("Last-Event-ID is not an event id"),
                },
            }
        },
        "/v1/job-types": {
            "get": {
                "operationId": "listJobTypes",
                "summary": "The registered job types with their input JSON Schemas",
                "responses": {"200": {"description": "the types", "content": _json("JobTypeList")}},
            }
        },
        "/v1/jobs/{id}/deliveries": {
            "get": {
                "operationId": "listDeliveries",
                "summary": "The job's webhook deliveries, oldest first, each with every attempt",
                "parameters": [_ID],
                "responses": {
                    "200": {"description": "the deliveries", "content": _json("DeliveryList")},
                    "404": _problem("unknown or malformed id"),
                },
            }
        },
        "/v1/jobs/{id}/deliveries/redeliver": {
            "post": {
                "operationId": "redeliver",
                "summary": "Queue a fresh delivery of the finished job to its callback_url",
                "parameters": [_ID],
                "responses": {
                    "202": {"description": "queued", "content": _json("Delivery")},
                    "404": _problem("unknown or malformed id"),
                    "409": _problem("not done yet, or no callback_url"),
                },
            }
        },
        **_schedule_paths(),
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "responses": {"200": {"description": "alive", "content": _json("Health")}},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "responses": {"200": {"description": "Prometheus text exposition", "content": {"text/plain": {}}}},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "responses": {
                    "200": {"description": "both stores answer", "content": _json("Readiness")},
                    "503": {
                        "description": "a store is down",
                        "content": {"application/problem+json": {"schema": {"$ref": _REF.format(name="Readiness")}}},
                    },
                },
            }
        },
    }
    for path, operations in paths.items():
        for operation in operations.values():
            if path.startswith("/v1/"):
                operation["responses"] = {**_GUARDED, **operation["responses"]}
            else:
                operation["security"] = []  # health and the docs are public
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": _SECURITY_SCHEMES},
    }


async def openapi(request: Request) -> Response:
    return MsgspecResponse(web_of(request).openapi)


_DOCS = """<!doctype html>
<html><head><meta charset="utf-8"><title>Outlast API</title></head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="https://cdn.redoc.ly/redoc/latest/bundles/redoc.standalone.js"></script></body></html>
"""


async def docs(request: Request) -> Response:
    return HTMLResponse(_DOCS)
