"""The OpenAPI 3.1 description of each declared function, built from its pydantic model.

OpenAPI 3.1 embeds JSON Schema 2020-12, which is what pydantic emits: the POST body is the model's
schema as it is, and each GET query parameter is one of its properties.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from service.functions import Function

ERRORS = {
    "404": "No compute function of that name is declared (unknown_function).",
    "422": "An argument is missing, unknown or out of bounds (invalid_argument; `parameters` names each).",
    "500": "The function raised (compute_failed: \"ExceptionType: message\", never a traceback).",
    "503": "The cluster is unreachable, has no workers, or is overloaded; see Retry-After.",
    "504": "No result within REQUEST_TIMEOUT.",
}


def _capped(schema: dict[str, Any], caps: Mapping[str, float]) -> dict[str, Any]:
    """The model's schema with run-time caps (settings such as FIB_MAX_N) applied."""
    schema = copy.deepcopy(schema)
    for name, cap in caps.items():
        prop = schema.get("properties", {}).get(name)
        if prop is not None:
            prop["maximum"] = min(prop.get("maximum", cap), cap)
    return schema


def function_paths(function: Function, caps: Mapping[str, float]) -> dict[str, Any]:
    """``{"/compute/<name>": {"get": ..., "post": ...}}`` for one declared function."""
    body = _capped(function.json_schema(), caps)
    required = set(body.get("required", ()))
    summary = function.description.splitlines()[0] if function.description else function.name
    ok = {"description": f"{{\"function\": \"{function.name}\", \"arguments\": {{...}}, \"value\": ...}}"}
    responses = {"200": ok, **{code: {"description": text} for code, text in ERRORS.items()}}
    parameters = []
    for name, schema in body.get("properties", {}).items():
        parameter = {"name": name, "in": "query", "required": name in required, "schema": schema}
        if "description" in schema:
            parameter["description"] = schema["description"]
        if schema.get("type") == "array":
            parameter.update(style="form", explode=True)  # xs=1&xs=2
        parameters.append(parameter)
    example = dict(function.examples[0]) if function.examples else None
    post_body: dict[str, Any] = {"schema": body}
    if example is not None:
        post_body["example"] = example
    return {
        f"/compute/{function.name}": {
            "get": {"summary": summary, "description": function.description, "parameters": parameters,
                    "responses": responses},
            "post": {
                "summary": summary,
                "description": function.description,
                "requestBody": {"required": True, "content": {"application/json": post_body}},
                "responses": {**responses, "413": {"description": "The body exceeds 64 KiB."}},
            },
        }
    }
