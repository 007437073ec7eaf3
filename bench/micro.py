"""What each change of the lean request path saves, one at a time, in microseconds per
request: each step of a classify, sentiment or generate request timed the old way and
the new way, in one process, on real payloads (MNIST test PNGs, SST-2 test sentences,
the released generator).

    python -m bench.micro [--data-dir ../shared/data] [--repeat 2000]

The end-to-end effect of all of them together is ``make bench-peers``.
"""

from __future__ import annotations

import os
import tempfile

# The server keeps its metrics in prometheus_client's multiprocess files (memory-mapped),
# which makes every observation dearer; measure them that way. Set before
# prometheus_client is imported, which is when it chooses how values are stored.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="bench-micro-"))

import argparse
import asyncio
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import prometheus_client
from PIL import Image
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser
from starlette.responses import JSONResponse

from bench.multipart import file_parts, multipart_body
from bench.payloads import (
    default_data_dir,
    png_bytes,
    read_mnist_test_digits,
    read_sst2_test_sentences,
)
from models.onnx_session import open_session
from models.preprocessing import digit_pixels_from_image, digit_pixels_from_images
from models.registry import DIGIT_GENERATOR, artifacts_root, get_spec
from service.imaging import encode_png, grid_canvas, load_image, open_image
from service.requests import parse_form, parse_json
from service.schemas import DigitPrediction, text_inputs
from service.settings import Settings
from service.traffic_metrics import BentoTrafficMetrics, RouteTrafficMetrics

BATCH = 64  # images per model call under load (the CPU default max_batch_size)
# Rows per generator call under load: 64 clients × n=16 fill the CPU max_batch_size.
GENERATOR_BATCH = 256
GENERATE_N = 16
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def per_call_us(step: Callable[[int], object], repeat: int, items_per_call: int = 1) -> float:
    started = time.perf_counter()
    for index in range(repeat):
        step(index)
    return 1e6 * (time.perf_counter() - started) / (repeat * items_per_call)


