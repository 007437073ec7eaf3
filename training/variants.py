"""The variant policy: which INT8 / fp16 ONNX graphs an artifact releases, and why.

A candidate (``spec.variants``, built by ``training.export``) is kept when both
recorded criteria hold:

* accuracy: at most ``MAX_ACCURACY_DROP_PP`` percentage points below fp32, both
  run by ONNX Runtime on the CPU over the model's whole test split (its
  verification data; a ``--quick`` run uses the first examples and says so);
* size: at least ``MIN_SIZE_REDUCTION`` smaller than the fp32 file.

Speed is not a criterion. It is measured only on the device a variant is built
for (INT8: the CPU; fp16: a CUDA GPU) when the verifying machine has one, and
stored with that device's name, as evidence for choosing the served precision
(``SERVING_<ENDPOINT>_PRECISION``). A decision taken from the timing of whichever
machine runs verification would make the release depend on that machine; these
two criteria give the same files on any machine. Where a GPU is present, the
fp16 accuracy on it is recorded as well.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.artifacts import ONNX_FILE
from models.registry import ModelSpec
from training.evaluation import (
    EvaluationSet,
    Labeller,
    Runner,
    accuracy,
    onnx_runner,
    torch_runner,
)
from training.latency import (
    available_devices,
    latency_conditions,
    measure_latencies,
    not_measured,
)

if TYPE_CHECKING:
    from training.export import OnnxVariant

log = logging.getLogger(__name__)

MAX_ACCURACY_DROP_PP = 0.2
MIN_SIZE_REDUCTION = 0.10
POLICY = {
    "accuracy": f"at most {MAX_ACCURACY_DROP_PP} pp below fp32, both measured by ONNX Runtime "
    "on the CPU on the accuracy_measured_on examples",
    "size": f"at least {MIN_SIZE_REDUCTION:.0%} smaller than the fp32 file",
    "speed": "not a criterion: measured only on the variant's target device when the "
    "verifying machine has one, and recorded with that device",
}


def keep_decision(candidate: dict[str, Any], fp32: dict[str, Any]) -> tuple[bool, str]:
    """Apply the policy to a measured candidate; return (kept, reason).

    Records the accuracy drop and the size ratio in ``candidate``.
    """
    if candidate["accuracy"] is None or fp32["accuracy"] is None:
        return False, "accuracy not measurable"
    drop = round(100 * (fp32["accuracy"] - candidate["accuracy"]), 4)
    size_ratio = candidate["bytes"] / fp32["bytes"]
    candidate.update(accuracy_drop_pp=drop, size_ratio=round(size_ratio, 3))
    reason = f"accuracy drop {drop:.2f} pp, {100 * (1 - size_ratio):.0f}% smaller than fp32"
    if drop > MAX_ACCURACY_DROP_PP:
        return False, f"{reason}: accuracy drop above {MAX_ACCURACY_DROP_PP} pp"
    if size_ratio > 1 - MIN_SIZE_REDUCTION:
        return False, f"{reason}: not {MIN_SIZE_REDUCTION:.0%} smaller"
    return True, reason


def _speedups(ours: Any, baseline: Any) -> dict[str, float] | str:
    if not (isinstance(ours, dict) and isinstance(baseline, dict)):
        return ours if isinstance(ours, str) else "not measured"
    return {size: round(baseline[size] / ours[size], 3) for size in ours}


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
    """Measure PyTorch, fp32 ONNX and every candidate, and decide each candidate.

    Returns the ``variants`` section; the caller removes the rejected files.
    """
    devices = available_devices()
    files = {"fp32": directory / ONNX_FILE}
    files |= {variant.precision: directory / variant.filename for variant in candidates}
    targets = {variant.precision: variant.target_device for variant in candidates}
    cpu = {precision: onnx_runner(path, "cpu", threads) for precision, path in files.items()}

    section: dict[str, Any] = {
        "policy": POLICY,
        "accuracy_measured_on": evalset.description,
        "pytorch": {"accuracy": accuracy(torch_runner(spec, module), evalset, labeller)},
    }
    for precision, path in files.items():
        section[precision] = {
            "file": path.name,
            "bytes": path.stat().st_size,
            "accuracy": accuracy(cpu[precision], evalset, labeller),
            "accuracy_device": "cpu",
        }

    # Latency: fp32 (and PyTorch on the CPU) on every device present, a variant on
    # its target device only.
    timed: dict[str, dict[str, Runner]] = {
        "cpu": {"pytorch": torch_runner(spec, module), "fp32": cpu["fp32"]}
        | {p: cpu[p] for p, target in targets.items() if target == "cpu"}
    }
    if "gpu" in devices:
        timed["gpu"] = {
            precision: onnx_runner(files[precision], "gpu", threads)
            for precision in ["fp32", *(p for p, target in targets.items() if target == "gpu")]
        }
        for precision, target in targets.items():
            if target == "gpu":
                section[precision]["accuracy_on_gpu"] = accuracy(
                    timed["gpu"][precision], evalset, labeller
                )
    latency = {
        device: measure_latencies(runners, evalset, device, quick=quick)
        for device, runners in timed.items()
    }
    for name in ("pytorch", "fp32"):
        section[name]["latency_ms"] = {
            device: latency[device][name]
            if name in latency.get(device, {})
            else not_measured(device)
            for device in (("cpu",) if name == "pytorch" else ("cpu", "gpu"))
        }

    for variant in candidates:
        measured = section[variant.precision]
        target = variant.target_device
        ours = latency.get(target, {}).get(variant.precision, not_measured(target))
        measured.update(
            target_device=target,
            method=variant.description,
            latency_ms={target: ours},
            speedup_on_target=_speedups(ours, section["fp32"]["latency_ms"][target]),
        )
        measured["kept"], measured["reason"] = keep_decision(measured, section["fp32"])
        log.info(
            "%s %s: %s — %s",
            spec.name,
            variant.precision,
            "kept" if measured["kept"] else "dropped",
            measured["reason"],
        )
    section |= latency_conditions(evalset, quick=quick, threads=threads)
    return section


def kept_files(section: dict[str, Any]) -> dict[str, str]:
    """{precision: file} of fp32 and the kept variants, for metadata's ``onnx.files``."""
    return {
        precision: result["file"]
        for precision, result in section.items()
        if isinstance(result, dict) and "file" in result and result.get("kept", True)
    }
