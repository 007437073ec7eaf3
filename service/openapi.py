"""The route table as documents: OpenAPI paths and the schema BentoML's clients read.

* ``paths`` and ``components``: an OpenAPI 3 operation per route, with every body
  form it takes (JSON, multipart fields, a raw image), its answer (JSON and/or
  PNG) and every error status the service answers it with, in the service's
  error shape. BentoML's document (``/docs.json``, the page at ``/``) gets these
  next to its own infrastructure endpoints (``service.bento``).
* ``client_routes``: the entries of ``/schema.json`` from which
  ``bentoml.SyncHTTPClient`` builds its methods (``client.classify(image=...)``):
  a file field is ``{"type": "file"}``, which makes the client send multipart.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from service.http import IMAGE_TYPES, JSON, MULTIPART, PNG
from service.routes import VERSION, Route, RouteTable

REF = "#/components/schemas/{model}"
ERROR_SCHEMA = "ServiceError"
TAG = "Service APIs"

# Every status an API route answers besides 200, and when.
ERROR_STATUSES = {
    400: "The body is not valid: the error names each bad field or file.",
    405: "Not a POST request.",
    413: "The body is larger than SERVING_MAX_BODY_BYTES.",
    415: "A Content-Type the route does not take.",
    500: "A fault of the server (logged); the server keeps serving.",
    503: "The model's queue is full (or the server is draining): retry shortly.",
    504: "No answer within SERVING_REQUEST_TIMEOUT_S.",
}

_ERROR = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "One line naming the problem."},
        "detail": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "loc", "msg"],
                "properties": {
                    "type": {"type": "string", "examples": ["invalid_image"]},
                    "loc": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                        "examples": [["images", 1]],
                    },
                    "msg": {"type": "string"},
                },
            },
        },
    },
}
_BINARY = {"type": "string", "format": "binary"}


# The statuses of the Open Inference Protocol's routes, all with its error shape.
V2_ERROR_STATUSES = {
    400: "A malformed request or tensor: the error says which and why.",
    404: "No such model or version.",
    503: "The model's queue is full (or the server is draining): retry shortly.",
    504: "No answer within SERVING_REQUEST_TIMEOUT_S.",
}


def paths(table: RouteTable) -> dict[str, dict]:
    return {path: {route.method.lower(): _operation(route)} for path, route in table.items()}


def components(table: RouteTable) -> dict[str, dict]:
    """The schemas the operations refer to, by name."""
    schemas: dict[str, dict] = {ERROR_SCHEMA: _ERROR}
    if any(route.protocol == "v2" for route in table.values()):
        from service.v2_routes import SCHEMAS

        schemas.update(SCHEMAS)
    for route in table.values():
        for model, mode in ((route.json_body, "validation"), (route.response, "serialization")):
            if model is not None:
                schema = _schema(model, mode)
                schemas.update(schema.pop("$defs", {}))
                schemas[_name(model)] = schema
    return schemas


def client_routes(table: RouteTable) -> list[dict[str, Any]]:
    """``/schema.json``'s ``routes``, in the form BentoML's HTTP clients read."""
    return [
        {
            "name": route.name,
            "route": route.path,
            "description": route.description,
            "batchable": False,
            "input": _client_input(route),
            "output": _inline(route.response) if route.response is not None else _BINARY,
            "is_task": False,
        }
        for route in table.values()
        if route.protocol == "native"
    ]


# The statuses of the management routes (``service.rollouts``), in the service's error shape.
ADMIN_ERROR_STATUSES = {
    400: "A malformed body: the error says which field and why.",
    401: "No API key, or one not in force.",
    403: "The key has no admin scope.",
    404: "No such model, or no such version of it in the model store (type store).",
    409: "The change does not fit the model's state (a canary running, nothing to roll back).",
    422: "The version failed a check (its type names it: checksums, load, example_output, "
    "warm_up); the serving version goes on serving.",
    503: "The state directory cannot be written (type state_not_writable).",
}
TAGS = {"native": TAG, "v2": "Open Inference Protocol (v2)", "admin": "Model management"}


def _operation(route: Route) -> dict:
    statuses, error = ERROR_STATUSES, ERROR_SCHEMA
    if route.protocol == "v2":
        statuses, error = V2_ERROR_STATUSES, "V2Error"
    elif route.protocol == "admin":
        statuses = ADMIN_ERROR_STATUSES
    operation = {
        "summary": route.summary,
        "description": route.description,
        "operationId": route.name,
        "tags": [TAGS[route.protocol]],
        "responses": {
            "200": {"description": "The answer.", "content": _response_content(route)},
            **{
                str(status): {
                    "description": why,
                    "content": {JSON: {"schema": {"$ref": REF.format(model=error)}}},
                }
                for status, why in statuses.items()
            },
        },
    }
    if VERSION in route.path:
        operation["parameters"] = [{
            "name": "version", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "A model store version this server serves: the serving one, or a "
            "canary's",
        }]  # fmt: skip
    if route.method == "POST":
        operation["requestBody"] = {"required": True, "content": _request_content(route)}
    return operation


def _request_content(route: Route) -> dict:
    if route.documents is not None and route.documents.get("request"):
        content = {JSON: {"schema": {"$ref": REF.format(model=route.documents["request"])}}}
        content.update({media_type: {"schema": _BINARY} for media_type in route.media_types
                        if media_type != JSON})  # fmt: skip
        return content
    if route.json_body is not None:
        return {JSON: {"schema": {"$ref": REF.format(model=_name(route.json_body))}}}
    content: dict[str, dict] = {MULTIPART: {"schema": _form_schema(route, _BINARY)}}
    if route.raw_image:
        content.update({media_type: {"schema": _BINARY} for media_type in IMAGE_TYPES})
    return content


def _response_content(route: Route) -> dict:
    if route.documents is not None:
        content = {JSON: {"schema": {"$ref": REF.format(model=route.documents["answer"])}}}
        if route.reads_body is not None:  # the binary tensor extension's answer
            content["application/octet-stream"] = {"schema": _BINARY}
        return content
    content = {}
    if route.response is not None:
        content[JSON] = {"schema": {"$ref": REF.format(model=_name(route.response))}}
    if route.png:
        content[PNG] = {"schema": _BINARY}
    return content


def _form_schema(route: Route, file_schema: dict) -> dict:
    properties = {}
    for field in route.files:
        if field.max_items is None:
            properties[field.name] = {**file_schema, "description": field.description}
        else:
            properties[field.name] = {
                "type": "array",
                "items": file_schema,
                "minItems": 1,
                "maxItems": field.max_items,
                "description": field.description,
            }
    return {"type": "object", "required": [f.name for f in route.files], "properties": properties}


def _client_input(route: Route) -> dict:
    if route.json_body is not None:
        return _inline(route.json_body)
    return _form_schema(route, {"type": "file", "format": "image"})


def _schema(model: type[BaseModel], mode: str) -> dict:
    return model.model_json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]


def _inline(model: type[BaseModel]) -> dict:
    """A schema with its definitions inside it, as a client reads one route alone."""
    return model.model_json_schema(mode="validation")


def _name(model: type[BaseModel]) -> str:
    return model.__name__
