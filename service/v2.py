"""The Open Inference Protocol (KServe v2) over REST: tensors in and out of HTTP bodies.

A request body is JSON, or, with the binary tensor extension (what tritonclient
sends by default), a JSON header of ``Inference-Header-Content-Length`` bytes
followed by the raw tensors, each input saying its ``binary_data_size``. An
answer is JSON, or a JSON header followed by the outputs the client asked for
in binary (``binary_data``, or ``binary_data_output`` for all of them).

Everything here is about bytes and arrays, free of models and of HTTP servers:
``parse_infer_request`` checks every length, datatype and shape against the
data before anything reaches a model, and raises ``V2Error`` (a status and a
message, answered as ``{"error": "..."}``) for each way a request can be
malformed. Tensors travel as NumPy arrays; BYTES tensors as object arrays of
``bytes``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

HEADER_LENGTH = "inference-header-content-length"
BINARY_EXTENSION = "binary_tensor_data"

# The protocol's datatypes and the little-endian NumPy type of each (BYTES: see below).
DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in (
        ("BOOL", "?"), ("UINT8", "u1"), ("UINT16", "<u2"), ("UINT32", "<u4"),
        ("UINT64", "<u8"), ("INT8", "i1"), ("INT16", "<i2"), ("INT32", "<i4"),
        ("INT64", "<i8"), ("FP16", "<f2"), ("FP32", "<f4"), ("FP64", "<f8"),
    )
}  # fmt: skip
BYTES = "BYTES"


class V2Error(Exception):
    """A request the protocol refuses: the HTTP status and one line saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> V2Error:
    return V2Error(400, message)


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # BYTES: an object array of bytes
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSpec:
    """A model's input or output as its metadata states it; -1 is a dimension of any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    description: str = ""

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def check(self, tensor: Tensor) -> None:
        where = f"input {tensor.name!r}"
        if tensor.datatype != self.datatype:
            raise bad_request(f"{where} must be {self.datatype}, not {tensor.datatype}")
        expected = "[" + ", ".join(map(str, self.shape)) + "]"
        if len(tensor.shape) != len(self.shape) or any(
            want not in (-1, got) for want, got in zip(self.shape, tensor.shape, strict=True)
        ):
            raise bad_request(f"{where} has shape {list(tensor.shape)}; expected {expected}")


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    # Requested output names → whether each is wanted in binary; None: every output,
    # in binary when ``binary_data_output`` is set.
    outputs: dict[str, bool] | None
    parameters: Mapping[str, Any]
    binary_default: bool

    def input(self, name: str) -> Tensor | None:
        return next((tensor for tensor in self.inputs if tensor.name == name), None)


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """A v2 inference request body → its tensors, each checked against its data."""
    if header_length is None:
        header, binary = body, b""
    else:
        if header_length > len(body):
            raise bad_request(
                f"{HEADER_LENGTH} is {header_length}, but the body has {len(body)} bytes"
            )
        header, binary = body[:header_length], body[header_length:]
    try:
        message = orjson.loads(header or b"{}")
    except orjson.JSONDecodeError as error:
        raise bad_request(f"the request is not valid JSON: {error}") from None
    if not isinstance(message, dict):
        raise bad_request("the request must be a JSON object")
    inputs_json = message.get("inputs")
    if not isinstance(inputs_json, list) or not inputs_json:
        raise bad_request("the request must have a non-empty 'inputs' list")
    offset = 0
    inputs = []
    for index, tensor_json in enumerate(inputs_json):
        tensor, offset = _input_tensor(tensor_json, index, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise bad_request(f"the body has {len(binary) - offset} bytes after the last binary input")
    parameters = _parameters(message.get("parameters"), "the request")
    request_id = message.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request("'id' must be a string")
    return InferRequest(
        id=request_id,
        inputs=inputs,
        outputs=_requested_outputs(message.get("outputs")),
        parameters=parameters,
        binary_default=bool(parameters.get("binary_data_output", False)),
    )


def _parameters(value: Any, owner: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"the parameters of {owner} must be a JSON object")
    return value


def _input_tensor(spec: Any, index: int, binary: bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(spec, dict):
        raise bad_request(f"inputs[{index}] must be a JSON object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"inputs[{index}] has no name")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise bad_request(f"input {name!r}: 'shape' must be a list of non-negative integers")
    datatype = spec.get("datatype")
    where = _check_header(name, datatype, shape)  # the checks gRPC's tensors get too
    count = math.prod(shape)
    parameters = _parameters(spec.get("parameters"), where)
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad_request(f"{where}: binary_data_size must be a non-negative integer")
        if "data" in spec:
            raise bad_request(f"{where} has both binary data and JSON 'data'")
        if offset + size > len(binary):
            raise bad_request(
                f"{where}: binary_data_size {size} goes beyond the end of the body "
                f"({len(binary) - offset} bytes left)"
            )
        raw = binary[offset : offset + size]
        data = _from_bytes(raw, datatype, count, where)
        offset += size
    else:
        if "data" not in spec:
            raise bad_request(f"{where} has neither 'data' nor binary_data_size")
        data = _from_json(spec["data"], datatype, count, where)
    return Tensor(name, datatype, tuple(shape), data.reshape(shape), parameters), offset


def tensor_from_bytes(
    name: str, datatype: str, shape: Sequence[int], raw: bytes, parameters: Mapping[str, Any]
) -> Tensor:
    """A tensor sent as raw bytes (gRPC's ``raw_input_contents``), checked as over REST."""
    where = _check_header(name, datatype, shape)
    data = _from_bytes(raw, datatype, math.prod(shape), where)
    return Tensor(name, datatype, tuple(shape), data.reshape(tuple(shape)), parameters)


def tensor_from_values(
    name: str, datatype: str, shape: Sequence[int], values: Sequence[Any],
    parameters: Mapping[str, Any],
) -> Tensor:  # fmt: skip
    """A tensor sent as typed values (gRPC's ``contents``; BYTES elements as bytes)."""
    where = _check_header(name, datatype, shape)
    count = math.prod(shape)
    if len(values) != count:
        raise bad_request(f"{where}: {len(values)} values do not make the shape's {count} elements")
    if datatype == BYTES:
        data = np.empty(count, dtype=object)
        data[:] = list(values)
    else:
        data = _from_json(list(values), datatype, count, where)
    return Tensor(name, datatype, tuple(shape), data.reshape(tuple(shape)), parameters)


def _check_header(name: str, datatype: Any, shape: Sequence[int]) -> str:
    """Name, datatype and shape of an input, checked; the name for error messages."""
    where = f"input {name!r}"
    if not name:
        raise bad_request("an input has no name")
    if datatype != BYTES and datatype not in DATATYPES:
        raise bad_request(f"{where}: unknown datatype {datatype!r}")
    if any(dimension < 0 for dimension in shape):
        raise bad_request(f"{where}: a dimension of the shape is negative")
    return where


def _from_bytes(raw: bytes, datatype: str, count: int, where: str) -> np.ndarray:
    if datatype == BYTES:
        return _bytes_elements(raw, count, where)
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise bad_request(
            f"{where}: {len(raw)} bytes of {datatype} do not make the shape's {count} "
            f"elements ({count * dtype.itemsize} bytes)"
        )
    return np.frombuffer(raw, dtype=dtype)


def _bytes_elements(raw: bytes, count: int, where: str) -> np.ndarray:
    """BYTES in binary: each element is a 4-byte little-endian length and its bytes."""
    elements = np.empty(count, dtype=object)
    position = 0
    for index in range(count):
        if position + 4 > len(raw):
            raise bad_request(f"{where}: the data ends before BYTES element {index}")
        (length,) = struct.unpack_from("<I", raw, position)
        position += 4
        if position + length > len(raw):
            raise bad_request(
                f"{where}: BYTES element {index} says {length} bytes, "
                f"{len(raw) - position} are left"
            )
        elements[index] = raw[position : position + length]
        position += length
    if position != len(raw):
        raise bad_request(f"{where}: {len(raw) - position} bytes after the last BYTES element")
    return elements


def _from_json(data: Any, datatype: str, count: int, where: str) -> np.ndarray:
    flat = list(_flatten(data))
    if len(flat) != count:
        raise bad_request(f"{where}: {len(flat)} values do not make the shape's {count} elements")
    if datatype == BYTES:
        if not all(isinstance(value, str) for value in flat):
            raise bad_request(f"{where}: BYTES data in JSON must be strings")
        elements = np.empty(count, dtype=object)
        elements[:] = [value.encode("utf-8") for value in flat]
        return elements
    if datatype == "BOOL":
        if not all(isinstance(value, bool) for value in flat):
            raise bad_request(f"{where}: BOOL data must be true or false")
    elif datatype.startswith(("INT", "UINT")):
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in flat):
            raise bad_request(f"{where}: {datatype} data must be integers")
    elif not all(isinstance(value, int | float) and not isinstance(value, bool) for value in flat):
        raise bad_request(f"{where}: {datatype} data must be numbers")
    dtype = DATATYPES[datatype]
    try:
        array = np.array(flat, dtype=dtype) if flat else np.empty(0, dtype=dtype)
    except OverflowError:
        raise bad_request(f"{where}: a value is out of the range of {datatype}") from None
    if datatype.startswith(("INT", "UINT")) and flat and array.tolist() != flat:
        raise bad_request(f"{where}: a value is out of the range of {datatype}")
    return array


