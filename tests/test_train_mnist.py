"""The MNIST classifier training script (training/mnist.py) and its released artifact.

The smoke run trains on a few batches of real MNIST into a temporary artifact
root; the last tests check the committed ``models/artifacts/mnist-cnn``.
"""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from models.artifacts import ArtifactError, load_artifact
from models.preprocessing import digit_pixels_from_image, digit_tensor_from_image
from models.registry import MNIST_CLASSIFIER, get_spec
from training import mnist
from training.common import default_data_dir, save_trained_model
from training.data import mnist_test_set, mnist_transform

SPEC = get_spec(MNIST_CLASSIFIER)
DATA_DIR = default_data_dir()

pytestmark = pytest.mark.skipif(
    not (DATA_DIR / "MNIST" / "raw").is_dir(), reason=f"MNIST not found under {DATA_DIR}"
)


@pytest.fixture(scope="module")
def smoke_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    assert mnist.main(["--smoke", "--output-dir", str(root), "--threads", "1"]) == 0
    return SPEC.artifact_dir(root)


def test_smoke_run_writes_a_complete_verified_artifact(smoke_artifact):
    artifact = SPEC.load_artifact(smoke_artifact)  # verifies every checksum
    metadata = artifact.metadata
    assert metadata["smoke"] is True
    assert metadata["name"] == MNIST_CLASSIFIER
    assert metadata["labels"] == [str(d) for d in range(10)]
    assert set(metadata["files"]) == {"weights.pt", "config.json", "report.png"}
    assert (smoke_artifact / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = metadata["metrics"]
    # Chance is 0.10; the smoke run's few batches reach about 0.23-0.30 (a run that
    # learns nothing, or scores against the wrong labels, stays near chance).
    for key in ("test_accuracy", "validation_accuracy", "test_accuracy_service_preprocessing"):
        assert 0.15 <= metrics[key] <= 1.0
    assert metrics["test_images"] == mnist.SMOKE_EVAL_IMAGES
    assert np.asarray(metrics["test_confusion_matrix"]).sum() == mnist.SMOKE_EVAL_IMAGES
    assert "--smoke" in metadata["training"]["command"]
    assert metadata["training"]["epochs"] == 1
    assert metadata["preprocessing"]["mean"] == pytest.approx(0.1307)
    assert metadata["dataset"]["train_images"] + metadata["dataset"]["validation_images"] == 60_000


def test_artifact_module_shapes(smoke_artifact):
    model = SPEC.load_module(SPEC.load_artifact(smoke_artifact))
    images = torch.randn(5, 1, 28, 28)
    assert model(images).shape == (5, 10)
    assert model.penultimate(images).shape == (5, model.config.hidden_units)


def test_save_load_round_trip_gives_identical_outputs(smoke_artifact, tmp_path):
    first = SPEC.load_module(SPEC.load_artifact(smoke_artifact))
    copy_dir = save_trained_model(
        SPEC, tmp_path, module=first, config=first.config, metadata={"smoke": True}
    )
    second = SPEC.load_module(SPEC.load_artifact(copy_dir))
    images = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(first(images), second(images))


def test_changed_weights_are_refused(smoke_artifact, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(smoke_artifact, broken)
    weights = broken / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(broken)


def test_service_preprocessing_transform_follows_its_fraction():
    image = mnist_test_set(DATA_DIR)[0][0]
    assert mnist.ServicePreprocessing(0.0)(image) is image
    random.seed(0)
    converted = mnist.ServicePreprocessing(1.0)(image)
    assert converted.mode == "L" and converted.size == (28, 28)
    expected = digit_pixels_from_image(image)
    assert np.abs(np.asarray(converted) / 255 - expected).max() <= 0.5 / 255 + 1e-6


def test_canvas_stroke_transform_follows_its_fraction():
    image = mnist_test_set(DATA_DIR)[0][0]
    assert mnist.CanvasStrokes(0.0)(image) is image
    random.seed(0)
    drawn = [mnist.CanvasStrokes(1.0)(image) for _ in range(4)]
    assert all(d.mode == "L" and d.size == (28, 28) for d in drawn)
    # A redrawing, not a copy, and a different pen each time.
    assert all(not np.array_equal(np.asarray(d), np.asarray(image)) for d in drawn)
    assert len({np.asarray(d).tobytes() for d in drawn}) == 4


# --- the committed artifact -------------------------------------------------------------


@pytest.fixture(scope="module")
def released():
    artifact = SPEC.load_artifact()
    return artifact, SPEC.load_module(artifact)


def test_released_artifact_is_a_full_run_that_met_the_bar(released):
    artifact, _ = released
    metrics = artifact.metadata["metrics"]
    assert artifact.metadata["smoke"] is False
    assert metrics["test_images"] == 10_000
    assert metrics["test_accuracy"] >= 0.993
    assert artifact.has("report.png")


def test_released_classifier_is_right_on_real_test_digits(released):
    _, model = released
    test = mnist_test_set(DATA_DIR)
    indices = torch.randperm(len(test), generator=torch.Generator().manual_seed(7))[:500].tolist()
    to_tensor = mnist_transform(False)
    images = [test[i][0] for i in indices]
    labels = torch.tensor([test[i][1] for i in indices])
    with torch.no_grad():
        plain = model(torch.stack([to_tensor(image) for image in images])).argmax(1)
        served = model(torch.stack([digit_tensor_from_image(image) for image in images])).argmax(1)
    assert (plain == labels).float().mean() >= 0.99
    assert (served == labels).float().mean() >= 0.98


def test_released_classifier_reads_an_inverted_rgb_upload(released):
    """A black-on-white RGB picture, the usual drawing, goes through the service path."""
    _, model = released
    test = mnist_test_set(DATA_DIR)
    hits = 0
    for index in range(20):
        image, label = test[index]
        upload = Image.fromarray(255 - np.asarray(image)).convert("RGB").resize((140, 140))
        with torch.no_grad():
            hits += int(model(digit_tensor_from_image(upload).unsqueeze(0)).argmax(1) == label)
    assert hits >= 19