def streaming_parse_form(body: bytes, content_type: str) -> list[tuple[bytes, bytes]]:
    """(name, data) of each part, by python-multipart's streaming parser: what
    ``service.requests.parse_form`` did before it split the body at its delimiters."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    parts: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []
    headers: dict[bytes, bytes] = {}
    field, value = bytearray(), bytearray()

    def on_header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_part_end() -> None:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        parts.append((disposition.get(b"name", b""), b"".join(chunks)))
        chunks.clear()

    callbacks = {
        "on_header_field": lambda data, start, end: field.extend(data[start:end]),
        "on_header_value": lambda data, start, end: value.extend(data[start:end]),
        "on_header_end": on_header_end,
        "on_part_data": lambda data, start, end: chunks.append(data[start:end]),
        "on_part_end": on_part_end,
    }
    MultipartParser(options[b"boundary"], callbacks).write(body)
    return parts


def traffic_metrics_us(middleware_class: type, repeat: int, namespace: str) -> float:
    """BentoML's request metrics for one request to an API route, around an app that
    answers at once (the app's own cost subtracted)."""
    from bentoml._internal.context import server_context

    server_context.service_routes = ["/classify"]

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def ignore(message) -> None:
        pass

    async def requests(handler) -> float:
        scope = {"type": "http", "path": "/classify"}
        await handler(scope, None, ignore)  # set-up and first lookups
        started = time.perf_counter()
        for _ in range(repeat):
            await handler(scope, None, ignore)
        return 1e6 * (time.perf_counter() - started) / repeat

    loop = asyncio.new_event_loop()
    try:
        bare = loop.run_until_complete(requests(app))
        wrapped = middleware_class(app, namespace=namespace)
        # prometheus_client itself as the metrics client (BentoML's wraps it), so that
        # this process needs no BentoML metrics set-up.
        wrapped._setup(metrics_client=prometheus_client, duration_buckets=DURATION_BUCKETS)
        return loop.run_until_complete(requests(wrapped)) - bare
    finally:
        loop.close()


def measure(data_dir: Path, repeat: int) -> list[tuple[str, float, float]]:
    pngs = [png_bytes(pixels) for pixels in read_mnist_test_digits(data_dir, 512)]
    forms = [multipart_body(file_parts("image", [png])) for png in pngs]
    sentences = read_sst2_test_sentences(data_dir)[:512]
    texts = [json.dumps({"text": text}).encode() for text in sentences]
    rows = []

    async def starlette_form(index: int) -> None:
        body, content_type = forms[index % len(forms)]

        async def stream():
            yield body

        form = await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()
        await form["image"].read()
        await form.close()

    loop = asyncio.new_event_loop()
    rows.append(
        (
            "multipart body → image bytes (Starlette's form parser → parse_form)",
            per_call_us(lambda i: loop.run_until_complete(starlette_form(i)), repeat),
            per_call_us(
                lambda i: parse_form(
                    forms[i % len(forms)][0], forms[i % len(forms)][1], max_parts=144
                ),
                repeat,
            ),
        )
    )
    loop.close()

    rows.append(
        (
            "one-image form → parts (python-multipart's streaming parser → split at delimiters)",
            per_call_us(lambda i: streaming_parse_form(*forms[i % len(forms)]), repeat),
            per_call_us(lambda i: parse_form(*forms[i % len(forms)], max_parts=144), repeat),
        )
    )
    big_form = multipart_body(file_parts("images", pngs * 2))  # 1,024 images
    rows.append(
        (
            "1,024-image form → parts, per request (the same two parsers)",
            per_call_us(lambda i: streaming_parse_form(*big_form), max(1, repeat // 200)),
            per_call_us(lambda i: parse_form(*big_form, max_parts=2048), max(1, repeat // 200)),
        )
    )
    rows.append(
        (
            "BentoML's request metrics per request (its middleware → RouteTrafficMetrics)",
            traffic_metrics_us(BentoTrafficMetrics, repeat, "micro_bentoml"),
            traffic_metrics_us(RouteTrafficMetrics, repeat, "micro_route"),
        )
    )

    images = [load_image(open_image(png, max_pixels=1 << 24)) for png in pngs]
    batches = [images[start : start + BATCH] for start in range(0, len(images), BATCH)]
    rows.append(
        (
            f"image preprocessing, per image (one at a time → batches of {BATCH})",
            per_call_us(lambda i: digit_pixels_from_image(images[i % len(images)]), repeat),
            per_call_us(
                lambda i: digit_pixels_from_images(batches[i % len(batches)]),
                max(1, repeat // BATCH),
                BATCH,
            ),
        )
    )

    probabilities = np.full(10, 0.1, dtype=np.float32)

    def pydantic_response(_: int) -> None:
        values = probabilities.tolist()
        prediction = DigitPrediction(digit=7, confidence=values[7], probabilities=values)
        JSONResponse(prediction.model_dump()).body  # noqa: B018 (renders the body)

    def orjson_response(_: int) -> None:
        values = probabilities.tolist()
        orjson.dumps({"digit": 7, "confidence": values[7], "probabilities": values})

    rows.append(
        (
            "classify answer → JSON bytes (pydantic model + json → dict + orjson)",
            per_call_us(pydantic_response, repeat),
            per_call_us(orjson_response, repeat),
        )
    )
    sentiment_input, _ = text_inputs("sentiment", Settings.from_env({}).limits)
    rows.append(
        (
            "sentiment body → validated text (json.loads + pydantic → model_validate_json)",
            per_call_us(
                lambda i: sentiment_input.model_validate(json.loads(texts[i % len(texts)])), repeat
            ),
            per_call_us(lambda i: parse_json(sentiment_input, texts[i % len(texts)]), repeat),
        )
    )

    registry = prometheus_client.CollectorRegistry()
    histogram = prometheus_client.Histogram("h", "h", ["endpoint"], registry=registry)
    bound = histogram.labels(endpoint="classify")
    rows.append(
        (
            "one histogram observation (label lookup → child bound at start-up)",
            per_call_us(lambda i: histogram.labels(endpoint="classify").observe(1.0), repeat),
            per_call_us(lambda i: bound.observe(1.0), repeat),
        )
    )

    # The grid a /generate n=16 request answers, from 16 MNIST digits.
    grid_pixels = grid_canvas([np.asarray(image) for image in images[:16]])
    rows.append(
        (
            "16-digit grid → PNG bytes (zlib level 6 → 1)",
            per_call_us(lambda i: _png_at_level(grid_pixels, 6), repeat),
            per_call_us(lambda i: encode_png(grid_pixels), repeat),
        )
    )
    rows.append(api_key_row(repeat))
    rows.append(generator_row(max(3, repeat // 100)))
    return rows


def api_key_row(repeat: int) -> tuple[str, float, float]:
    """What turning API keys on adds to a request: the gate's check of its bearer key
    against a file of ten keys (hash, a constant-time compare with each, the count by
    key name), keys off being no check at all. The target is at most 20 µs."""
    from models.registry import REGISTRY
    from service.api_keys import ApiKeys, RouteGuard, new_key_line
    from service.bento import route_table

    lines, keys = [], []
    for index in range(10):
        key, line = new_key_line(f"client-{index}", ["infer"])
        keys.append(key)
        lines.append(line)
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as file:
        file.write("\n".join(lines) + "\n")
    table = route_table(list(REGISTRY.values()), Settings.from_env({}), admin=True)
    guard = RouteGuard(ApiKeys(Path(file.name)), table)
    headers = [[(b"content-type", b"image/png"), (b"authorization", f"Bearer {key}".encode())]
               for key in keys]  # fmt: skip
    assert guard("/classify", headers[0]) is None  # admitted
    return (
        "API keys on: the key check of one request (10 keys in the file)",
        0.0,
        per_call_us(lambda i: guard("/classify", headers[i % len(headers)]), repeat),
    )


def generator_row(repeat: int) -> tuple[str, float, float]:
    """The released generator as the exporter writes it and as it is released
    (``training.subpixel``), per n=16 request, in batches of ``GENERATOR_BATCH`` rows
    with the intra-op threads the service gives the generator (``service.settings``)."""
    from training.export import export_onnx  # torch: imported only for this row

    spec = get_spec(DIGIT_GENERATOR)
    artifact = spec.load_artifact(artifacts_root() / spec.name)
    module = spec.load_module(artifact)
    graphs = [
        export_onnx(spec, module, artifact.config, subpixel_upsampling=flag).SerializeToString()
        for flag in (False, True)
    ]
    feeds = dict(
        zip(
            spec.onnx.inputs,
            spec.example_inputs(artifact.config, GENERATOR_BATCH, seed=0),
            strict=True,
        )
    )
    threads = Settings.from_env().threads_per_model("generate")
    sessions = [open_session(graph, threads=threads) for graph in graphs]
    for session in sessions:
        session.run(None, feeds)  # warm up
    # Interleaved, so a change in the machine's load falls on both graphs alike.
    totals = [0.0, 0.0]
    for _ in range(repeat):
        for index, session in enumerate(sessions):
            started = time.perf_counter()
            session.run(None, feeds)
            totals[index] += time.perf_counter() - started
    per_request = [1e6 * total / repeat * GENERATE_N / GENERATOR_BATCH for total in totals]
    return (
        f"generator, per n={GENERATE_N} request in batches of {GENERATOR_BATCH} rows "
        "(ConvTranspose → sub-pixel Conv)",
        *per_request,
    )


def _png_at_level(pixels: np.ndarray, level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args(argv)
    Image.init()
    rows = measure(args.data_dir or default_data_dir(), args.repeat)
    print("| step | before µs | after µs | saved µs |")
    print("|---|---:|---:|---:|")
    for name, before, after in rows:
        print(f"| {name} | {before:.1f} | {after:.1f} | {before - after:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