def _flatten(data: Any) -> Iterable[Any]:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _requested_outputs(value: Any) -> dict[str, bool] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_request("'outputs' must be a list")
    requested = {}
    for index, spec in enumerate(value):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise bad_request(f"outputs[{index}] must be an object with a name")
        parameters = _parameters(spec.get("parameters"), f"output {spec['name']!r}")
        requested[spec["name"]] = bool(parameters.get("binary_data", False))
    return requested


def infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: Sequence[Tensor],
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The answer body and its extra headers: JSON, or JSON and the binary outputs."""
    wanted = request.outputs
    chosen = [t for t in outputs if wanted is None or t.name in wanted]
    message: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        message["id"] = request.id
    if parameters:
        message["parameters"] = dict(parameters)
    blobs: list[bytes] = []
    described = []
    for tensor in chosen:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        binary = request.binary_default if wanted is None else wanted[tensor.name]
        if binary:
            blob = tensor_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(tensor)
        described.append(entry)
    message["outputs"] = described
    header = orjson.dumps(message)
    if not blobs:
        return header, {}
    return header + b"".join(blobs), {HEADER_LENGTH: str(len(header))}


def tensor_bytes(tensor: Tensor) -> bytes:
    if tensor.datatype == BYTES:
        return b"".join(struct.pack("<I", len(item)) + item for item in tensor.data.reshape(-1))
    return np.ascontiguousarray(tensor.data, dtype=DATATYPES[tensor.datatype]).tobytes()


def _json_data(tensor: Tensor) -> list[Any]:
    flat = tensor.data.reshape(-1)
    if tensor.datatype == BYTES:
        return [item.decode("utf-8", "replace") for item in flat]
    return flat.tolist()


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})
