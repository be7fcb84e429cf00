"""/openapi.json, generated from the msgspec types (never written by hand), shaped so that client generators take
it whole: every schema a component with a unique title, each job type's input and submit body named after the type
(`SquareSumInput`, `SquareSumSubmit`), the submit body a discriminated union on `type`, and no `$ref` into a
schema's properties. The operations themselves are in server/openapi_paths.py; /docs in server/docs.py."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any, get_args

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from server.bulk import CancelFilter, Cancelled
from server.deliveries import DeliveryList
from server.jobs import JobList, JobTypeList
from server.openapi_ops import operations
from server.openapi_paths import REF, paths
from server.ops import Health, Readiness
from server.problems import Problem
from server.responses import MsgspecResponse
from server.schedules import NewSchedule, ScheduleChange, ScheduleList
from server.state import web_of
from server.submit import JobItems, SubmitBatch, SubmitJob
from server.uploads import Upload
from server.workflows import SubmitWorkflow
from worker import Job, JobType, Status, schedules, stats, webhook_store, workflows

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
# One Server-Sent Event as a client parses it: `data` is the JSON text of the Job, the progress or the log line.
_SSE_EVENT = {
    "title": "ServerSentEvent",
    "description": "one event of a job's stream (or of the tenant feed: `job`), as an SSE client parses it; `data` is"
    " JSON text",
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["status", "progress", "log", "job", "reconnect"]},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}

# Every body and answer msgspec describes; the submit bodies are remade per job type from SubmitJob and BatchItem.
_TYPES: tuple[type, ...] = (SubmitJob, SubmitBatch, Job, JobItems, JobList, JobTypeList, DeliveryList)
_TYPES += (webhook_store.Delivery, Problem, Health, Readiness, CancelFilter, Cancelled)
_TYPES += (NewSchedule, ScheduleChange, schedules.ScheduleResource, ScheduleList)
_TYPES += (SubmitWorkflow, workflows.Workflow)
_TYPES += (stats.Stats, Upload)


def _schema_hook(t: type) -> dict[str, Any]:
    if t is msgspec.Raw:  # job inputs and results: any JSON, described per type by /v1/job-types
        return {"description": "any JSON value; a job type's input schema is listed by GET /v1/job-types"}
    raise NotImplementedError


def _pascal(name: str) -> str:
    """`square_sum` -> `SquareSum`: a job type's name as the prefix of its schemas' names."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9A-Za-z]+", name)) or "Job"


