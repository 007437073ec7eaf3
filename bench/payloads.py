"""Realistic request bodies for the load tests, built once, before any load is sent.

* classify: MNIST *test* digits encoded as PNG files in memory, sent as
  ``multipart/form-data`` (one image per request, or many for the batch form);
* sentiment: SST-2 *test* sentences as JSON;
* generate: JSON requests for ``n`` digits returned as one PNG grid;
* mixed: the three endpoints in turn (classify, sentiment, generate n=4), the
  steady traffic of a soak (``bench.soak``).

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.multipart import file_parts, multipart_body
from training.sources import MNIST_TEST_IMAGES, default_data_dir, read_sst2_rows

# The request formats of the service's endpoints (see service/service.py).
CLASSIFY_PATH = "/classify"
CLASSIFY_FILE_FIELD = "image"
CLASSIFY_BATCH_PATH = "/classify_batch"
CLASSIFY_BATCH_FILE_FIELD = "images"
SENTIMENT_PATH = "/sentiment"
GENERATE_PATH = "/generate"

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
    """One ready-to-send HTTP request; ``items`` counts the model inputs it carries."""

    method: str
    path: str
    body: bytes
    content_type: str
    items: int = 1


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


def check_workload_name(name: str) -> str:
    """Return ``name`` if ``build_workloads`` knows it, else raise ``ValueError``."""
    for prefix in ("classify-", "generate-"):
        suffix = name.removeprefix(prefix)
        if suffix != name and ((suffix.isdigit() and int(suffix) > 0) or name == "generate-mixed"):
            return name
    if name in ("classify", "sentiment", "mixed"):
        return name
    raise ValueError(
        f"unknown workload {name!r}; known: classify, classify-<k>, sentiment, "
        "generate-<n>, generate-mixed, mixed"
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
    (``n`` from 1 to 16) and ``mixed`` (classify, sentiment and generate-4 in turn).
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
