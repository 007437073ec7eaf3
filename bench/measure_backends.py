"""Measure every inference backend and precision per model on this machine.

    python -m bench.measure_backends                      # auto device, all models
    python -m bench.measure_backends --device cuda --batch-sizes 1 64 256
    python -m bench.measure_backends --json backends.json

For each model it loads the artifact (``models/artifacts`` or
``--artifacts-dir``), builds every predictor the device supports (PyTorch fp32,
fp16 on CUDA; ONNX Runtime fp32 and the fp16/int8 variants where exported),
checks its outputs against PyTorch fp32 on the same batch and reports the
median latency of one model call per batch size. Each model's ``ModelSpec.serving``
records which backend won; rerun this on new hardware before changing it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from models.artifacts import ONNX_FILES
from models.registry import REGISTRY, ModelSpec, artifacts_root
from models.timing import median_ms
from service.backends import BackendError, Device, Placement, load_predictor, resolve_device

# Rows of a typical SST-2 sentence's length, for the sentiment model.
SENTENCE_TOKENS = 20


def example_batch(spec: ModelSpec, config: dict, size: int) -> tuple[np.ndarray, ...]:
    """A realistic input batch of ``size`` rows for one model (the spec's example)."""
    return spec.example_inputs(config, size, seed=0, sequence_length=SENTENCE_TOKENS)


def candidates(device: Device, artifact_files: dict) -> list[tuple[str, str]]:
    found = [("torch", "fp32")]
    if device.type == "cuda":
        found.append(("torch", "fp16"))
    for precision, filename in ONNX_FILES.items():
        if filename in artifact_files and (precision != "fp16" or device.type == "cuda"):
            found.append(("onnx", precision))
    return found


def time_call(predictor, inputs: tuple[np.ndarray, ...], repeat: int) -> float:
    return median_ms({"call": lambda: predictor(*inputs)}, repeat)["call"]


def measure(
    root: Path, device: Device, batch_sizes: list[int], repeat: int, threads: int
) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for spec in REGISTRY.values():
        artifact = spec.load_artifact(spec.artifact_dir(root))
        reference = load_predictor(spec, artifact, Placement("torch", device, "fp32", threads))
        for backend, precision in candidates(device, artifact.metadata.get("files", {})):
            try:
                predictor = load_predictor(
                    spec, artifact, Placement(backend, device, precision, threads)
                )
            except BackendError as error:
                rows.append({"model": spec.name, "backend": backend, "precision": precision,
                             "error": str(error)})  # fmt: skip
                continue
            for size in batch_sizes:
                inputs = example_batch(spec, artifact.config, size)
                difference = float(np.abs(predictor(*inputs) - reference(*inputs)).max())
                rows.append(
                    {
                        "model": spec.name,
                        "backend": backend,
                        "precision": precision,
                        "batch_size": size,
                        "ms_per_call": round(time_call(predictor, inputs, repeat), 3),
                        "max_abs_diff_vs_torch_fp32": difference,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--artifacts-dir",
        type=Path,
        default=None,
        help=f"root of the artifact directories (default: {artifacts_root()})",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeat", type=int, default=30, help="timed calls per point")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)  # fmt: skip

    device = resolve_device(args.device)
    rows = measure(args.artifacts_dir or artifacts_root(), device, args.batch_sizes,
                   args.repeat, args.threads)  # fmt: skip
    print(f"device: {device}; {args.threads} thread(s); median ms per model call")
    for row in rows:
        if "error" in row:
            print(f"{row['model']:12} {row['backend']:5} {row['precision']:4}  {row['error']}")
        else:
            print(
                f"{row['model']:12} {row['backend']:5} {row['precision']:4} "
                f"batch {row['batch_size']:4}: {row['ms_per_call']:8.3f} ms  "
                f"max|Δ| vs torch fp32 {row['max_abs_diff_vs_torch_fp32']:.2e}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
