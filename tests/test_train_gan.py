"""The conditional GAN training script (training/gan.py), its metrics
(training/gan_metrics.py) and the released ``digit-gan`` artifact.

The smoke run scores its generator with a smoke-trained classifier, so the
whole chain runs in a temporary artifact root without the committed models.
"""

from __future__ import annotations

import pytest
import torch

from models.artifacts import write_json
from models.gan import Generator, GeneratorConfig
from models.preprocessing import digits_from_generator_output, latent_batch, normalize_digits
from models.registry import DIGIT_GENERATOR, MNIST_CLASSIFIER, get_spec
from training import gan, gan_metrics, mnist
from training.common import default_data_dir, save_trained_model

SPEC = get_spec(DIGIT_GENERATOR)
CLASSIFIER_SPEC = get_spec(MNIST_CLASSIFIER)
DATA_DIR = default_data_dir()
MAX_GENERATOR_BYTES = 4 * 1024 * 1024

needs_mnist = pytest.mark.skipif(
    not (DATA_DIR / "MNIST" / "raw").is_dir(), reason=f"MNIST not found under {DATA_DIR}"
)


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    assert mnist.main(["--smoke", "--output-dir", str(root), "--threads", "1"]) == 0
    classifier_dir = CLASSIFIER_SPEC.artifact_dir(root)
    assert (
        gan.main(
            [
                "--smoke",
                "--output-dir",
                str(root),
                "--classifier-dir",
                str(classifier_dir),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    return root


@needs_mnist
def test_smoke_run_writes_a_complete_verified_artifact(smoke_root):
    directory = SPEC.artifact_dir(smoke_root)
    artifact = SPEC.load_artifact(directory)
    metadata = artifact.metadata
    assert metadata["smoke"] is True
    assert set(metadata["files"]) == {"weights.pt", "config.json", "report.png"}
    assert (directory / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = metadata["metrics"]
    # The smoke classifier and generator are near chance (about 0.10), so the recorded
    # figure is checked against the saved generator and classifier themselves.
    generator = SPEC.load_module(artifact)
    classifier = CLASSIFIER_SPEC.load_module(
        CLASSIFIER_SPEC.load_artifact(CLASSIFIER_SPEC.artifact_dir(smoke_root))
    )
    recomputed, _ = gan_metrics.conditional_accuracy(
        generator, classifier, metrics["samples_per_digit"], torch.device("cpu")
    )
    assert metrics["conditional_accuracy"] == pytest.approx(recomputed["overall"], abs=1e-6)
    assert set(metrics["conditional_accuracy_per_digit"]) == {str(d) for d in range(10)}
    assert metrics["samples_per_digit"] == gan.SMOKE_SAMPLES_PER_DIGIT
    # Real train vs real test is the floor; an untrained generator is far above it.
    assert (
        0
        <= metrics["frechet_distance_train_vs_test"]
        < metrics["frechet_distance_generated_vs_test"]
    )
    assert len(metadata["history"]["generator_loss"]) == metadata["training"]["epochs"] == 1
    assert "--smoke" in metadata["training"]["command"]
    assert (directory / "weights.pt").stat().st_size <= MAX_GENERATOR_BYTES


@needs_mnist
def test_evaluate_only_refreshes_metrics_of_the_saved_generator(smoke_root):
    directory = SPEC.artifact_dir(smoke_root)
    before = SPEC.load_artifact(directory).metadata
    stale = {
        **before,
        "metrics": {"conditional_accuracy": -1.0},
        "evaluation_classifier": {"name": "mnist-cnn", "weights_sha256": "an older classifier"},
    }
    write_json(directory / "metadata.json", stale)  # metadata.json is not checksummed itself
    classifier_dir = CLASSIFIER_SPEC.artifact_dir(smoke_root)
    assert (
        gan.main(
            [
                "--evaluate-only",
                "--output-dir",
                str(smoke_root),
                "--classifier-dir",
                str(classifier_dir),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    after = SPEC.load_artifact(directory).metadata
    assert after["files"]["weights.pt"] == before["files"]["weights.pt"]
    assert after["metrics"]["conditional_accuracy"] == before["metrics"]["conditional_accuracy"]
    assert after["metrics"]["frechet_distance_generated_vs_test"] == pytest.approx(
        before["metrics"]["frechet_distance_generated_vs_test"]
    )
    assert "report.png" in after["files"]
    # The refreshed figures name the classifier that measured them.
    assert after["evaluation_classifier"] == before["evaluation_classifier"]


@needs_mnist
def test_generator_shapes_and_range(smoke_root):
    generator = SPEC.load_module(SPEC.load_artifact(SPEC.artifact_dir(smoke_root)))
    latent, labels = latent_batch(6, generator.config.latent_dim, seed=3)
    with torch.no_grad():
        images = generator(latent, labels)
    assert images.shape == (6, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1


@needs_mnist
def test_save_load_round_trip_gives_identical_samples(smoke_root, tmp_path):
    first = SPEC.load_module(SPEC.load_artifact(SPEC.artifact_dir(smoke_root)))
    copy_dir = save_trained_model(
        SPEC, tmp_path, module=first, config=first.config, metadata={"smoke": True}
    )
    second = SPEC.load_module(SPEC.load_artifact(copy_dir))
    latent, labels = latent_batch(8, first.config.latent_dim, seed=5)
    with torch.no_grad():
        assert torch.equal(first(latent, labels), second(latent, labels))


# --- metrics ------------------------------------------------------------------------------


def test_frechet_distance_matches_closed_forms():
    features = torch.randn(2000, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    assert gan_metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)
    # Same covariance, moved mean: only the mean term remains.
    assert gan_metrics.frechet_distance(features, features + shift) == pytest.approx(
        float(shift.square().sum()), rel=1e-9
    )
    # Scaling by 2: Σb = 4Σa, so the trace term is tr(Σa + 4Σa − 4Σa) = tr(Σa).
    centred = features - features.mean(0)
    expected = float(torch.trace(torch.cov(centred.T)))
    assert gan_metrics.frechet_distance(centred, 2 * centred) == pytest.approx(expected, rel=1e-9)


def test_recalibrated_batch_norm_holds_the_exact_batch_statistics():
    generator = Generator(GeneratorConfig())
    seen = []
    hook = generator.project[0].register_forward_hook(lambda _m, _i, output: seen.append(output))
    gan_metrics.recalibrate_batch_norm(
        generator, torch.device("cpu"), batches=2, batch_size=64, seed=11
    )
    hook.remove()
    norm = generator.project[1]
    expected_mean = torch.cat(seen).mean(0)
    assert not generator.training
    assert norm.momentum == 0.1  # restored after the cumulative average
    # Cumulative averaging of two equal-sized batch means is their overall mean.
    assert torch.allclose(norm.running_mean, expected_mean, atol=1e-5)


# --- the committed artifact -------------------------------------------------------------


@pytest.fixture(scope="module")
def released():
    artifact = SPEC.load_artifact()
    return artifact, SPEC.load_module(artifact)


def test_released_generator_is_small_and_from_a_full_run(released):
    artifact, _ = released
    assert artifact.metadata["smoke"] is False
    assert artifact.path("weights.pt").stat().st_size <= MAX_GENERATOR_BYTES
    metrics = artifact.metadata["metrics"]
    assert metrics["samples_per_digit"] == 1000
    assert metrics["frechet_distance_train_vs_test"] < metrics["frechet_distance_generated_vs_test"]
    assert artifact.has("report.png")


def test_released_generator_draws_the_digit_it_is_asked_for(released):
    _, generator = released
    classifier = CLASSIFIER_SPEC.load_module(CLASSIFIER_SPEC.load_artifact())
    hits = 0
    for digit in range(10):
        latent, labels = latent_batch(
            30, generator.config.latent_dim, seed=100 + digit, digit=digit
        )
        with torch.no_grad():
            pixels = digits_from_generator_output(generator(latent, labels))
            predicted = classifier(normalize_digits(pixels)).argmax(1)
        hits += int((predicted == digit).sum())
    assert hits / 300 >= 0.9