def _retarget(node: Any, old: str, new: str) -> Any:
    """`node` with every `$ref` to `old` pointing at `new` instead."""
    if isinstance(node, dict):
        return {k: new if k == "$ref" and v == old else _retarget(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_retarget(v, old, new) for v in node]
    return node


def _without_closed_tuples(node: Any) -> Any:
    """`node` less the `items: false` msgspec writes after a tuple's `prefixItems`: its `maxItems` already closes the
    tuple, and generators (openapi-python-client) refuse a boolean where they expect a schema."""
    if isinstance(node, dict):
        return {
            k: _without_closed_tuples(v)
            for k, v in node.items()
            if not (k == "items" and v is False and "prefixItems" in node and "maxItems" in node)
        }
    if isinstance(node, list):
        return [_without_closed_tuples(v) for v in node]
    return node


def _input_schemas(job_type: JobType, prefix: str) -> dict[str, Any]:
    """`job_type`'s input schema as the component `<Prefix>Input`, its nested structs as `<Prefix><Name>`, each titled
    by its name (what generators name their classes by)."""
    name = f"{prefix}Input"
    ((root,), found) = msgspec.json.schema_components(
        [job_type.input], ref_template=REF.format(name=prefix + "{name}"), schema_hook=_schema_hook
    )
    schemas = {prefix + key: value for key, value in found.items()}
    root_ref = root["$ref"]  # a Struct's schema is always a component: renamed <Prefix>Input
    schemas = _retarget(schemas, root_ref, REF.format(name=name))
    schemas[name] = schemas.pop(root_ref.removeprefix(REF.format(name="")))
    return {key: {**schema, "title": key} for key, schema in _without_closed_tuples(schemas).items()}


def _add_inputs(job_types: Mapping[str, JobType], components: dict[str, Any]) -> dict[str, str]:
    """Add each type's input schemas to `components`; answer {type name: its input's component}. Every type gets its
    own, even two types that share one Input struct, so a generated client's names say which type they are for;
    the prefix is the type's name in Pascal case, numbered when another type's or a built-in name has it."""
    inputs: dict[str, str] = {}
    taken = set(components)
    for job_type in job_types.values():
        for n in itertools.count(1):
            prefix = _pascal(job_type.name) + (str(n) if n > 1 else "")
            schemas = _input_schemas(job_type, prefix)
            bodies = {f"{prefix}Submit", f"{prefix}BatchItem"}  # made by _variants, later
            if not (schemas.keys() | bodies) & taken and not schemas.keys() & bodies:
                break
        taken |= schemas.keys() | bodies
        components.update(schemas)
        inputs[job_type.name] = f"{prefix}Input"
    return inputs


def _variants(
    job_types: Mapping[str, JobType], inputs: Mapping[str, str], base: dict[str, Any], suffix: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(components, union): one variant of the `base` body per job type, `type` fixed and `input` that type's
    schema, and their union discriminated by `type`, so a client generator makes one class per type and a fuzzer
    produces jobs that run."""
    components: dict[str, Any] = {}
    mapping: dict[str, str] = {}
    for job_type in job_types.values():
        input_name = inputs[job_type.name]
        name = input_name.removesuffix("Input") + suffix
        properties = {
            **base["properties"],
            "type": {"type": "string", "const": job_type.name},
            "input": {"$ref": REF.format(name=input_name)},
        }
        required = [*base["required"], "input"] if _required(job_type) else base["required"]
        description = f"{job_type.description} {base.get('description', '')}".strip()
        components[name] = {
            **base,
            "title": name,
            "description": description,
            "properties": properties,
            "required": required,
        }
        mapping[job_type.name] = REF.format(name=name)
    union = {
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "type", "mapping": mapping},
    }
    return components, union


def _required(job_type: JobType) -> bool:
    """Whether the type's input has a field without a default: then a body without `input` is refused."""
    return any(f.required for f in msgspec.structs.fields(job_type.input))


def schemas(job_types: Mapping[str, JobType]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(components, submit body schema, batch body schema)."""
    (_, components) = msgspec.json.schema_components(_TYPES, ref_template=REF, schema_hook=_schema_hook)
    # A component of its own, so a list filter can name it (no $ref into Job's properties).
    components["JobStatus"] = {
        "title": "JobStatus",
        "description": "queued, running, then one of the four terminal states, which never change again",
        "type": "string",
        "enum": list(get_args(Status)),
    }
    components["Job"]["properties"]["status"] = {"$ref": REF.format(name="JobStatus")}
    components["ServerSentEvent"] = _SSE_EVENT
    if not job_types:
        return components, {"$ref": REF.format(name="SubmitJob")}, {"$ref": REF.format(name="SubmitBatch")}
    inputs = _add_inputs(job_types, components)
    submits, submit = _variants(job_types, inputs, components["SubmitJob"], "Submit")
    items, item = _variants(job_types, inputs, components["BatchItem"], "BatchItem")
    components.update(submits)
    components.update(items)
    components["SubmitBatch"]["properties"]["jobs"]["items"] = item
    return components, submit, {"$ref": REF.format(name="SubmitBatch")}


def build(
    job_types: Mapping[str, JobType] | None = None, title: str = "Outlast", version: str = "0.1.0"
) -> dict[str, Any]:
    components, submit, batch = schemas(job_types or {})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Jobs that outlast an HTTP request: submit, follow, fetch the result. Errors are"
            " RFC 9457 application/problem+json.",
        },
        "security": [{"apiKey": []}],
        "tags": [
            {"name": "jobs", "description": "submit, read, wait on, follow, cancel and retry jobs"},
            {"name": "webhooks", "description": "a job's callback deliveries"},
            {"name": "schedules", "description": "cron schedules, each tick of which makes one job"},
            {
                "name": "workflows",
                "description": "DAGs of steps whose jobs wait on each other without holding a worker",
            },
            {"name": "operations", "description": "health, readiness, metrics and this document"},
        ],
        "paths": {**paths(submit, batch), **operations()},
        "components": {"schemas": components, "securitySchemes": _SECURITY_SCHEMES},
    }


async def openapi(request: Request) -> Response:
    return MsgspecResponse(web_of(request).openapi)
