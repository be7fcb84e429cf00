"""The blob store's part of /openapi.json: POST /v1/uploads, and what GET /v1/jobs/{id}/result adds for a result or
a file kept there (Range, 206, 416, `?file=`). Merged into the /v1 operations by server/openapi_paths.py."""

from __future__ import annotations

from typing import Any

_SCHEMAS = "#/components/schemas/"
_PROBLEM = {"application/problem+json": {"schema": {"$ref": f"{_SCHEMAS}Problem"}}}
_RANGE = {
    "name": "Range",
    "in": "header",
    "description": "`bytes=start-end`, `bytes=start-` or `bytes=-suffix`: one range, answered 206",
    "schema": {"type": "string"},
}
RESULT_PARAMETERS: list[dict[str, Any]] = [
    _RANGE,
    {
        "name": "file",
        "in": "query",
        "description": "a file the job wrote with ctx.output, by name, instead of the result",
        "schema": {"type": "string"},
    },
]
_BYTES = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
RESULT_ANSWERS: dict[str, Any] = {
    "206": {
        "description": "the part of a result or file in the blob store that Range asked for, with Content-Range",
        "headers": {"Content-Range": {"schema": {"type": "string"}}},
        "content": _BYTES,
    },
    "416": {
        "description": "the Range starts past the end (Content-Range: bytes */size)",
        "headers": {"Content-Range": {"schema": {"type": "string"}}},
        "content": _PROBLEM,
    },
}


def uploads() -> dict[str, Any]:
    return {
        "/v1/uploads": {
            "post": {
                "operationId": "createUpload",
                "summary": "Stream a large input into the blob store; a job's input names its id for ctx.open(id)",
                "parameters": [
                    {
                        "name": "name",
                        "in": "query",
                        "description": "a file name to keep with it (at most 255 characters)",
                        "schema": {"type": "string", "maxLength": 255},
                    }
                ],
                "requestBody": {"required": True, "content": _BYTES},
                "responses": {
                    "201": {
                        "description": "stored: its id, size and content type (the request's Content-Type)",
                        "content": {"application/json": {"schema": {"$ref": f"{_SCHEMAS}Upload"}}},
                    },
                    "408": {"description": "the body stalled", "content": _PROBLEM},
                    "413": {"description": "past OUTLAST_MAX_UPLOAD_BYTES", "content": _PROBLEM},
                    "422": {"description": "a name too long or holding NUL", "content": _PROBLEM},
                },
            }
        }
    }
