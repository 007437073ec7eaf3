"""The classify job on MLServer 1.7.1, as its documentation shows a custom runtime: an
``MLModel`` subclass serving the project's ONNX classifier as the v2 model ``mnist-cnn``
(Open Inference Protocol), with MLServer's adaptive batching (``max_batch_size``,
``max_batch_time``), parallel workers off (one process), no metrics server.

MLServer's REST API takes and gives tensors as JSON only: it has no binary tensor
extension. ``BinaryTensors``, in front of MLServer's own app, turns such a request into
the same request with JSON tensors and the JSON answer into the binary one, so that the
peer answers the service's v2 workload (bench/payloads.py, v2-binary) byte for byte in
the same format.

MLServer's pins conflict with the service's: it runs from its own environment
(``make mlserver-venv``, bench/peers/mlserver-requirements.txt), so this module imports
nothing from the project.

    .venv-mlserver/bin/python -m bench.peers.mlserver_peer --port 8000
    # POST /v2/models/mnist-cnn/infer, GET /v2/health/ready
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import socket
from pathlib import Path

import mlserver.rest.server
import numpy as np
import onnxruntime as ort
import orjson
from mlserver import MLModel, MLServer
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.settings import ModelSettings, Settings
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from mlserver.utils import install_uvloop_event_loop

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_PATH = REPO_ROOT / "models" / "artifacts" / "mnist-cnn" / "model.onnx"
# The peers' batching parameters, set by the benchmark configuration (bench/peers/minimal.py).
MAX_BATCH_SIZE = int(os.environ.get("PEER_MAX_BATCH_SIZE", "64"))
MAX_LATENCY_MS = float(os.environ.get("PEER_MAX_LATENCY_MS", "2"))

MODEL_NAME = "mnist-cnn"
INPUT_NAME = "images"
OUTPUTS = {"probabilities": "FP32", "digit": "INT64"}
INFERENCE_HEADER = b"inference-header-content-length"
# The v2 datatypes a binary tensor may have here, as little-endian NumPy types.
DATATYPES = {
    "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip


class OnnxClassifier(MLModel):
    """``images`` (FP32, N×1×28×28, normalised) → ``probabilities`` (FP32, N×10) and
    ``digit`` (INT64, N), on one ONNX Runtime thread beside the event loop."""

    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(MODEL_PATH), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {tensor.name: tensor for tensor in payload.inputs}
        if INPUT_NAME not in inputs or inputs[INPUT_NAME].datatype != "FP32":
            raise InferenceError(f"expected one FP32 input named {INPUT_NAME!r}")
        images = NumpyCodec.decode_input(inputs[INPUT_NAME]).astype(np.float32, copy=False)
        if images.ndim != 4 or images.shape[1:] != (1, 28, 28):
            raise InferenceError(f"{INPUT_NAME} must be N×1×28×28, not {images.shape}")
        loop = asyncio.get_running_loop()
        logits = await loop.run_in_executor(self.thread, self._run, images)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        values = {"probabilities": probabilities, "digit": probabilities.argmax(axis=1)}
        wanted = [output.name for output in payload.outputs or ()] or list(OUTPUTS)
        unknown = set(wanted) - set(OUTPUTS)
        if unknown:
            raise InferenceError(f"unknown outputs {sorted(unknown)}; known: {list(OUTPUTS)}")
        # Built by hand: NumpyCodec would give ``digit`` the shape N×1, not N.
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                ResponseOutput(
                    name=name,
                    shape=list(values[name].shape),
                    datatype=OUTPUTS[name],
                    data=values[name].ravel().tolist(),
                )
                for name in wanted
            ],
        )

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images})[0]


class BinaryChoice:
    """Which outputs to give back as binary data: those whose ``binary_data`` is true,
    and with the request's ``binary_data_output`` every output whose own is not false."""

    def __init__(self, header: dict) -> None:
        self.every = bool((header.get("parameters") or {}).get("binary_data_output", False))
        self.flags = {
            output["name"]: bool(output["parameters"]["binary_data"])
            for output in header.get("outputs") or ()
            if "binary_data" in (output.get("parameters") or {})
        }

    def __call__(self, name: str) -> bool:
        return self.flags.get(name, self.every)

    def __bool__(self) -> bool:
        return self.every or any(self.flags.values())


