"""A job type's input form, generated from its JSON Schema (GET /v1/job-types'), and the form's answer turned back
into the input: numbers, booleans and choices as fields of their own, anything else as JSON in a text area. What
the field itself can't say (a number that is no number, JSON that does not parse) is told next to it; the rest is
the submit's own schema check (server/submit.py), whose messages name the field too."""

from __future__ import annotations

from typing import Any

import msgspec


class Field(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str  # number, integer, boolean, choice, text, json
    required: bool
    default: str  # as the field shows it
    choices: list[str] = []
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        found: dict[str, Any] = schema.get("$defs", {}).get(ref.removeprefix("#/$defs/"), {})
        return found
    return node


def fields(schema: dict[str, Any]) -> list[Field] | None:
    """The form's fields, in the schema's order; None: the input is no object of named fields (one JSON area)."""
    root = _resolve(schema, schema)
    if root.get("type") != "object" or "properties" not in root:
        return None
    required = set(root.get("required", []))
    found = []
    for name, raw in root["properties"].items():
        node = _resolve(schema, raw)
        kind = node.get("type")
        has_default = "default" in node
        default = node.get("default")
        if "enum" in node and all(isinstance(v, str) for v in node["enum"]):
            field = Field(
                name=name,
                kind="choice",
                required=name in required,
                default=str(default or ""),
                choices=list(node["enum"]),
            )
        elif kind in ("number", "integer"):
            field = Field(
                name=name,
                kind=kind,
                required=name in required,
                default="" if not has_default else str(default),
                minimum=node.get("minimum"),
                maximum=node.get("maximum"),
            )
        elif kind == "boolean":
            field = Field(name=name, kind="boolean", required=False, default="true" if default else "")
        elif kind == "string":
            field = Field(name=name, kind="text", required=name in required, default=str(default or ""))
        else:
            shown = msgspec.json.encode(default).decode() if has_default else ""
            field = Field(name=name, kind="json", required=name in required, default=shown)
        found.append(msgspec.structs.replace(field, description=str(node.get("description", ""))))
    return found


def read(form: dict[str, str], found: list[Field] | None) -> tuple[Any, dict[str, str]]:
    """The input the form's answer describes, and a message per field that could not be read."""
    errors: dict[str, str] = {}
    if found is None:
        try:
            return msgspec.json.decode(form.get("input", "") or "null"), errors
        except msgspec.DecodeError as exc:
            return None, {"input": f"not JSON: {exc}"}
    value: dict[str, Any] = {}
    for field in found:
        text = form.get(field.name, "").strip()
        if field.kind == "boolean":
            value[field.name] = field.name in form
            continue
        if not text:
            continue  # absent: the type's default, or the schema check says it is required
        if field.kind in ("number", "integer"):
            try:
                value[field.name] = int(text) if field.kind == "integer" else float(text)
            except ValueError:
                errors[field.name] = f"not {'an integer' if field.kind == 'integer' else 'a number'}: {text!r}"
        elif field.kind == "json":
            try:
                value[field.name] = msgspec.json.decode(text)
            except msgspec.DecodeError:
                errors[field.name] = 'not JSON: write it as JSON, e.g. [1, 2, 3] or {"a": 1}'
        else:
            value[field.name] = text
    return value, errors


def field_of(loc: str) -> str:
    """The form field a submit's error is about: `$.input.seconds` -> seconds; `$.input` -> input."""
    path = loc.removeprefix("$.input")
    if not path:
        return "input"
    return path.lstrip(".").split(".")[0].split("[")[0] or "input"
