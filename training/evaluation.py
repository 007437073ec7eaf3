"""Evaluation: the test splits as ONNX feeds, how labels are read, and test accuracy.

Each model's spec names its verification data (``spec.verification``); the
builders it names live here. A builder returns an ``EvaluationSet``: every
example of the test split as ONNX input feeds in batches, with the label a
correct model gives each. The same sets drive the artifact's own evaluation
(``evaluate_into``), ONNX parity (``training.parity``), variant accuracy
(``training.variants``) and latency inputs (``training.latency``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.artifacts import CONFIG_FILE, METADATA_FILE, VOCAB_FILE, read_json, update_metadata
from models.onnx_session import open_session
from models.preprocessing import (
    digits_from_generator_output,
    encode_text_arrays,
    latent_arrays,
    normalize_digits,
)
from models.registry import ModelSpec, get_spec
from models.tokenizer import Vocabulary
from training.data import mnist_test_set, read_sst2

log = logging.getLogger(__name__)

# The artifact's own test accuracy may differ from the one its training run
# recorded by a near-tie flipping on other hardware, never by more than this.
REPRODUCTION_TOLERANCE_PP = 0.1
GENERATOR_SEEDS = tuple(range(10))
GENERATOR_SAMPLES_PER_SEED = 100
# --quick: the first examples of each split only (still more than the largest
# parity batch size, so every batch size is exercised).
QUICK_EXAMPLES = 300
ACCURACY_BATCH_SIZE = 256

Feed = dict[str, np.ndarray]
Runner = Callable[[Feed], np.ndarray]
Labeller = Callable[[np.ndarray], np.ndarray]


class VerificationError(RuntimeError):
    """An artifact failed a check; the message says which model and which check."""


@dataclass
class EvaluationSet:
    """A test split as ONNX input feeds, with the label a correct model gives each example."""

    description: str
    targets: np.ndarray
    feed: Callable[[np.ndarray], Feed]
    # Sentiment only: the id sequence of every example, for the length sweep.
    sequences: list[list[int]] | None = None

    @property
    def size(self) -> int:
        return len(self.targets)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, Feed]]:
        for start in range(0, self.size, batch_size):
            indices = np.arange(start, min(start + batch_size, self.size))
            yield indices, self.feed(indices)


# --- the verification data named by the specs ---------------------------------------


def mnist_test_split(spec: ModelSpec, directory: Path, data_dir: Path, limit: int | None):
    dataset = mnist_test_set(data_dir)
    pixels = dataset.data[:limit].numpy().astype(np.float32) / 255
    images = normalize_digits(pixels)[:, None]
    targets = dataset.targets[:limit].numpy()
    (name,) = spec.onnx.inputs
    return EvaluationSet(
        f"MNIST test split ({len(targets)} images)",
        targets,
        lambda indices: {name: images[indices]},
    )


def sst2_test_split(spec: ModelSpec, directory: Path, data_dir: Path, limit: int | None):
    vocabulary = Vocabulary.load(directory / VOCAB_FILE)
    rows = read_sst2(data_dir, "test")[:limit]
    sequences = [vocabulary.encode(row.tokens) for row in rows]
    targets = np.array([row.label for row in rows], dtype=np.int64)
    ids_name, lengths_name = spec.onnx.inputs

    def feed(indices: np.ndarray) -> Feed:
        token_ids, lengths = encode_text_arrays([sequences[i] for i in indices])
        return {ids_name: token_ids, lengths_name: lengths}

    return EvaluationSet(f"SST-2 test split ({len(targets)} sentences)", targets, feed, sequences)


def generator_inputs(spec: ModelSpec, directory: Path, data_dir: Path, limit: int | None):
    """100 latent vectors per seed over 10 seeds, the digits 0–9 asked for in turn."""
    latent_dim = read_json(directory / CONFIG_FILE)["latent_dim"]
    seeds = GENERATOR_SEEDS
    if limit is not None:
        seeds = seeds[: math.ceil(limit / GENERATOR_SAMPLES_PER_SEED)]
    latents = [latent_arrays(GENERATOR_SAMPLES_PER_SEED, latent_dim, seed)[0] for seed in seeds]
    latent = np.concatenate(latents)[:limit]
    digits = np.arange(len(latent), dtype=np.int64) % 10
    latent_name, labels_name = spec.onnx.inputs
    return EvaluationSet(
        f"{len(latent)} generator inputs (seeds {seeds[0]}–{seeds[-1]}, every digit equally often)",
        digits,
        lambda indices: {latent_name: latent[indices], labels_name: digits[indices]},
    )


def evaluation_set(
    spec: ModelSpec, directory: Path, data_dir: Path, *, quick: bool = False
) -> EvaluationSet:
    limit = QUICK_EXAMPLES if quick else None
    return spec.evaluation_data(spec, Path(directory), Path(data_dir), limit)


# --- running and labelling ----------------------------------------------------------


def argmax_labels(outputs: np.ndarray) -> np.ndarray:
    return outputs.argmax(axis=1)


def digit_reader(classifier: torch.nn.Module) -> Labeller:
    """Generated images (in [-1, 1]) → the digit the classifier sees in each."""

    def read(images: np.ndarray) -> np.ndarray:
        pixels = digits_from_generator_output(torch.from_numpy(images).float())
        with torch.inference_mode():
            return classifier(normalize_digits(pixels)).argmax(dim=1).numpy()

    return read


def load_labeller(spec: ModelSpec, root: Path | None) -> Labeller | None:
    """How predicted labels are read from outputs; None if that needs a missing classifier."""
    reader = spec.verification.labels_read_by
    if reader is None:
        return argmax_labels
    classifier_spec = get_spec(reader)
    directory = classifier_spec.artifact_dir(root)
    if not (directory / METADATA_FILE).is_file():
        log.warning(
            "%s: no %s artifact in %s; generated digits cannot be labelled",
            spec.name,
            reader,
            directory.parent,
        )
        return None
    artifact = classifier_spec.load_artifact(directory)
    return digit_reader(classifier_spec.load_module(artifact, "cpu"))


def torch_runner(spec: ModelSpec, module: torch.nn.Module) -> Runner:
    device = next(module.parameters()).device

    def run(feed: Feed) -> np.ndarray:
        tensors = [torch.from_numpy(feed[name]).to(device) for name in spec.onnx.inputs]
        with torch.inference_mode():
            return module(*tensors).float().cpu().numpy()

    return run


def onnx_runner(path: Path, device: str = "cpu", threads: int | None = None) -> Runner:
    session = open_session(path, cuda=device == "gpu", threads=threads, errors_only=True)

    def run(feed: Feed) -> np.ndarray:
        return session.run(None, feed)[0]

    return run


def accuracy(run: Runner, evalset: EvaluationSet, labeller: Labeller | None) -> float | None:
    if labeller is None:
        return None
    correct = 0
    for indices, feed in evalset.batches(ACCURACY_BATCH_SIZE):
        correct += int((labeller(run(feed)) == evalset.targets[indices]).sum())
    return correct / evalset.size


# --- the artifact's own evaluation ----------------------------------------------------


def evaluate_into(
    spec: ModelSpec,
    directory: Path,
    data_dir: Path,
    *,
    quick: bool = False,
    root: Path | None = None,
) -> dict[str, Any]:
    """Measure the saved PyTorch model on the test split and record it as ``evaluation``.

    This is the artifact's own evaluation, from the files that will be released
    (checksums verified), not the training run's in-memory model. Where the
    training run recorded a full-split test accuracy, the two must agree within
    ``REPRODUCTION_TOLERANCE_PP``; otherwise the wrong weights were saved or the
    evaluation inputs differ from training's, and VerificationError is raised.
    For the generator, accuracy is the share of generated digits the classifier
    reads as the digit that was asked for. ``root`` is where the artifacts that
    read labels (``spec.verification.labels_read_by``) are found.
    """
    artifact = spec.load_artifact(directory)
    module = spec.load_module(artifact, "cpu")
    evalset = evaluation_set(spec, directory, data_dir, quick=quick)
    measured = accuracy(torch_runner(spec, module), evalset, load_labeller(spec, root))
    section: dict[str, Any] = {"data": evalset.description, "accuracy": measured}
    recorded = artifact.metadata.get("metrics", {}).get("test_accuracy")
    if recorded is not None and not quick and not artifact.metadata.get("smoke"):
        difference = 100 * abs(measured - recorded)
        section["recorded_by_training"] = recorded
        if difference > REPRODUCTION_TOLERANCE_PP:
            raise VerificationError(
                f"{spec.name}: the saved model scores {measured:.4f} on {evalset.description}, "
                f"but training recorded test accuracy {recorded:.4f}"
            )
    update_metadata(directory, evaluation=section)
    log.info("%s: PyTorch accuracy %.4f on %s", spec.name, measured, evalset.description)
    return section
