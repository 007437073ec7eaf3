"""What each change of the lean request path saves, one at a time, in microseconds per
request: each step of a classify or sentiment request timed the old way and the new way,
in one process, on real payloads (MNIST test PNGs, SST-2 test sentences).

    python -m bench.micro [--data-dir ../shared/data] [--repeat 2000]

The end-to-end effect of all of them together is ``make bench-peers``.
"""

from __future__ import annotations

import argparse
import asyncio
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
from models.preprocessing import digit_pixels_from_image, digit_pixels_from_images
from service.imaging import load_image, open_image
from service.requests import SentimentInput, parse_form, parse_json
from service.schemas import DigitPrediction

BATCH = 64  # images per model call under load (the CPU default max_batch_size)


def per_call_us(step: Callable[[int], object], repeat: int, items_per_call: int = 1) -> float:
    started = time.perf_counter()
    for index in range(repeat):
        step(index)
    return 1e6 * (time.perf_counter() - started) / (repeat * items_per_call)


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
    rows.append(
        (
            "sentiment body → validated text (json.loads + pydantic → model_validate_json)",
            per_call_us(
                lambda i: SentimentInput.model_validate(json.loads(texts[i % len(texts)])), repeat
            ),
            per_call_us(lambda i: parse_json(SentimentInput, texts[i % len(texts)]), repeat),
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
    return rows


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
