"""The Open Inference Protocol's REST routes, as route table entries.

    GET  /v2                                             server metadata
    GET  /v2/health/live, /v2/health/ready               server health
    GET  /v2/models/<name>[/versions/<version>]          model metadata
    GET  /v2/models/<name>[/versions/<version>]/ready    model health
    POST /v2/models/<name>[/versions/<version>]/infer    inference (JSON or binary tensors)

Model names are the registry's (``mnist-cnn``), versions the model store's. An
inference request goes the way of every other request: the gate, the model's
task (``Task.infer_v2``: tensors in, tensors out) and its batcher, so the same
limits, queue and load shedding apply. ``SCHEMAS`` are the specification's
messages as JSON schemas, written from its text; the OpenAPI page shows them and
the tests validate every answer against them.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from models.registry import ModelSpec
from service import tracing, v2
from service.http import JSON, Headers, Reply
from service.routes import VERSION, Route

SERVER_NAME = "digit-sentiment-serving"
OCTET_STREAM = "application/octet-stream"
EXTENSIONS = [v2.BINARY_EXTENSION]

_PARAMETERS = {"type": "object"}
_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": -1}}
_TENSOR_METADATA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {"name": {"type": "string"}, "datatype": {"type": "string"}, "shape": _SHAPE},
}
_DATA = {"type": "array"}  # nested arrays of numbers, booleans or strings
# A tensor of a request or an answer: data in JSON, or binary_data_size in parameters.
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string"},
        "parameters": _PARAMETERS,
        "data": _DATA,
    },
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "V2Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "V2ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "V2ServerLive": {
        "type": "object",
        "required": ["live"],
        "properties": {"live": {"type": "boolean"}},
    },
    "V2ServerReady": {
        "type": "object",
        "required": ["ready"],
        "properties": {"ready": {"type": "boolean"}},
    },
    "V2ModelReady": {
        "type": "object",
        "required": ["name", "ready"],
        "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
    },
    "V2ModelMetadata": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _TENSOR_METADATA},
            "outputs": {"type": "array", "items": _TENSOR_METADATA},
        },
    },
    "V2InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "inputs": {
                "type": "array",
                "items": _TENSOR,
            },
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS},
                },
            },
        },
    },
    "V2InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "outputs": {
                "type": "array",
                "items": _TENSOR,
            },
        },
    },
}


def _document(answer: str, request: str | None = None) -> dict[str, Any]:
    return {"request": request, "answer": answer}


def server_routes() -> list[Route]:
    return [
        Route("/v2", "v2_server_metadata", None, "Server metadata (Open Inference Protocol)",
              "The server's name, version and protocol extensions.", answer=_server_metadata,
              method="GET", protocol="v2", documents=_document("V2ServerMetadata")),
        Route("/v2/health/live", "v2_server_live", None, "Server live (Open Inference Protocol)",
              "200 while the server runs.", answer=_live, method="GET", protocol="v2",
              scope=None, documents=_document("V2ServerLive")),
        Route("/v2/health/ready", "v2_server_ready", None,
              "Server ready (Open Inference Protocol)",
              "200 once every model is loaded (a worker answers only then).", answer=_ready,
              method="GET", protocol="v2", scope=None, documents=_document("V2ServerReady")),
    ]  # fmt: skip


def model_routes(spec: ModelSpec) -> list[Route]:
    """The metadata, health and inference routes of one model, with and without a
    version in the path (any version the worker serves: ``RouteTable.find``)."""
    routes = []
    unversioned = f"/v2/models/{spec.name}"
    versioned = f"{unversioned}/versions/{VERSION}"
    for base, suffix in ((unversioned, ""), (versioned, "_version")):
        name = f"v2_{spec.endpoint}"
        routes += [
            Route(base, f"{name}_metadata{suffix}", spec.endpoint,
                  f"Model metadata of {spec.name} (Open Inference Protocol)",
                  "Its input and output tensors: name, datatype, shape (-1: any size).",
                  answer=_model_metadata, method="GET", protocol="v2",
                  documents=_document("V2ModelMetadata")),
            Route(f"{base}/ready", f"{name}_ready{suffix}", spec.endpoint,
                  f"Model ready: {spec.name} (Open Inference Protocol)", "200 when ready.",
                  answer=_model_ready, method="GET", protocol="v2",
                  documents=_document("V2ModelReady")),
            Route(f"{base}/infer", f"{name}_infer{suffix}", spec.endpoint,
                  f"Inference on {spec.name} (Open Inference Protocol)",
                  "JSON tensors, or the binary tensor extension: a JSON header of "
                  "`Inference-Header-Content-Length` bytes, then the raw tensors. The model "
                  "metadata lists the tensors.", answer=_infer, method="POST", protocol="v2",
                  reads_body=_read_infer_request, media=(JSON, OCTET_STREAM),
                  documents=_document("V2InferenceResponse", "V2InferenceRequest")),
        ]  # fmt: skip
    return routes


def _read_infer_request(body: bytes, headers: Headers) -> v2.InferRequest:
    header_length = None
    for name, value in headers:
        if name == v2.HEADER_LENGTH.encode():
            try:
                header_length = int(value)
            except ValueError:
                raise v2.bad_request(f"{v2.HEADER_LENGTH} is not a number") from None
            if header_length < 0:
                raise v2.bad_request(f"{v2.HEADER_LENGTH} is negative")
    return v2.parse_infer_request(body, header_length)


async def _server_metadata(service: Any, _: None) -> Reply:
    return Reply.json(
        {"name": SERVER_NAME, "version": version("bentoml"), "extensions": EXTENSIONS}
    )


async def _live(service: Any, _: None) -> Reply:
    return Reply.json({"live": True})


async def _ready(service: Any, _: None) -> Reply:
    return Reply.json({"ready": True})


async def _model_metadata(task: Any, _: None) -> Reply:
    return Reply.json(
        {
            "name": task.spec.name,
            "versions": [task.version],
            "platform": task.platform,
            "inputs": [tensor.metadata() for tensor in task.v2_inputs()],
            "outputs": [tensor.metadata() for tensor in task.v2_outputs()],
        }
    )


async def _model_ready(task: Any, _: None) -> Reply:
    return Reply.json({"name": task.spec.name, "ready": True})


async def _infer(task: Any, request: v2.InferRequest) -> Reply:
    known = {tensor.name for tensor in task.v2_outputs()}
    unknown = sorted(set(request.outputs or ()) - known)
    if unknown:
        raise v2.bad_request(f"{task.spec.name} has no output {', '.join(map(repr, unknown))}")
    outputs, parameters = await task.infer_v2(request)
    with tracing.span("encode"):
        body, headers = v2.infer_response(
            task.spec.name, task.version, request, outputs, parameters
        )
    media_type = OCTET_STREAM if headers else JSON
    return Reply(200, body, media_type, headers or None)
