"""Inference backends and model tasks on the released artifacts: PyTorch and ONNX
Runtime agree, batching never changes a generated bit, a missing ONNX file or an
impossible placement fails loudly at start-up, and the service pins the same
model store tags as the registration script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.measure_backends import example_batch
from models import served
from models.artifacts import ONNX_FILE, staged_artifact
from models.preprocessing import latent_arrays
from models.registry import DIGIT_GENERATOR, REGISTRY, SENTIMENT_CLASSIFIER, get_spec
from models.tokenizer import Vocabulary
from service import backends
from service import model_store as model_store_module
from service.backends import BackendError, Device, Placement, check_placement, load_predictor
from service.inference import DigitGeneration, SentimentClassification
from service.model_store import resolve_tag

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU = Device("cpu")


def placement(backend: str, precision: str = "fp32", device: Device = CPU) -> Placement:
    return Placement(backend=backend, device=device, precision=precision, threads=1)


@pytest.fixture(scope="module")
def artifacts(release_artifacts):
    return {
        name: spec.load_artifact(spec.artifact_dir(release_artifacts))
        for name, spec in REGISTRY.items()
    }


@pytest.mark.parametrize("name", list(REGISTRY))
def test_torch_and_onnx_runtime_agree(artifacts, name):
    spec = get_spec(name)
    torch_predictor = load_predictor(spec, artifacts[name], placement("torch"))
    onnx_predictor = load_predictor(spec, artifacts[name], placement("onnx"))
    for size in (1, 5, 64):
        inputs = example_batch(spec, artifacts[name].config, size)
        np.testing.assert_allclose(
            onnx_predictor(*inputs), torch_predictor(*inputs), atol=1e-4, rtol=1e-4
        )


def test_sentiment_scores_do_not_depend_on_the_other_texts_in_the_batch(artifacts):
    spec = get_spec(SENTIMENT_CLASSIFIER)
    artifact = artifacts[SENTIMENT_CLASSIFIER]
    task = SentimentClassification(
        load_predictor(spec, artifact, placement("onnx")),
        Vocabulary.load(artifact.path("vocab.json")),
    )
    texts = [
        "great",
        "a long , winding and ultimately rewarding film " * 6,
        "bad",
        "not good at all",
    ]
    rows = [task.prepare(text) for text in texts]
    together = task.run_batch(rows)
    alone = [task.run_batch([row])[0] for row in rows]
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_generation_batch_invariance_is_measured_not_assumed(artifacts, backend):
    spec = get_spec(DIGIT_GENERATOR)
    artifact = artifacts[DIGIT_GENERATOR]
    config = artifact.config
    predictor = load_predictor(spec, artifact, placement(backend))
    task = DigitGeneration(predictor, config["latent_dim"], config["num_classes"])
    sizes = [1, 2, 3, 5, 8, 13, 64]
    invariant = task.rows_independent_of_batch(sizes)
    if backend == "onnx":
        # The CPU default: rows of different requests may share a call.
        assert invariant

    # Measured again here, directly on the predictor: every batch size, at both ends
    # of a 64-row batch, gives bitwise the rows of the whole batch, or it does not.
    latent, labels = latent_arrays(64, config["latent_dim"], seed=3)
    whole = predictor(latent, labels)
    same_bits = all(
        np.array_equal(
            predictor(latent[start : start + size], labels[start : start + size]),
            whole[start : start + size],
        )
        for size in sizes
        for start in (0, 64 - size)
    )
    assert invariant == same_bits


def test_a_missing_onnx_file_fails_with_a_clear_message(artifacts, tmp_path):
    spec = get_spec("mnist-cnn")
    copy = tmp_path / spec.name
    shutil.copytree(artifacts[spec.name].directory, copy)
    with staged_artifact(copy) as staging:
        (staging / ONNX_FILE).unlink()
    without_onnx = spec.load_artifact(copy)
    with pytest.raises(BackendError, match=r"has no model\.onnx"):
        load_predictor(spec, without_onnx, placement("onnx"))
    assert load_predictor(spec, without_onnx, placement("torch")) is not None


def test_impossible_placements_are_refused(artifacts):
    spec = get_spec("mnist-cnn")
    with pytest.raises(BackendError, match="CUDA"):
        load_predictor(spec, artifacts["mnist-cnn"], placement("torch", "fp16"))
    with pytest.raises(BackendError, match="fp32 or fp16"):
        load_predictor(spec, artifacts["mnist-cnn"], placement("torch", "int8"))
    with pytest.raises(BackendError, match="unknown backend"):
        load_predictor(spec, artifacts["mnist-cnn"], placement("tensorrt"))


def test_without_torch_the_torch_backend_is_refused_and_auto_means_onnx(artifacts, monkeypatch):
    from service.settings import ModelSettings, resolve_backend

    monkeypatch.setattr(backends, "torch_installed", lambda: False)
    with pytest.raises(BackendError, match="needs PyTorch"):
        check_placement(get_spec("mnist-cnn"), artifacts["mnist-cnn"], placement("torch"))
    check_placement(get_spec("mnist-cnn"), artifacts["mnist-cnn"], placement("onnx"))
    auto = ModelSettings(
        key="classify", registry_name="mnist-cnn", tag=None, backend="auto", precision="auto"
    )
    assert resolve_backend(auto, "cuda", torch_installed=False) == "onnx"
    assert resolve_backend(auto, "cuda", torch_installed=True) == "torch"


def test_the_device_is_chosen_from_the_gpus_the_driver_reports(monkeypatch):
    monkeypatch.setattr(backends, "visible_gpus", lambda: [])  # this machine's answer
    assert backends.resolve_device("auto") == CPU and backends.resolve_device("cpu") == CPU
    with pytest.raises(BackendError, match="0 usable GPU"):
        backends.resolve_device("cuda")
    monkeypatch.setattr(backends, "visible_gpus", lambda: ["NVIDIA H100 80GB HBM3"])
    assert backends.resolve_device("auto") == Device("cuda", 0)
    assert str(backends.resolve_device("cuda:0")) == "cuda:0"
    assert backends.device_name(Device("cuda", 0)) == "NVIDIA H100 80GB HBM3"
    with pytest.raises(BackendError, match="1 usable GPU"):
        backends.resolve_device("cuda:1")


@pytest.mark.parametrize(
    ("visible", "expected"),
    [(None, ["a", "b"]), ("", []), ("-1", []), ("1", ["b"]), ("1,0", ["b", "a"]), ("0,7,1", ["a"])],
)
def test_cuda_visible_devices_is_read_as_cuda_reads_it(visible, expected):
    assert backends.cuda_visible(["a", "b"], visible) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(REGISTRY))
def test_half_precision_on_the_gpu_keeps_parity(artifacts, name):
    spec = get_spec(name)
    cuda = Device("cuda", 0)
    reference = load_predictor(spec, artifacts[name], placement("torch", "fp32", cuda))
    half = load_predictor(spec, artifacts[name], placement("torch", "fp16", cuda))
    inputs = example_batch(spec, artifacts[name].config, 64)
    expected, actual = reference(*inputs), half(*inputs)
    if name == DIGIT_GENERATOR:
        assert np.abs(actual - expected).max() < 2 / 255 * 2  # pixels in [-1, 1]
    else:
        assert (actual.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.99


def test_the_service_serves_the_pinned_tags_of_the_released_artifacts(model_store):
    assert served.served_tags() == model_store  # what registration created
    for name, spec in REGISTRY.items():
        assert resolve_tag(spec) == model_store[name]
    assert resolve_tag(get_spec("mnist-cnn"), "mnist-cnn:custom") == "mnist-cnn:custom"
    assert resolve_tag(get_spec("mnist-cnn"), pins={}) == "mnist-cnn:latest"


def test_registration_pins_the_released_artifacts_only(release_artifacts, tmp_path, monkeypatch):
    from training import register

    pins = tmp_path / "served_models.json"
    monkeypatch.setattr(served, "SERVED_MODELS_FILE", pins)
    spec = get_spec("mnist-cnn")
    released = spec.bento_tag(spec.load_artifact(spec.artifact_dir(release_artifacts)).metadata)
    elsewhere = tmp_path / "artifacts"
    shutil.copytree(spec.artifact_dir(release_artifacts), elsewhere / "mnist-cnn")
    assert register.main(["--model", "mnist-cnn", "--artifacts-dir", str(elsewhere)]) == 0
    assert not pins.exists()
    assert register.main(["--model", "mnist-cnn", "--artifacts-dir", str(elsewhere), "--pin"]) == 0
    assert served.served_tags(pins) == {"mnist-cnn": released}
    pinned_bytes = pins.read_bytes()
    assert register.main(["--model", "mnist-cnn"]) == 0  # the released ones: pinned, unchanged
    assert pins.read_bytes() == pinned_bytes
    assert served.pin_served_tags(["sst2-bilstm:abc"], pins)
    assert served.served_tags(pins) == {
        "mnist-cnn": released,
        "sst2-bilstm": "sst2-bilstm:abc",
    }
    assert not served.pin_served_tags(["sst2-bilstm:abc"], pins)


@pytest.mark.parametrize("content", ['{"mnist-cnn": "mnist-cnn:1"', '{"mnist-cnn": "other:1"}'])
def test_an_unreadable_file_of_pins_stops_the_start_naming_it(tmp_path, monkeypatch, content):
    pins = tmp_path / "served_models.json"
    pins.write_text(content)
    monkeypatch.setattr(served, "SERVED_MODELS_FILE", pins)
    with pytest.raises(SystemExit, match=f"cannot start: {pins}"):
        model_store_module.served_model_tags({})


def test_the_service_refuses_to_start_without_the_configured_backend_file(
    release_artifacts, tmp_path
):
    root = tmp_path / "artifacts"
    for spec in REGISTRY.values():
        shutil.copytree(spec.artifact_dir(release_artifacts), root / spec.name)
    with staged_artifact(root / "sst2-bilstm") as staging:
        (staging / ONNX_FILE).unlink()
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "home"),
        "MODEL_ARTIFACTS_DIR": str(root),
        "SERVING_DEVICE": "cpu",
        "SERVING_BACKEND": "onnx",
        # The damaged copy has another version than the pinned release.
        "SERVING_SENTIMENT_TAG": "sst2-bilstm:latest",
    }
    subprocess.run(
        [sys.executable, "-m", "training.register"],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    # `bentoml serve` stops before starting any worker, naming the missing file.
    serve = [sys.executable, "-m", "bentoml", "serve", "service.service:ServingService",
             "--port", "0"]  # fmt: skip
    result = subprocess.run(
        serve, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "sst2-bilstm" in output and "has no model.onnx" in output
