"""The serving path needs torch only where a PyTorch model runs.

* The ``bentoml serve`` parent process runs no model, so it never loads torch,
  whichever backend the workers use.
* With torch absent (the CPU image installs ONNX Runtime only), the service
  starts, picks ONNX Runtime for every model and answers all three endpoints
  like a server that runs the same models in PyTorch.

"Absent" is made real for the child processes by a ``sitecustomize`` module on
``PYTHONPATH`` that makes every import finder report that no ``torch`` exists,
exactly as on a machine where it was never installed.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import pytest
from PIL import Image

if TYPE_CHECKING:
    from conftest import ServedProcess

TARGET = "service.service:ServingService"
BASE_ENV = {"SERVING_DEVICE": "cpu", "SERVING_THREADS": "1"}
HIDE_TORCH = textwrap.dedent(
    """
    import sys

    class _WithoutTorch:
        # Wraps one import finder: torch and its submodules are never found.
        def __init__(self, finder):
            self._finder = finder

        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                return None
            find = getattr(self._finder, "find_spec", None)
            return find(name, path, target) if find else None

        def __getattr__(self, attribute):
            return getattr(self._finder, attribute)

    sys.meta_path[:] = [_WithoutTorch(finder) for finder in sys.meta_path]
    """
)


@pytest.fixture(scope="module")
def torchless_server(model_store, serve, tmp_path_factory) -> ServedProcess:
    shim = tmp_path_factory.mktemp("without-torch")
    (shim / "sitecustomize.py").write_text(HIDE_TORCH)
    env = {**os.environ, "PYTHONPATH": str(shim)}
    probe = "import importlib.util as u; assert u.find_spec('torch') is None; import torch"
    hidden = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert "ModuleNotFoundError: No module named 'torch'" in hidden.stderr, hidden.stderr
    return serve(TARGET, {**BASE_ENV, "PYTHONPATH": str(shim)})


@pytest.fixture(scope="module")
def torch_server(model_store, serve) -> ServedProcess:
    return serve(TARGET, {**BASE_ENV, "SERVING_BACKEND": "torch"})


def _loads_torch(process: psutil.Process) -> bool:
    """Whether torch's shared libraries are mapped into the process (Linux)."""
    maps = Path(f"/proc/{process.pid}/maps").read_text()
    return "libtorch" in maps


def _server_processes(served: ServedProcess) -> tuple[psutil.Process, list[psutil.Process]]:
    """The ``bentoml serve`` process and its model workers."""
    parent = psutil.Process(served.process.pid)
    workers = [
        child
        for child in parent.children(recursive=True)
        if "_bentoml_impl.worker" in " ".join(child.cmdline())
    ]
    assert workers, "no worker process found"
    return parent, workers


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _classify(served: ServedProcess, images: np.ndarray) -> list[dict]:
    answers: list[dict] = []
    for start in range(0, len(images), 100):
        status, chunk = served.post_files(
            "/classify_batch", "images", [_png(p) for p in images[start : start + 100]]
        )
        assert status == 200, chunk
        answers += chunk
    return answers


def _sentiment(served: ServedProcess, texts: list[str]) -> list[dict]:
    answers: list[dict] = []
    for start in range(0, len(texts), 100):
        status, chunk = served.post_json("/sentiment_batch", {"texts": texts[start : start + 100]})
        assert status == 200, chunk
        answers += chunk
    return answers


def _generated_pixels(served: ServedProcess) -> np.ndarray:
    status, answer = served.post_json("/generate", {"n": 16, "seed": 2024})
    assert status == 200, answer
    return np.stack(
        [
            np.asarray(Image.open(io.BytesIO(base64.b64decode(image["png"]))), dtype=np.int16)
            for image in answer["images"]
        ]
    )


def test_the_parent_process_never_loads_torch(torch_server):
    parent, workers = _server_processes(torch_server)
    assert not _loads_torch(parent)
    assert all(_loads_torch(worker) for worker in workers)  # the PyTorch models run there


def test_without_torch_every_model_is_served_by_onnx_runtime(torchless_server):
    parent, workers = _server_processes(torchless_server)
    assert not _loads_torch(parent) and not any(_loads_torch(w) for w in workers)
    log = torchless_server.log()
    for key in ("classify", "sentiment", "generate"):
        assert f"model {key}: " in log
    assert log.count("onnx on cpu (fp32") == 3


def test_without_torch_the_answers_match_pytorch(
    torchless_server, torch_server, mnist_test_digits, sst2_test_sentences
):
    images, labels = mnist_test_digits
    onnx_digits = _classify(torchless_server, images)
    torch_digits = _classify(torch_server, images)
    assert [a["digit"] for a in onnx_digits] == [a["digit"] for a in torch_digits]
    np.testing.assert_allclose(
        [a["probabilities"] for a in onnx_digits],
        [a["probabilities"] for a in torch_digits],
        atol=1e-4,
    )
    assert np.mean(np.array([a["digit"] for a in onnx_digits]) == labels) >= 0.97

    texts = [text for text, _ in sst2_test_sentences]
    onnx_texts = _sentiment(torchless_server, texts)
    torch_texts = _sentiment(torch_server, texts)
    assert [a["label"] for a in onnx_texts] == [a["label"] for a in torch_texts]
    np.testing.assert_allclose(
        [a["score"] for a in onnx_texts], [a["score"] for a in torch_texts], atol=1e-4
    )

    # Same seed, same latent vectors on both (NumPy draws them); the two runtimes
    # may round the last bit differently, which moves a pixel by one level at most.
    difference = np.abs(_generated_pixels(torchless_server) - _generated_pixels(torch_server))
    assert difference.max() <= 1
