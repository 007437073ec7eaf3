"""A fourth model is a spec, its module and a training script: nothing in ``models/``,
``training/`` or ``service/`` changes.

The model (``tests/extra_model/digit_mlp``: a one-hidden-layer MNIST classifier,
its ``ModelSpec`` and its training script) is copied to a temporary directory and
named in ``MODEL_SPECS``. The pipeline trains it (``--quick``: the script's
``--smoke``), evaluates, exports, verifies and registers it; ``bentoml serve`` then
serves it beside the released models, with its own routes, batcher, metrics,
limits, settings and OpenAPI entry, and it classifies real MNIST digits.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.multipart import file_parts, multipart_body

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(__file__).with_name("extra_model") / "digit_mlp"
NAME, ENDPOINT = "digit-mlp", "classify_mlp"
MAX_BATCH = 4
MAX_ITEMS = 8


@pytest.fixture(scope="module")
def extra_model(tmp_path_factory, model_store, bentoml_home, data_dir) -> dict[str, str]:
    """The environment that adds the model, after the pipeline has registered it."""
    place = tmp_path_factory.mktemp("extra-model")
    shutil.copytree(PACKAGE, place / PACKAGE.name)
    env = {"MODEL_SPECS": "digit_mlp.spec", "PYTHONPATH": str(place)}
    command = [sys.executable, "-m", "training.pipeline", "--model", NAME, "--quick",
               "--artifacts-dir", str(place / "artifacts"),
               "--data-dir", str(data_dir)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"{NAME}: registered as {NAME}:" in done.stderr
    metadata = json.loads((place / "artifacts" / NAME / "metadata.json").read_text())
    assert metadata["smoke"] and "model.onnx" in metadata["files"]
    assert metadata["parity"]["passed"] and metadata["evaluation"]["accuracy"] >= 0.85
    return env


@pytest.fixture(scope="module")
def server(extra_model, serve):
    return serve(
        "service.service:ServingService",
        {
            **extra_model,
            "SERVING_DEVICE": "cpu",
            "SERVING_THREADS": "1",
            f"SERVING_{ENDPOINT.upper()}_MAX_BATCH_SIZE": str(MAX_BATCH),
            "SERVING_MAX_ITEMS_PER_REQUEST": str(MAX_ITEMS),
        },
    )


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_it_classifies_real_mnist_digits(server, mnist_test_digits):
    images, labels = mnist_test_digits
    answers = [server.post_files(f"/{ENDPOINT}", "image", [png(p)])[1] for p in images[:40]]
    fields = {"digit", "confidence", "probabilities", "model_version"}
    assert all(set(a) == fields for a in answers)
    correct = np.mean([a["digit"] == label for a, label in zip(answers, labels, strict=False)])
    assert correct >= 0.85, correct  # the smoke run measured about 0.94
    status, batch = server.post_files(f"/{ENDPOINT}_batch", "images", [png(p) for p in images[:8]])
    assert status == 200 and [a["digit"] for a in batch] == [a["digit"] for a in answers[:8]]
    # The released classifier is served beside it, unchanged.
    assert server.post_files("/classify", "image", [png(images[0])])[1]["digit"] == labels[0]


def test_its_requests_are_batched_within_its_own_limits(server, mnist_test_digits):
    images, _ = mnist_test_digits
    bodies = [multipart_body(file_parts("image", [png(p)])) for p in images[:48]]

    async def concurrently() -> list[int]:
        async with aiohttp.ClientSession() as session:

            async def post(body: bytes, content_type: str) -> int:
                headers = {"Content-Type": content_type}
                async with session.post(
                    f"{server.url}/{ENDPOINT}", data=body, headers=headers
                ) as r:
                    await r.read()
                    return r.status

            return await asyncio.gather(*(post(*body) for body in bodies))

    assert asyncio.run(concurrently()) == [200] * len(bodies)
    sizes = batch_sizes(server)
    assert sizes["count"] < sizes["sum"]  # some model calls served several requests
    assert sizes[f"{float(MAX_BATCH)}"] == sizes["count"]  # none above its setting
    status, error = server.post_files(
        f"/{ENDPOINT}_batch", "images", [png(images[0])] * (MAX_ITEMS + 1)
    )
    assert status == 400 and error["detail"][0]["type"] == "too_long"
    status, error = server.post_files(f"/{ENDPOINT}", "image", [b"not an image"])
    assert status == 400 and error["detail"][0]["type"] == "invalid_image"


def batch_sizes(server) -> dict[str, float]:
    """The extra model's ``serving_batch_size`` histogram: buckets, count and sum."""
    raw = server.request("/metrics")[2].decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(raw):
        for sample in family.samples:
            if family.name == "serving_batch_size" and sample.labels["endpoint"] == ENDPOINT:
                key = sample.labels.get("le") or sample.name.rsplit("_", 1)[1]
                found[key] = found.get(key, 0.0) + sample.value
    assert f'endpoint="/{ENDPOINT}"' in raw  # BentoML's request metrics name its route
    return found


def test_it_is_documented_and_known_to_the_python_client(server, tmp_path, mnist_test_digits):
    import bentoml

    spec = json.loads(server.request("/docs.json")[2])
    for path in (f"/{ENDPOINT}", f"/{ENDPOINT}_batch", f"/{ENDPOINT}_input"):
        assert "post" in spec["paths"][path], path
    assert NAME in spec["paths"][f"/{ENDPOINT}"]["post"]["summary"]
    images, labels = mnist_test_digits
    path = tmp_path / "digit.png"
    path.write_bytes(png(images[2]))
    with bentoml.SyncHTTPClient(server.url) as client:
        assert client.call(ENDPOINT, image=path)["digit"] == labels[2]
