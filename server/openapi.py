"""/openapi.json, generated from the msgspec types (never written by hand), and /docs, a page that renders it."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from server.jobs import JobList, JobTypeList, SubmitJob
from server.ops import Health, Readiness
from server.problems import Problem
from server.responses import MsgspecResponse
from worker import Job

_REF = "#/components/schemas/{name}"


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(name=ref)}}}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": _REF.format(name="Problem")}}},
    }


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds before polling again"}}


def _schema_hook(t: type) -> dict[str, Any]:
    if t is msgspec.Raw:  # job inputs and results: any JSON, described per type by /v1/job-types
        return {"description": "any JSON value; a job type's input schema is listed by GET /v1/job-types"}
    raise NotImplementedError


def build(title: str = "Outlast", version: str = "0.1.0") -> dict[str, Any]:
    (_, components) = msgspec.json.schema_components(
        [SubmitJob, Job, JobList, JobTypeList, Problem, Health, Readiness], ref_template=_REF, schema_hook=_schema_hook
    )
    paths: dict[str, Any] = {
        "/v1/jobs": {
            "post": {
                "operationId": "submitJob",
                "summary": "Submit a job: answers 202 at once with the queued Job",
                "requestBody": {"required": True, "content": _json("SubmitJob")},
                "responses": {
                    "202": {
                        "description": "accepted",
                        "headers": {"Location": {"schema": {"type": "string"}}, **_RETRY_AFTER},
                        "content": _json("Job"),
                    },
                    "400": _problem("the body is not JSON"),
                    "413": _problem("the body is too large"),
                    "422": _problem("unknown type, or a field fails the schema"),
                    "503": _problem("the database is unreachable"),
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
        "/v1/jobs/{id}": {
            "get": {
                "operationId": "getJob",
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
        "/v1/jobs/{id}/events": {
            "get": {
                "operationId": "followJobEvents",
                "summary": "The job's events as Server-Sent Events: replayed after Last-Event-ID, then live",
                "parameters": [_ID, {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer"}}],
                "responses": {
                    "200": {
                        "description": "`status` (data: the Job), `progress`, `log`; `reconnect` when it ends early",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
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
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }


async def openapi(request: Request) -> Response:
    return MsgspecResponse(request.app.state.openapi)


_DOCS = """<!doctype html>
<html><head><meta charset="utf-8"><title>Outlast API</title></head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="https://cdn.redoc.ly/redoc/latest/bundles/redoc.standalone.js"></script></body></html>
"""


async def docs(request: Request) -> Response:
    return HTMLResponse(_DOCS)
