"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer,
served by ``grpc.aio`` on ``SERVING_GRPC_PORT`` inside each worker, on the
worker's own event loop, so that a gRPC request reaches the same tasks, limits
and batchers as an HTTP one. The message and service classes are the ones
``tritonclient[grpc]`` generates from Triton's ``grpc_service.proto``, whose
``inference`` package carries the specification's messages unchanged (Triton
adds RPCs of its own, which answer UNIMPLEMENTED here).

Refusals map to gRPC's codes: a malformed request INVALID_ARGUMENT, an unknown
model or version NOT_FOUND, a full queue UNAVAILABLE (clients retry it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service import v2
from service.api_keys import ApiKeys
from service.errors import RequestError, ServiceBusy
from service.metrics import RequestCounts
from service.tasks import Task

if TYPE_CHECKING:
    from service.app import ModelSlot
from service.v2_routes import EXTENSIONS, SERVER_NAME

log = logging.getLogger(__name__)

# Which field of InferTensorContents carries each datatype.
CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", v2.BYTES: "bytes_contents",
}  # fmt: skip
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND}
PROTOCOL = "v2-grpc"  # its label in serving_requests_total


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The v2 gRPC service over one worker's models (model name → its versions); the methods
    carry the protocol's names."""

    def __init__(
        self, models: Mapping[str, ModelSlot], requests: RequestCounts, keys: ApiKeys | None
    ) -> None:
        self.models = dict(models)
        self.requests = requests
        self.keys = keys

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        await self._authorize(context)
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=version("bentoml"), extensions=EXTENSIONS
        )

    async def ModelReady(self, request, context):
        await self._authorize(context)
        await self._task(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        await self._authorize(context)
        task = await self._task(request.name, request.version, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=task.spec.name,
            versions=[task.version],
            platform=task.platform,
            inputs=[tensor(**spec.metadata()) for spec in task.v2_inputs()],
            outputs=[tensor(**spec.metadata()) for spec in task.v2_outputs()],
        )

    async def ModelInfer(self, request, context):
        await self._authorize(context)
        task = await self._task(request.model_name, request.model_version, context, pick=True)
        code = "OK"
        task.requests_in_progress += 1
        try:
            return await self._infer(task, request, context)
        except grpc.aio.AbortError:
            code = context.code().name if context.code() else "UNKNOWN"
            raise
        finally:
            task.requests_in_progress -= 1
            self.requests.count(PROTOCOL, task.spec.endpoint, code, task.version)

    async def _infer(self, task: Task, request: Any, context: Any) -> Any:
        try:
            infer_request = _infer_request(request)
            known = {spec.name for spec in task.v2_outputs()}
            unknown = sorted(set(infer_request.outputs or ()) - known)
            if unknown:
                raise v2.bad_request(f"{task.spec.name} has no output {', '.join(unknown)}")
            outputs, parameters = await task.infer_v2(infer_request)
        except v2.V2Error as error:
            await context.abort(STATUS_CODES.get(error.status, grpc.StatusCode.UNKNOWN),
                                error.message)  # fmt: skip
        except RequestError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.body()["error"])
        except ServiceBusy as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, error.body()["error"])
        wanted = infer_request.outputs
        chosen = [t for t in outputs if wanted is None or t.name in wanted]
        return pb.ModelInferResponse(
            model_name=task.spec.name,
            model_version=task.version,
            id=request.id,
            parameters={key: _parameter(value) for key, value in parameters.items()},
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name=t.name, datatype=t.datatype, shape=list(t.shape)
                )
                for t in chosen
            ],
            raw_output_contents=[v2.tensor_bytes(t) for t in chosen],
        )

    async def _authorize(self, context: Any) -> None:
        """With API keys on, the ``infer`` scope, from the ``authorization`` metadata."""
        if self.keys is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        value = metadata.get("authorization")
        verdict = self.keys.verdict(value.encode("latin-1") if value else None, "infer")
        if verdict.status == 401:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, verdict.message)
        if verdict.status == 403:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, verdict.message)

    async def _task(self, name: str, model_version: str, context: Any, pick: bool = False) -> Task:
        """The version that answers: the one named, else (``pick``: an inference) the serving
        version or a canary, as for REST."""
        slot = self.models.get(name)
        task = None
        if slot is not None:
            if model_version:
                task = slot.find(model_version)
            else:
                task = slot.pick() if pick else slot.serving
        if task is None:
            which = f"{name} {model_version}".strip()
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no such model or version: {which}")
        return task


def _infer_request(request: Any) -> v2.InferRequest:
    """A ModelInferRequest → the tensors REST would have given, checked the same way."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise v2.bad_request(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = []
    for index, tensor in enumerate(request.inputs):
        parameters = {key: _value(value) for key, value in tensor.parameters.items()}
        shape = list(tensor.shape)
        if raw:
            inputs.append(
                v2.tensor_from_bytes(tensor.name, tensor.datatype, shape, raw[index], parameters)
            )
            continue
        field = CONTENTS.get(tensor.datatype)
        if field is None:
            raise v2.bad_request(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
        values = list(getattr(tensor.contents, field))
        inputs.append(
            v2.tensor_from_values(tensor.name, tensor.datatype, shape, values, parameters)
        )
    if not inputs:
        raise v2.bad_request("the request has no inputs")
    parameters = {key: _value(value) for key, value in request.parameters.items()}
    outputs = {output.name: True for output in request.outputs} or None
    return v2.InferRequest(
        id=request.id or None,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
        binary_default=True,
    )


def _value(parameter: Any) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _parameter(value: Any) -> Any:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


class GrpcServer:
    """The gRPC server of one worker: started on its event loop once its models are
    loaded, stopped when the HTTP server stops."""

    def __init__(
        self,
        models: Mapping[str, ModelSlot],
        requests: RequestCounts,
        keys: ApiKeys | None,
        port: int,
        max_message_bytes: int,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Every worker listens on the same port; the kernel spreads the connections.
            ("grpc.so_reuseport", 1),
        ]
        self.server = grpc.aio.server(options=options)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(models, requests, keys), self.server
        )
        self.port = self.server.add_insecure_port(f"0.0.0.0:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen for gRPC on port {port}")

    async def start(self) -> None:
        await self.server.start()
        log.info("gRPC (Open Inference Protocol) on port %d", self.port)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls and give the ones in flight ``grace_s`` to finish."""
        await self.server.stop(grace_s)
