"""Parity: ONNX Runtime against PyTorch on every example of the test split.

ONNX Runtime (CPU execution provider) runs ``model.onnx`` on the model's
verification data (``spec.verification``: 10,000 MNIST images; the 1,821 SST-2
test sentences; 1,000 generator inputs, 100 per seed over 10 seeds, every digit
equally often) at batch sizes 1, 7 and 256, and PyTorch runs the same batches.
It passes when the largest absolute difference of logits (or pixels) is at most
``PARITY_ATOL`` and the predicted labels agree on every example; for the
generator the label is the digit the MNIST classifier reads in the generated
image. For a model with a sequence axis a length sweep also runs every length
from 1 to the longest test sentence, padded to that maximum in ONNX Runtime and
unpadded in PyTorch, which shows that padding changes nothing. A failure raises
``ParityError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from models.preprocessing import encode_text_arrays
from models.registry import ModelSpec
from models.tokenizer import PAD_ID
from training.evaluation import (
    EvaluationSet,
    Labeller,
    Runner,
    VerificationError,
    onnx_runner,
    torch_runner,
)

PARITY_ATOL = 1e-4
PARITY_BATCH_SIZES = (1, 7, 256)
# Sentences per length in the length sweep (all lengths 1..max are run).
SWEEP_SENTENCES_PER_LENGTH = 8
QUICK_SWEEP_SENTENCES_PER_LENGTH = 1


class ParityError(VerificationError):
    """The ONNX graph does not reproduce the PyTorch model within tolerance."""


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
        summary["label_agreement"] = "not measured (no classifier artifact to read the digits)"
    else:
        summary["label_agreement"] = 1 - mismatches / examples
        summary["label_mismatches"] = mismatches
    return summary


def parity_at_batch_size(
    evalset: EvaluationSet,
    reference: Runner,
    candidate: Runner,
    batch_size: int,
    labeller: Labeller | None,
) -> dict[str, Any]:
    expected, actual = [], []
    for _, feed in evalset.batches(batch_size):
        expected.append(reference(feed))
        actual.append(candidate(feed))
    return _summary(evalset.size, *compare(expected, actual, labeller))


def length_sweep(
    spec: ModelSpec,
    evalset: EvaluationSet,
    reference: Runner,
    candidate: Runner,
    labeller: Labeller | None,
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
        token_ids, lengths = encode_text_arrays(chosen[:per_length])
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
    candidate = onnx_runner(onnx_path, "cpu", threads)
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
