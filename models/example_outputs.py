"""What a model answers for its spec's example input: recorded in the artifact when it
is verified, and checked by the service before it serves a version.

``training.verify`` runs the PyTorch module (the reference the ONNX graphs are
verified against) on ``spec.example_inputs(config)`` and records its first output
in ``metadata.json`` under ``example``. Before the service swaps a new version in,
it runs the same input through the backend it loaded and compares
(``check_example``): a graph that does not compute what its weights compute, a
file swapped for another model's, or a backend that loads but answers nonsense
is refused before any request reaches it. The record is in ``metadata.json``,
outside the checksummed files, so adding it does not change the store version.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from models.artifacts import Artifact
from models.registry import ModelSpec

EXAMPLE_SECTION = "example"

# Largest |difference| from the recorded fp32 PyTorch output that still passes, per
# precision the service runs. fp32 covers the backends' differing kernels (the parity
# check holds ONNX Runtime to 1e-4 on every test example); the reduced precisions are
# checked for being the same model, not for being exact.
TOLERANCE = {"fp32": 1e-3, "fp16": 0.05, "int8": 0.5}
# At most this many output values are recorded (every n-th of the flattened output),
# so that an image model's record stays a few lines of metadata.json.
RECORDED_VALUES = 256


class ExampleMismatch(ValueError):
    """The loaded model does not reproduce its recorded example output."""


def example_record(spec: ModelSpec, config: Any, run: Callable[..., np.ndarray]) -> dict:
    """The ``example`` section: the input's parameters and ``run(*inputs)``'s output."""
    output = np.asarray(run(*spec.example_inputs(config)), dtype=np.float32)
    stride = -(-output.size // RECORDED_VALUES)
    return {
        "input": "spec.example_inputs(config): batch 3, seed 0, sequence length 5",
        "shape": list(output.shape),
        "stride": stride,
        "values": output.reshape(-1)[::stride].round(6).tolist(),
    }


def check_example(
    spec: ModelSpec, artifact: Artifact, predict: Callable[..., np.ndarray], precision: str
) -> float:
    """Run the example input through ``predict`` and compare with the record; returns the
    largest difference, or raises ``ExampleMismatch`` saying what is wrong."""
    record: Mapping[str, Any] | None = artifact.metadata.get(EXAMPLE_SECTION)
    if not record:
        raise ExampleMismatch(
            "the artifact records no example output (verify it with python -m training.verify)"
        )
    actual = np.asarray(predict(*spec.example_inputs(artifact.config)), dtype=np.float32)
    if list(actual.shape) != record["shape"]:
        raise ExampleMismatch(
            f"the example output has shape {list(actual.shape)}, the record {record['shape']}"
        )
    if not np.isfinite(actual).all():
        raise ExampleMismatch("the example output is not finite")
    expected = np.asarray(record["values"], dtype=np.float32)
    difference = float(np.max(np.abs(actual.reshape(-1)[:: record["stride"]] - expected)))
    tolerance = TOLERANCE[precision]
    if difference > tolerance:
        raise ExampleMismatch(
            f"the example output differs from the record by {difference:.3g} "
            f"(at most {tolerance:g} passes at {precision})"
        )
    return difference