def json_request(body: bytes, header_length: int) -> tuple[bytes, BinaryChoice]:
    """A binary-extension request body → the same request with JSON tensors, and the
    outputs to give back as binary data."""
    header = orjson.loads(body[:header_length])
    offset = header_length
    for tensor in header.get("inputs", ()):
        parameters = tensor.get("parameters") or {}
        size = parameters.pop("binary_data_size", None)
        if size is None:
            continue
        if not parameters:
            tensor.pop("parameters")
        dtype = np.dtype(DATATYPES[tensor["datatype"]])
        if offset + size > len(body) or size % dtype.itemsize:
            raise ValueError(f"input {tensor['name']!r}: {size} bytes do not fit the body")
        tensor["data"] = np.frombuffer(body, dtype, size // dtype.itemsize, offset)
        offset += size
    if offset != len(body):
        raise ValueError(f"{len(body) - offset} bytes after the last binary input")
    return orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY), BinaryChoice(header)


def binary_answer(body: bytes, binary: BinaryChoice) -> tuple[bytes, int | None]:
    """A JSON answer → the JSON part with the chosen outputs' data moved after it as
    raw little-endian bytes, and the JSON part's length (None: nothing moved, the
    answer as it was)."""
    answer = orjson.loads(body)
    tensors = []
    for output in answer.get("outputs", ()):
        if not binary(output["name"]):
            continue
        raw = np.asarray(output.pop("data"), DATATYPES[output["datatype"]]).tobytes()
        output["parameters"] = {**(output.get("parameters") or {}), "binary_data_size": len(raw)}
        tensors.append(raw)
    if not tensors:
        return body, None
    header = orjson.dumps(answer)
    return header + b"".join(tensors), len(header)


class BinaryTensors:
    """ASGI middleware: the binary tensor extension in front of a JSON-only v2 app.

    A request with an ``Inference-Header-Content-Length`` header reaches the app as the
    same request with JSON tensors; its answer, when it asked for binary outputs, goes
    back as JSON followed by the raw tensors, with the same header. Any other request
    passes through untouched.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        header_length = None
        if scope["type"] == "http":
            header_length = next(
                (value for name, value in scope["headers"] if name == INFERENCE_HEADER), None
            )
        if header_length is None:
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            request, binary = json_request(bytes(body), int(header_length))
        except (ValueError, KeyError, TypeError) as error:  # orjson's errors are ValueErrors
            problem = orjson.dumps({"error": f"bad binary tensor request: {error}"})
            await _answer(send, 400, [(b"content-type", b"application/json")], problem)
            return
        dropped = {INFERENCE_HEADER, b"content-length", b"content-type"}
        headers = [(name, value) for name, value in scope["headers"] if name not in dropped]
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(request)).encode()),
        ]
        delivered = False

        async def inner_receive():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": request, "more_body": False}

        started: dict = {}
        chunks: list[bytes] = []

        async def capture(message) -> None:
            if message["type"] == "http.response.start":
                started.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app({**scope, "headers": headers}, inner_receive, capture)
        answer = b"".join(chunks)
        dropped = {b"content-length", b"content-type"}
        headers = [(name, value) for name, value in started["headers"] if name not in dropped]
        json_length = None
        if started["status"] == 200 and binary:
            answer, json_length = binary_answer(answer, binary)
        if json_length is None:
            headers += [(b"content-type", b"application/json")]
        else:
            headers += [
                (b"content-type", b"application/octet-stream"),
                (INFERENCE_HEADER, str(json_length).encode()),
            ]
        await _answer(send, started["status"], headers, answer)


async def _answer(send, status: int, headers: list, body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _create_app_with_binary_tensors(create_app):
    def create(*args, **kwargs):
        app = create_app(*args, **kwargs)
        app.add_middleware(BinaryTensors)
        return app

    return create


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def serve(port: int, grpc_port: int) -> None:
    """What ``mlserver start`` does with a settings.json and a model-settings.json."""
    settings = Settings(
        host="127.0.0.1",
        http_port=port,
        grpc_port=grpc_port,  # MLServer always starts its gRPC server
        parallel_workers=0,  # inference in the server's process
        metrics_endpoint=None,  # no metrics server, no metrics middleware
        debug=False,  # no access log
        gzip_enabled=False,  # the other servers do not compress either
    )
    model = ModelSettings(
        name=MODEL_NAME,
        implementation=OnnxClassifier,
        max_batch_size=MAX_BATCH_SIZE,
        max_batch_time=MAX_LATENCY_MS / 1000,
    )
    await MLServer(settings).start([model])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=None, help="default: a free port")
    args = parser.parse_args(argv)
    # MLServer builds its REST app inside MLServer(); the middleware goes on it there.
    mlserver.rest.server.create_app = _create_app_with_binary_tensors(
        mlserver.rest.server.create_app
    )
    install_uvloop_event_loop()
    asyncio.run(serve(args.port, args.grpc_port or free_port()))


if __name__ == "__main__":
    main()
