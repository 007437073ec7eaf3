"""Realistic request bodies for the load tests, built once, before any load is sent.

* classify: MNIST *test* digits encoded as PNG files in memory, sent as
  ``multipart/form-data`` (one image per request, or many for the batch form);
* sentiment: SST-2 *test* sentences as JSON;
* generate: JSON requests for ``n`` digits returned as one PNG grid;
* mixed: the three endpoints in turn (classify, sentiment, generate n=4), the
  steady traffic of a soak (``bench.soak``);
* v2-binary: MNIST *test* digits, preprocessed as the service does, as Open Inference
  Protocol (KServe v2) requests with the binary tensor extension, as tritonclient sends
  them: one ``1×1×28×28`` FP32 ``images`` tensor in, ``probabilities`` asked for as
  binary data.

Every body is encoded to bytes here, so a load generator only copies bytes to
a socket; encoding a multipart form per request would cost the client more
CPU than the server spends on the request.

    python -m bench.payloads --data-dir ../shared/data   # print a summary of each workload
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.multipart import file_parts, multipart_body
from models.preprocessing import digit_pixels_from_images, normalize_digits
from training.sources import MNIST_TEST_IMAGES, default_data_dir, read_sst2_rows, require_data

# The request formats of the service's endpoints (see service/service.py).
CLASSIFY_PATH = "/classify"
CLASSIFY_FILE_FIELD = "image"
CLASSIFY_BATCH_PATH = "/classify_batch"
CLASSIFY_BATCH_FILE_FIELD = "images"
SENTIMENT_PATH = "/sentiment"
GENERATE_PATH = "/generate"
# The classifier as a v2 model (Open Inference Protocol over REST, binary tensor extension).
V2_MODEL = "mnist-cnn"
V2_INFER_PATH = f"/v2/models/{V2_MODEL}/infer"
V2_INPUT = "images"
V2_OUTPUT = "probabilities"
INFERENCE_HEADER = "Inference-Header-Content-Length"
# v2 datatypes → little-endian NumPy types.
V2_DATATYPES = {
    name: np.dtype(code)
    for name, code in {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4"}.items()
}

IDX_IMAGES_MAGIC = 2051

# How many distinct bodies each workload cycles through: enough that no
# cache on the way can make every request look the same.
DEFAULT_POOL_SIZE = 512
BATCH_IMAGES = 1024
MAX_GENERATE = 16
# The images each /generate request of the mixed workload asks for.
MIXED_GENERATE_N = 4


@dataclass(frozen=True)
class Request:
    """One ready-to-send HTTP request; ``items`` counts the model inputs it carries.

    ``headers`` are sent besides Content-Type. ``check(headers, body)``, when given,
    judges a 2xx answer: one it rejects counts as an error (``bad-answer``).
    """

    method: str
    path: str
    body: bytes
    content_type: str
    items: int = 1
    headers: tuple[tuple[str, str], ...] = ()
    check: Callable[[Mapping[str, str], bytes], bool] | None = None


@dataclass(frozen=True)
class Workload:
    """A named pool of requests for one endpoint; a client picks from it at random."""

    name: str
    endpoint: str
    requests: tuple[Request, ...]

    @property
    def mean_items(self) -> float:
        return sum(r.items for r in self.requests) / len(self.requests)


def read_mnist_test_digits(data_dir: Path, count: int | None = None) -> np.ndarray:
    """The MNIST test images as a ``N×28×28`` uint8 array (ink white on black).

    The IDX file is read directly rather than through torchvision so that the
    load-generating processes stay free of torch.
    """
    require_data(data_dir, MNIST_TEST_IMAGES)
    raw = (data_dir / MNIST_TEST_IMAGES).read_bytes()
    magic, total, rows, cols = np.frombuffer(raw[:16], dtype=">i4")
    if magic != IDX_IMAGES_MAGIC:
        raise ValueError(f"{data_dir / MNIST_TEST_IMAGES} is not an IDX image file")
    images = np.frombuffer(raw[16:], dtype=np.uint8).reshape(total, rows, cols)
    return images if count is None else images[:count]


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def read_sst2_test_sentences(data_dir: Path) -> list[str]:
    """The SST-2 test sentences, without their labels."""
    return [text for _, text in read_sst2_rows(data_dir, "test") if text.strip()]


def json_request(path: str, payload: dict, items: int = 1) -> Request:
    return Request("POST", path, json.dumps(payload).encode(), "application/json", items)


def classify_workload(pngs: Sequence[bytes]) -> Workload:
    requests = []
    for png in pngs:
        body, content_type = multipart_body(file_parts(CLASSIFY_FILE_FIELD, [png]))
        requests.append(Request("POST", CLASSIFY_PATH, body, content_type))
    return Workload("classify", CLASSIFY_PATH, tuple(requests))


def classify_batch_workload(pngs: Sequence[bytes], per_request: int, pool: int) -> Workload:
    """``pool`` requests of ``per_request`` digits each, drawn from different offsets."""
    requests = []
    for start in range(pool):
        chosen = [pngs[(start * 97 + i) % len(pngs)] for i in range(per_request)]
        body, content_type = multipart_body(file_parts(CLASSIFY_BATCH_FILE_FIELD, chosen))
        requests.append(Request("POST", CLASSIFY_BATCH_PATH, body, content_type, per_request))
    return Workload(f"classify-{per_request}", CLASSIFY_BATCH_PATH, tuple(requests))


def sentiment_workload(sentences: Sequence[str]) -> Workload:
    requests = tuple(json_request(SENTIMENT_PATH, {"text": text}) for text in sentences)
    return Workload("sentiment", SENTIMENT_PATH, requests)


def generate_request(n: int, digit: int | None, seed: int) -> Request:
    payload = {"n": n, "seed": seed, "grid": True}
    if digit is not None:
        payload["digit"] = digit
    return json_request(GENERATE_PATH, payload, items=n)


def generate_workload(n_values: Sequence[int], pool: int, seed: int = 0) -> Workload:
    """Generate requests with ``n`` drawn from ``n_values``; digits and seeds vary."""
    rng = random.Random(seed)
    requests = tuple(
        generate_request(rng.choice(n_values), rng.choice([None, *range(10)]), rng.randrange(2**31))
        for _ in range(pool)
    )
    name = f"generate-{n_values[0]}" if len(set(n_values)) == 1 else "generate-mixed"
    return Workload(name, GENERATE_PATH, requests)


def mixed_workload(parts: Sequence[Workload]) -> Workload:
    """The requests of ``parts`` interleaved, an equal number from each, so that a
    client picking at random sends each endpoint the same share of requests."""
    count = min(len(part.requests) for part in parts)
    requests = tuple(part.requests[i] for i in range(count) for part in parts)
    return Workload("mixed", "mixed", requests)


def v2_binary_request(rows: np.ndarray) -> Request:
    """``N×1×28×28`` normalised digits → a v2 inference request with the binary tensor
    extension: the JSON header, then the rows' raw little-endian FP32 bytes."""
    data = np.ascontiguousarray(rows, dtype="<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": V2_INPUT,
                "shape": list(rows.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(data)},
            }
        ],
        "outputs": [{"name": V2_OUTPUT, "parameters": {"binary_data": True}}],
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return Request(
        "POST",
        V2_INFER_PATH,
        encoded + data,
        "application/octet-stream",
        items=len(rows),
        headers=((INFERENCE_HEADER, str(len(encoded))),),
        check=is_v2_classification,
    )


