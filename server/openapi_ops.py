"""The operations outside /v1 in the OpenAPI document: health, readiness, the metrics and the document itself.
Public: no security."""

from __future__ import annotations

from typing import Any

from server.openapi_paths import REF

_RETRY_AFTER = {"Retry-After": {"description": "seconds before polling again", "schema": {"type": "integer"}}}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(name=name)}}}


def operations() -> dict[str, Any]:
    def get(operation: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
        return {"get": {"operationId": operation, "summary": summary, "responses": responses}}

    text = {"schema": {"type": "string"}}
    found = {
        "/healthz": get(
            "healthz", "The process answers", {"200": {"description": "alive", "content": _json("Health")}}
        ),
        "/readyz": get(
            "readyz",
            "Both stores answer",
            {
                "200": {"description": "both stores answer", "content": _json("Readiness")},
                "503": {
                    "description": "a store is down",
                    "headers": _RETRY_AFTER,
                    "content": {"application/problem+json": {"schema": {"$ref": REF.format(name="Readiness")}}},
                },
            },
        ),
        "/metrics": get(
            "metrics",
            "Prometheus text exposition",
            {"200": {"description": "the metrics", "content": {"text/plain": text}}},
        ),
        "/openapi.json": get(
            "openApi",
            "This document",
            {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}},
        ),
        "/docs": get(
            "docs", "This document, rendered", {"200": {"description": "a page", "content": {"text/html": text}}}
        ),
    }
    for operation in (op for ops in found.values() for op in ops.values()):
        operation["tags"] = ["operations"]
        operation["security"] = []  # health, the metrics and the docs are public
    return found
