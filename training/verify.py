"""Verify exported graphs against PyTorch, evaluate the models and measure the variants.

    python -m training.verify                          # every artifact; results go into metadata
    python -m training.verify --model sst2-bilstm --quick

Parity. ONNX Runtime (CPU execution provider) runs ``model.onnx`` on every
example of the test split (10,000 MNIST images; the 1,821 SST-2 test sentences;
1,000 generator inputs, 100 per seed over 10 seeds, every digit equally often)
at batch sizes 1, 7 and 256, and PyTorch runs the same batches. It passes when
the largest absolute difference of logits (or pixels) is at most ``PARITY_ATOL``
and the predicted labels agree on every example; for the generator the label
is the digit the MNIST classifier reads in the generated image. For the
sentiment model a length sweep also runs every length from 1 to the longest
test sentence, padded to that maximum in ONNX Runtime and unpadded in PyTorch,
which shows that padding changes nothing. A failure raises ``ParityError``.

Variants. Each candidate (``training.export.VARIANT_CANDIDATES``) is measured
next to fp32 and PyTorch: test accuracy, file size, and median latency at batch
1 and 256 on the CPU, and on the GPU when CUDA is available (the models take
turns call by call, so load changes hit them alike). A candidate is kept only
if it loses at most ``MAX_ACCURACY_DROP_PP`` percentage points, is measurably
smaller (``MIN_SIZE_REDUCTION``) or faster (``MIN_SPEEDUP``), and is not
measurably slower on the device it is for; the others are deleted from the
artifact.

Evaluation. The saved PyTorch model's own test accuracy, recorded as
``evaluation`` and checked against the figure its training run recorded.

Everything measured is written into metadata.json (``evaluation``, ``parity``,
``variants`` and ``onnx.files``) in one atomic update of the artifact; a failed
check raises ``VerificationError`` and leaves the artifact as it was.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from models.artifacts import (
    CONFIG_FILE,
    ONNX_FILE,
    VOCAB_FILE,
    read_json,
    refresh_checksums,
    staged_artifact,
    update_metadata,
)
from models.preprocessing import (
    digits_from_generator_output,
    encode_texts,
    latent_batch,
    normalize_digits,
)
from models.registry import (
    DIGIT_GENERATOR,
    MNIST_CLASSIFIER,
    REGISTRY,
    SENTIMENT_CLASSIFIER,
    ModelSpec,
    get_spec,
)
from models.tokenizer import PAD_ID, Vocabulary
from training.common import add_model_selection_arguments, default_data_dir
from training.data import mnist_test_set, read_sst2
from training.export import VARIANT_CANDIDATES, OnnxVariant, configure_logging

log = logging.getLogger(__name__)

PARITY_ATOL = 1e-4
# The artifact's own test accuracy may differ from the one its training run
# recorded by a near-tie flipping on other hardware, never by more than this.
REPRODUCTION_TOLERANCE_PP = 0.1
PARITY_BATCH_SIZES = (1, 7, 256)
LATENCY_BATCH_SIZES = (1, 256)
MAX_ACCURACY_DROP_PP = 0.2
# "Measurably": a variant must be at least 10 % smaller, or at least 1.1× faster
# (median latency) at one of the latency batch sizes on its target device.
MIN_SIZE_REDUCTION = 0.10
MIN_SPEEDUP = 1.10
GENERATOR_SEEDS = tuple(range(10))
GENERATOR_SAMPLES_PER_SEED = 100
# Sentences per length in the sentiment length sweep (all lengths 1..max are run).
SWEEP_SENTENCES_PER_LENGTH = 8
# --quick: the first examples of each split only (still more than the largest
# batch size, so every batch size is exercised), and short latency runs.
QUICK_EXAMPLES = 300
QUICK_SWEEP_SENTENCES_PER_LENGTH = 1
LATENCY_REPEATS = {1: 300, 256: 30}
WARM_UP_RUNS = 3
QUICK_LATENCY_REPEATS = {1: 5, 256: 2}
GPU_NOT_MEASURED = "not measured (no CUDA device)"

Feed = dict[str, np.ndarray]


class VerificationError(RuntimeError):
    """An artifact failed a check; the message says which model and which check."""


class ParityError(VerificationError):
    """The ONNX graph does not reproduce the PyTorch model within tolerance."""


def cuda_available() -> bool:
    return torch.cuda.is_available() and (
        "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    )


# --- evaluation sets ----------------------------------------------------------------


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

    def batches(self, batch_size: int):
        for start in range(0, self.size, batch_size):
            indices = np.arange(start, min(start + batch_size, self.size))
            yield indices, self.feed(indices)


def _mnist_set(spec: ModelSpec, directory: Path, data_dir: Path, limit: int | None):
    dataset = mnist_test_set(data_dir)
    pixels = dataset.data[:limit].float() / 255
    images = normalize_digits(pixels).unsqueeze(1).numpy()
    targets = dataset.targets[:limit].numpy()
    (name,) = spec.onnx.inputs
    return EvaluationSet(
        f"MNIST test split ({len(targets)} images)",
        targets,
        lambda indices: {name: images[indices]},
    )


def _sst2_set(spec: ModelSpec, directory: Path, data_dir: Path, limit: int | None):
    vocabulary = Vocabulary.load(directory / VOCAB_FILE)
    rows = read_sst2(data_dir, "test")[:limit]
    sequences = [vocabulary.encode(row.tokens) for row in rows]
    targets = np.array([row.label for row in rows], dtype=np.int64)
    ids_name, lengths_name = spec.onnx.inputs

    def feed(indices: np.ndarray) -> Feed:
        token_ids, lengths = encode_texts([sequences[i] for i in indices])
        return {ids_name: token_ids.numpy(), lengths_name: lengths.numpy()}

    return EvaluationSet(f"SST-2 test split ({len(targets)} sentences)", targets, feed, sequences)


def _generator_set(spec: ModelSpec, directory: Path, data_dir: Path, limit: int | None):
    latent_dim = read_json(directory / CONFIG_FILE)["latent_dim"]
    seeds = GENERATOR_SEEDS
    if limit is not None:
        seeds = seeds[: math.ceil(limit / GENERATOR_SAMPLES_PER_SEED)]
    latents = [latent_batch(GENERATOR_SAMPLES_PER_SEED, latent_dim, seed)[0] for seed in seeds]
    latent = torch.cat(latents).numpy()[:limit]
    digits = np.arange(len(latent), dtype=np.int64) % 10
    latent_name, labels_name = spec.onnx.inputs
    return EvaluationSet(
        f"{len(latent)} generator inputs (seeds {seeds[0]}–{seeds[-1]}, every digit equally often)",
        digits,
        lambda indices: {latent_name: latent[indices], labels_name: digits[indices]},
    )


EVALUATION_SETS = {
    MNIST_CLASSIFIER: _mnist_set,
    SENTIMENT_CLASSIFIER: _sst2_set,
    DIGIT_GENERATOR: _generator_set,
}


def evaluation_set(
    spec: ModelSpec, directory: Path, data_dir: Path, limit: int | None = None
) -> EvaluationSet:
    return EVALUATION_SETS[spec.name](spec, Path(directory), Path(data_dir), limit)


# --- running and labelling ----------------------------------------------------------


Labeller = Callable[[np.ndarray], np.ndarray]


def argmax_labels(outputs: np.ndarray) -> np.ndarray:
    return outputs.argmax(axis=1)


def digit_reader(classifier: torch.nn.Module) -> Labeller:
    """Generated images (in [-1, 1]) → the digit the classifier sees in each."""

    def read(images: np.ndarray) -> np.ndarray:
        pixels = digits_from_generator_output(torch.from_numpy(images).float())
        with torch.inference_mode():
            return classifier(normalize_digits(pixels)).argmax(dim=1).numpy()

    return read


def torch_runner(spec: ModelSpec, module: torch.nn.Module) -> Callable[[Feed], np.ndarray]:
    device = next(module.parameters()).device

    def run(feed: Feed) -> np.ndarray:
        tensors = [torch.from_numpy(feed[name]).to(device) for name in spec.onnx.inputs]
        with torch.inference_mode():
            return module(*tensors).float().cpu().numpy()

    return run


def onnx_session(path: Path, device: str = "cpu", threads: int | None = None):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: fp16 graphs on the CPU log every upcast
    if threads:
        options.intra_op_num_threads = threads
    # Idle worker threads would otherwise spin for a while after each call and take
    # the CPU from whichever model is timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provider = "CUDAExecutionProvider" if device == "gpu" else "CPUExecutionProvider"
    session = onnxruntime.InferenceSession(str(path), options, providers=[provider])
    if provider not in session.get_providers():
        # ONNX Runtime falls back to the CPU silently; a GPU figure must not be a CPU one.
        raise RuntimeError(f"{path}: ONNX Runtime could not start the {provider}")
    return session


def onnx_runner(session) -> Callable[[Feed], np.ndarray]:
    def run(feed: Feed) -> np.ndarray:
        return session.run(None, feed)[0]

    return run


# --- parity -------------------------------------------------------------------------


def compare(
    expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], labeller: Labeller | None
) -> tuple[float, int | None]:
    """(max absolute difference, number of examples whose predicted label differs) over
    batches of outputs; the labels are read once, from all batches together."""
    expected, actual = np.concatenate(expected), np.concatenate(actual)
    difference = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    if labeller is None:
        return difference, None
    return difference, int((labeller(actual) != labeller(expected)).sum())


def _summary(examples: int, difference: float, mismatches: int | None) -> dict[str, Any]:
    summary: dict[str, Any] = {"examples": examples, "max_abs_diff": difference}
    if mismatches is None:
        summary["label_agreement"] = "not measured (no mnist-cnn artifact to read the digits)"
    else:
        summary["label_agreement"] = 1 - mismatches / examples
        summary["label_mismatches"] = mismatches
    return summary


def parity_at_batch_size(
    evalset: EvaluationSet, reference, candidate, batch_size: int, labeller: Labeller | None
) -> dict[str, Any]:
    expected, actual = [], []
    for _, feed in evalset.batches(batch_size):
        expected.append(reference(feed))
        actual.append(candidate(feed))
    return _summary(evalset.size, *compare(expected, actual, labeller))


def length_sweep(
    spec: ModelSpec,
    evalset: EvaluationSet,
    reference,
    candidate,
    labeller: Labeller,
    per_length: int,
) -> dict[str, Any]:
    """Every length 1..max: truncated test sentences, padded to the maximum for the candidate.

    PyTorch sees each batch unpadded (its length is the batch's length), ONNX Runtime
    sees it padded to the longest test sentence, so the comparison covers parity and
    padding invariance together.
    """
    ids_name, lengths_name = spec.onnx.inputs
    sequences = [sequence for sequence in evalset.sequences or [] if sequence]
    longest = max(map(len, sequences))
    expected, actual = [], []
    for length in range(1, longest + 1):
        chosen = [sequence[:length] for sequence in sequences if len(sequence) >= length]
        token_ids, lengths = (tensor.numpy() for tensor in encode_texts(chosen[:per_length]))
        expected.append(reference({ids_name: token_ids, lengths_name: lengths}))
        padded = np.pad(token_ids, ((0, 0), (0, longest - length)), constant_values=PAD_ID)
        actual.append(candidate({ids_name: padded, lengths_name: lengths}))
    count = sum(map(len, expected))
    return {
        "lengths": [1, longest],
        "padded_to": longest,
        **_summary(count, *compare(expected, actual, labeller)),
    }


def check_parity(name: str, parity: dict[str, Any]) -> None:
    """Raise ParityError naming every batch size (or the length sweep) that failed."""
    checks = {f"batch size {size}": result for size, result in parity["batch_sizes"].items()}
    if "length_sweep" in parity:
        checks["length sweep"] = parity["length_sweep"]
    failures = []
    for where, result in checks.items():
        if not result["max_abs_diff"] <= PARITY_ATOL:
            failures.append(
                f"{where}: max |difference| {result['max_abs_diff']:.3g} > {PARITY_ATOL:g}"
            )
        agreement = result["label_agreement"]
        if isinstance(agreement, float) and agreement < 1.0:
            failures.append(
                f"{where}: {result['label_mismatches']} of {result['examples']} "
                "predicted labels differ"
            )
    if failures:
        raise ParityError(f"{name}: ONNX Runtime does not match PyTorch — " + "; ".join(failures))


def measure_parity(
    spec: ModelSpec,
    module: torch.nn.Module,
    onnx_path: Path,
    evalset: EvaluationSet,
    labeller: Labeller | None,
    *,
    quick: bool,
    threads: int | None = None,
) -> dict[str, Any]:
    reference = torch_runner(spec, module)
    candidate = onnx_runner(onnx_session(onnx_path, "cpu", threads))
    parity: dict[str, Any] = {
        "reference": f"PyTorch {torch.__version__}, CPU, eval mode, same batches",
        "runtime": f"ONNX Runtime {onnxruntime.__version__}, CPUExecutionProvider",
        "data": evalset.description,
        "tolerance": PARITY_ATOL,
        "quick": quick,
        "batch_sizes": {
            str(size): parity_at_batch_size(evalset, reference, candidate, size, labeller)
            for size in PARITY_BATCH_SIZES
        },
    }
    if evalset.sequences is not None:
        per_length = QUICK_SWEEP_SENTENCES_PER_LENGTH if quick else SWEEP_SENTENCES_PER_LENGTH
        parity["length_sweep"] = length_sweep(
            spec, evalset, reference, candidate, labeller, per_length
        )
    return parity


# --- accuracy, latency, variants ----------------------------------------------------


Runner = Callable[[Feed], np.ndarray]


def accuracy(
    run: Runner, evalset: EvaluationSet, labeller: Labeller | None, batch_size: int = 256
) -> float | None:
    if labeller is None:
        return None
    correct = 0
    for indices, feed in evalset.batches(batch_size):
        correct += int((labeller(run(feed)) == evalset.targets[indices]).sum())
    return correct / evalset.size


def latency_feed(evalset: EvaluationSet, batch_size: int) -> Feed:
    """The first examples of the test split (for text: padded to the longest of them)."""
    return evalset.feed(np.arange(min(batch_size, evalset.size)))


def median_latencies_ms(
    runners: dict[str, Runner], feed: Feed, repeats: int, synchronize: Callable[[], None]
) -> dict[str, float]:
    """Median wall time of one call per runner, the runners taking turns call by call,
    so a change in machine load affects all of them alike."""
    for run in runners.values():
        for _ in range(WARM_UP_RUNS):
            run(feed)
    timings: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            synchronize()
            start = time.perf_counter()
            run(feed)
            synchronize()
            timings[name].append((time.perf_counter() - start) * 1000)
    return {name: round(statistics.median(values), 4) for name, values in timings.items()}


def keep_decision(
    candidate: dict[str, Any], fp32: dict[str, Any], target_device: str
) -> tuple[bool, str]:
    """Apply the keep rule to a measured candidate; return (kept, reason).

    Kept: accuracy drop within ``MAX_ACCURACY_DROP_PP``, measurably smaller or
    faster, and not measurably slower on its target device at any latency batch
    size (a variant exists to be served there; a smaller file that serves slower
    is no improvement). Records the accuracy drop, size ratio and speed-up in
    ``candidate``.
    """
    if candidate["accuracy"] is None or fp32["accuracy"] is None:
        return False, "accuracy not measurable"
    drop = round(100 * (fp32["accuracy"] - candidate["accuracy"]), 4)
    size_ratio = candidate["bytes"] / fp32["bytes"]
    ours, baseline = candidate["latency_ms"][target_device], fp32["latency_ms"][target_device]
    speedups = (
        {size: round(baseline[size] / ours[size], 3) for size in ours}
        if isinstance(ours, dict) and isinstance(baseline, dict)
        else {}
    )
    candidate.update(accuracy_drop_pp=drop, size_ratio=round(size_ratio, 3), speedup=speedups)
    speed = (
        ", ".join(
            f"{speedup:.2f}× fp32 speed at batch {size}" for size, speedup in speedups.items()
        )
        if speedups
        else "speed not measured"
    )
    reason = (
        f"accuracy drop {drop:.2f} pp, {100 * (1 - size_ratio):.0f}% smaller, "
        f"{speed} on the {target_device}"
    )
    if drop > MAX_ACCURACY_DROP_PP:
        return False, f"{reason}: accuracy drop above {MAX_ACCURACY_DROP_PP} pp"
    if any(speedup * MIN_SPEEDUP <= 1 for speedup in speedups.values()):
        return False, f"{reason}: measurably slower than fp32"
    smaller = size_ratio <= 1 - MIN_SIZE_REDUCTION
    faster = any(speedup >= MIN_SPEEDUP for speedup in speedups.values())
    if not (smaller or faster):
        return False, f"{reason}: neither measurably smaller nor faster"
    return True, reason


def measure_variants(
    spec: ModelSpec,
    module: torch.nn.Module,
    directory: Path,
    evalset: EvaluationSet,
    labeller: Labeller | None,
    candidates: Sequence[OnnxVariant],
    *,
    quick: bool,
    threads: int | None,
) -> dict[str, Any]:
    """Measure PyTorch, fp32 ONNX and every candidate; delete the rejected candidates' files.

    Accuracy is measured on a candidate's target device when there is one, else
    on the CPU (where ONNX Runtime runs fp16 operations that have no CPU fp16
    kernel in fp32, on the fp16-rounded weights).
    """
    gpu = cuda_available()
    files = {"fp32": directory / ONNX_FILE}
    files |= {variant.precision: directory / variant.filename for variant in candidates}
    # fp32 runs everywhere; the INT8 kernels (DynamicQuantizeLSTM, MatMulInteger) are CPU-only.
    runs_on = {
        "cpu": set(files),
        "gpu": {"fp32"}
        | {variant.precision for variant in candidates if variant.target_device == "gpu"},
    }
    devices = ("cpu", "gpu") if gpu else ("cpu",)
    runners: dict[str, dict[str, Runner]] = {
        device: {
            precision: onnx_runner(onnx_session(path, device, threads))
            for precision, path in files.items()
            if precision in runs_on[device]
        }
        for device in devices
    }
    runners["cpu"]["pytorch"] = torch_runner(spec, module)

    section: dict[str, Any] = {"pytorch": {"latency_ms": {}}}
    section["pytorch"]["accuracy"] = accuracy(runners["cpu"]["pytorch"], evalset, labeller)
    targets = {variant.precision: variant.target_device for variant in candidates}
    for precision, path in files.items():
        accuracy_device = "gpu" if gpu and targets.get(precision) == "gpu" else "cpu"
        section[precision] = {
            "file": path.name,
            "bytes": path.stat().st_size,
            "accuracy": accuracy(runners[accuracy_device][precision], evalset, labeller),
            "accuracy_device": accuracy_device,
            "latency_ms": {"cpu": {}, "gpu": {} if gpu else GPU_NOT_MEASURED},
        }
        if gpu and precision not in runners["gpu"]:
            section[precision]["latency_ms"]["gpu"] = "not applicable (CPU-only kernels)"

    repeats = QUICK_LATENCY_REPEATS if quick else LATENCY_REPEATS
    for device in devices:
        synchronize = torch.cuda.synchronize if device == "gpu" else (lambda: None)
        for size in LATENCY_BATCH_SIZES:
            medians = median_latencies_ms(
                runners[device], latency_feed(evalset, size), repeats[size], synchronize
            )
            for name, milliseconds in medians.items():
                section[name]["latency_ms"].setdefault(device, {})[str(size)] = milliseconds

    for variant in candidates:
        measured = section[variant.precision]
        measured["target_device"] = variant.target_device
        measured["method"] = variant.description
        measured["kept"], measured["reason"] = keep_decision(
            measured, section["fp32"], variant.target_device
        )
        if not measured["kept"]:
            files[variant.precision].unlink()
        log.info(
            "%s %s: %s — %s",
            spec.name,
            variant.precision,
            "kept" if measured["kept"] else "dropped",
            measured["reason"],
        )
    section["accuracy_measured_on"] = evalset.description
    section["latency_inputs"] = {
        str(size): {name: list(array.shape) for name, array in latency_feed(evalset, size).items()}
        for size in LATENCY_BATCH_SIZES
    }
    section["latency_statistic"] = (
        f"median over {' / '.join(f'{n} (batch {size})' for size, n in repeats.items())} "
        f"interleaved calls after {WARM_UP_RUNS} warm-up calls, ONNX Runtime default "
        "graph optimisations"
    )
    section["cpu_threads"] = threads or torch.get_num_threads()
    return section


# --- artifact level -----------------------------------------------------------------


def load_labeller(spec: ModelSpec, classifier_dir: Path | None) -> Labeller | None:
    """How predicted labels are read from outputs; None if that needs a missing classifier."""
    if spec.name != DIGIT_GENERATOR:
        return argmax_labels
    classifier_spec = get_spec(MNIST_CLASSIFIER)
    directory = classifier_dir or classifier_spec.artifact_dir()
    if not (directory / "metadata.json").is_file():
        log.warning(
            "%s: no %s artifact in %s; generated digits cannot be labelled",
            spec.name,
            MNIST_CLASSIFIER,
            directory.parent,
        )
        return None
    artifact = classifier_spec.load_artifact(directory)
    return digit_reader(classifier_spec.load_module(artifact, "cpu"))


def evaluate_into(
    spec: ModelSpec,
    directory: Path,
    data_dir: Path,
    *,
    quick: bool = False,
    classifier_dir: Path | None = None,
) -> dict[str, Any]:
    """Measure the saved PyTorch model on the test split and record it as ``evaluation``.

    This is the artifact's own evaluation, from the files that will be released
    (checksums verified), not the training run's in-memory model. Where the
    training run recorded a full-split test accuracy, the two must agree within
    ``REPRODUCTION_TOLERANCE_PP``; otherwise the wrong weights were saved or the
    evaluation inputs differ from training's, and VerificationError is raised.
    For the generator, accuracy is the share of generated digits the classifier
    reads as the digit that was asked for.
    """
    artifact = spec.load_artifact(directory)
    module = spec.load_module(artifact, "cpu")
    evalset = evaluation_set(spec, directory, data_dir, QUICK_EXAMPLES if quick else None)
    measured = accuracy(torch_runner(spec, module), evalset, load_labeller(spec, classifier_dir))
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


def verify_into(
    spec: ModelSpec,
    directory: Path,
    data_dir: Path,
    *,
    quick: bool = False,
    classifier_dir: Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Verify the exported artifact in (staging) ``directory`` and record the results.

    Raises ParityError, before anything is written, when the fp32 graph fails.
    """
    artifact = spec.load_artifact(directory)
    if not artifact.has(ONNX_FILE):
        raise VerificationError(f"{directory}: no {ONNX_FILE}; export the model first")
    module = spec.load_module(artifact, "cpu")
    evalset = evaluation_set(spec, directory, data_dir, QUICK_EXAMPLES if quick else None)
    labeller = load_labeller(spec, classifier_dir)
    parity = measure_parity(
        spec, module, directory / ONNX_FILE, evalset, labeller, quick=quick, threads=threads
    )
    check_parity(spec.name, parity)
    parity["passed"] = True
    log.info(
        "%s: parity holds (%s)",
        spec.name,
        ", ".join(
            f"batch {size}: max |Δ| {result['max_abs_diff']:.2e}"
            for size, result in parity["batch_sizes"].items()
        ),
    )
    candidates = [
        variant
        for variant in VARIANT_CANDIDATES[spec.name]
        if (directory / variant.filename).is_file()
    ]
    variants = measure_variants(
        spec, module, directory, evalset, labeller, candidates, quick=quick, threads=threads
    )
    onnx_section = dict(artifact.metadata.get("onnx", {}))
    onnx_section["files"] = {
        precision: result["file"]
        for precision, result in variants.items()
        if isinstance(result, dict) and "file" in result and result.get("kept", True)
    }
    onnx_section["verified"] = True
    update_metadata(directory, onnx=onnx_section, parity=parity, variants=variants)
    refresh_checksums(directory)  # rejected variants were deleted
    return parity


def verify_artifact(
    spec: ModelSpec,
    root: Path | None,
    data_dir: Path,
    *,
    quick: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Evaluate and verify one exported artifact in place; a failure leaves it untouched."""
    classifier_dir = get_spec(MNIST_CLASSIFIER).artifact_dir(root)
    with staged_artifact(spec.artifact_dir(root)) as staging:
        evaluate_into(spec, staging, data_dir, quick=quick, classifier_dir=classifier_dir)
        return verify_into(
            spec, staging, data_dir, quick=quick, classifier_dir=classifier_dir, threads=threads
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_selection_arguments(parser, "verify")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"first {QUICK_EXAMPLES} examples only, short latency runs",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch and ONNX Runtime (default: all cores)",
    )
    args = parser.parse_args(argv)
    configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        for name in args.model or list(REGISTRY):
            verify_artifact(
                get_spec(name),
                args.artifacts_dir,
                args.data_dir,
                quick=args.quick,
                threads=args.threads,
            )
    except VerificationError as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