def parse_v2_answer(headers: Mapping[str, str], body: bytes) -> dict[str, np.ndarray]:
    """A v2 inference answer (JSON, or JSON then binary tensors) → its outputs by name.

    Raises ``ValueError`` (or ``KeyError``, ``TypeError``) on anything else.
    """
    lengths = [value for name, value in headers.items() if name.lower() == INFERENCE_HEADER.lower()]
    json_length = int(lengths[0]) if lengths else len(body)
    answer = json.loads(body[:json_length])
    offset = json_length
    outputs = {}
    for output in answer["outputs"]:
        dtype = V2_DATATYPES[output["datatype"]]
        shape = [int(side) for side in output["shape"]]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            values = np.asarray(output["data"], dtype=dtype)
        else:
            values = np.frombuffer(body, dtype, size // dtype.itemsize, offset)
            offset += size
        outputs[output["name"]] = values.reshape(shape)
    if offset != len(body):
        raise ValueError(f"{len(body) - offset} bytes after the last binary output")
    return outputs


def is_v2_classification(headers: Mapping[str, str], body: bytes) -> bool:
    """Whether ``body`` is a v2 answer with the digits' ``probabilities`` (N×10)."""
    try:
        probabilities = parse_v2_answer(headers, body)[V2_OUTPUT]
    except (ValueError, KeyError, TypeError):
        return False
    return probabilities.ndim == 2 and probabilities.shape[1] == 10


# The service's gRPC port in the benchmark (its configurations set SERVING_GRPC_PORT).
GRPC_PORT = 50051
GRPC_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def v2_grpc_request(rows: np.ndarray) -> Request:
    """``N×1×28×28`` normalised digits → a serialised gRPC ModelInferRequest with the
    rows as ``raw_input_contents`` (what tritonclient.grpc sends)."""
    from tritonclient.grpc import service_pb2 as pb

    message = pb.ModelInferRequest(model_name=V2_MODEL)
    message.inputs.add(name=V2_INPUT, datatype="FP32", shape=list(rows.shape))
    message.outputs.add(name=V2_OUTPUT)
    message.raw_input_contents.append(np.ascontiguousarray(rows, dtype="<f4").tobytes())
    return Request("GRPC", GRPC_MODEL_INFER, message.SerializeToString(), "application/grpc",
                   items=len(rows), check=is_v2_grpc_classification)  # fmt: skip


def is_v2_grpc_classification(headers: Mapping[str, str], body: bytes) -> bool:
    """Whether ``body`` is a ModelInferResponse with the digits' ``probabilities``."""
    from google.protobuf.message import DecodeError
    from tritonclient.grpc import service_pb2 as pb

    try:
        response = pb.ModelInferResponse.FromString(body)
    except DecodeError:
        return False
    return (
        [output.name for output in response.outputs] == [V2_OUTPUT]
        and list(response.outputs[0].shape)[1:] == [10]
        and len(response.raw_output_contents[0]) == 40 * response.outputs[0].shape[0]
    )


def v2_binary_workload(digits: np.ndarray) -> Workload:
    """One request per MNIST digit, preprocessed as the service's ``/classify`` does."""
    images = [Image.fromarray(pixels, mode="L") for pixels in digits]
    rows = normalize_digits(digit_pixels_from_images(images))[:, np.newaxis]
    requests = tuple(v2_binary_request(rows[i : i + 1]) for i in range(len(rows)))
    return Workload("v2-binary", V2_INFER_PATH, requests)


def v2_grpc_workload(digits: np.ndarray) -> Workload:
    """``v2-binary``'s digits as gRPC ModelInfer calls."""
    images = [Image.fromarray(pixels, mode="L") for pixels in digits]
    rows = normalize_digits(digit_pixels_from_images(images))[:, np.newaxis]
    requests = tuple(v2_grpc_request(rows[i : i + 1]) for i in range(len(rows)))
    return Workload("v2-grpc", "grpc ModelInfer", requests)


def check_workload_name(name: str) -> str:
    """Return ``name`` if ``build_workloads`` knows it, else raise ``ValueError``."""
    for prefix in ("classify-", "generate-"):
        suffix = name.removeprefix(prefix)
        if suffix != name and ((suffix.isdigit() and int(suffix) > 0) or name == "generate-mixed"):
            return name
    if name in ("classify", "sentiment", "mixed", "v2-binary", "v2-grpc"):
        return name
    raise ValueError(
        f"unknown workload {name!r}; known: classify, classify-<k>, sentiment, "
        "generate-<n>, generate-mixed, mixed, v2-binary, v2-grpc"
    )


def build_workloads(
    data_dir: Path | None = None,
    names: Sequence[str] | None = None,
    pool_size: int = DEFAULT_POOL_SIZE,
    batch_images: int = BATCH_IMAGES,
) -> dict[str, Workload]:
    """Every known workload by name (or just ``names``), each a pool of ready requests.

    Names: ``classify``, ``classify-<k>`` (one request carrying ``k`` digits),
    ``sentiment``, ``generate-<n>`` (fixed ``n``), ``generate-mixed``
    (``n`` from 1 to 16), ``mixed`` (classify, sentiment and generate-4 in turn) and
    ``v2-binary`` (one digit per v2 inference request, binary tensors) and ``v2-grpc``
    (the same as gRPC ModelInfer calls, on ``GRPC_PORT``).
    """
    data_dir = data_dir or default_data_dir()
    wanted = list(names) if names else ["classify", "sentiment", "generate-16", "generate-mixed"]
    workloads: dict[str, Workload] = {}
    pngs: list[bytes] | None = None
    for name in map(check_workload_name, wanted):
        if name == "mixed":
            parts = ["classify", "sentiment", f"generate-{MIXED_GENERATE_N}"]
            workloads[name] = mixed_workload(
                list(build_workloads(data_dir, parts, pool_size, batch_images).values())
            )
        elif name.startswith("classify"):
            if pngs is None:
                digits = read_mnist_test_digits(data_dir, max(pool_size, batch_images))
                pngs = [png_bytes(pixels) for pixels in digits]
            if name == "classify":
                workloads[name] = classify_workload(pngs[:pool_size])
            else:
                per_request = int(name.removeprefix("classify-"))
                workloads[name] = classify_batch_workload(pngs, per_request, pool=8)
        elif name == "v2-binary":
            workloads[name] = v2_binary_workload(read_mnist_test_digits(data_dir, pool_size))
        elif name == "v2-grpc":
            workloads[name] = v2_grpc_workload(read_mnist_test_digits(data_dir, pool_size))
        elif name == "sentiment":
            sentences = read_sst2_test_sentences(data_dir)
            workloads[name] = sentiment_workload(sentences[:pool_size])
        elif name == "generate-mixed":
            workloads[name] = generate_workload(range(1, MAX_GENERATE + 1), pool_size)
        elif name.startswith("generate-"):
            workloads[name] = generate_workload([int(name.removeprefix("generate-"))], pool_size)
    return workloads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--workload", action="append", help="workload name (repeatable)")
    args = parser.parse_args(argv)
    for workload in build_workloads(args.data_dir, args.workload).values():
        sizes = [len(r.body) for r in workload.requests]
        print(
            f"{workload.name:16s} {workload.endpoint:16s} {len(sizes):5d} bodies, "
            f"{min(sizes)}-{max(sizes)} bytes, {workload.mean_items:.1f} items/request"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
