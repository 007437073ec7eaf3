"""``bentoml build`` from bentofile.yaml, then the built bento served by its tag.

The bento is built in the test session's own BentoML home, from the models the
session registered, and must answer all three endpoints correctly.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
RAW_SENTENCES = [
    ("What a wonderful, moving film. I loved every minute of it!", "positive"),
    ("A dull, tedious mess that goes nowhere.", "negative"),
]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bento_tag(model_store, bentoml_home):
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag", str(REPO_ROOT)],
        cwd=REPO_ROOT,
        env={**os.environ, "BENTOML_HOME": str(bentoml_home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("digit-sentiment-serving:")
    return tag


def test_the_bento_packs_the_service_its_models_and_pinned_packages(bento_tag, model_store):
    import bentoml

    bento = bentoml.get(bento_tag)
    assert bento.info.service == "service.service:ServingService"
    assert sorted(str(model.tag) for model in bento.info.all_models) == sorted(model_store.values())
    requirements = Path(bento.path_of("env/python/requirements.txt")).read_text()
    for package in ("bentoml==1.4.39", "torch==", "onnxruntime-gpu==", "pillow=="):
        assert package in requirements
    assert Path(bento.path_of("src/service/service.py")).is_file()
    assert not Path(bento.path_of("src/training")).exists()
    # The served versions travel as one file; nothing of the artifacts tree does.
    assert Path(bento.path_of("src/models/served_models.json")).is_file()
    assert not Path(bento.path_of("src/models/artifacts")).exists()
    dockerfile = Path(bento.path_of("env/docker/Dockerfile")).read_text()
    assert "python:3.11" in dockerfile or "3.11" in dockerfile
    # The bento's API documents are the route table's.
    openapi = yaml.safe_load(Path(bento.path_of("apis/openapi.yaml")).read_text())
    assert {"/classify", "/classify_input", "/sentiment_batch", "/generate"} <= set(
        openapi["paths"]
    )
    assert "image/png" in openapi["paths"]["/classify"]["post"]["requestBody"]["content"]
    schema = json.loads(Path(bento.path_of("apis/schema.json")).read_text())
    assert "classify_batch" in [route["name"] for route in schema["routes"]]


def test_the_built_bento_answers_every_endpoint(bento_tag, serve, mnist_test_digits):
    server = serve(bento_tag, {"SERVING_DEVICE": "cpu", "SERVING_THREADS": "1"})
    images, labels = mnist_test_digits
    answers = [server.post_files("/classify", "image", [png(p)])[1] for p in images[:10]]
    assert sum(a["digit"] == label for a, label in zip(answers, labels[:10], strict=True)) >= 9

    for text, label in RAW_SENTENCES:
        status, answer = server.post_json("/sentiment", {"text": text})
        assert status == 200 and answer["label"] == label

    status, generated = server.post_json("/generate", {"n": 3, "digit": 4, "seed": 8})
    assert status == 200 and [image["digit"] for image in generated["images"]] == [4] * 3
    image = Image.open(io.BytesIO(base64.b64decode(generated["images"][0]["png"])))
    assert image.size == (28, 28)
    status, error = server.post_json("/generate", {"n": 65})
    assert status == 400 and error["detail"][0]["loc"] == ["n"]

    # The web page travels with the bento, and the bento's OpenAPI page links to it.
    for path, kind in (
        ("/ui/", "text/html"),
        ("/ui/page.js", "javascript"),
        ("/ui/page.css", "css"),
    ):
        status, headers, _ = server.request(path)
        assert status == 200 and kind in headers["content-type"], path
    status, _, body = server.request("/docs.json")
    assert "](/ui/)" in json.loads(body)["info"]["description"]
