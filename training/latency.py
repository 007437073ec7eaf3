"""Latency: median time of one model call on the machine that runs verification.

The figures are evidence about a device, never a release criterion (see
``training.variants``): each is stored with the device that produced it
(``device_description``), and a variant's speed is measured only on the
device it is built for. Inputs are the first examples of the test split (for
text: padded to the longest of them), at batch sizes 1 and 256.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from models.onnx_session import cuda_provider_available
from models.timing import median_ms
from training.evaluation import EvaluationSet, Feed, Runner

LATENCY_BATCH_SIZES = (1, 256)
LATENCY_REPEATS = {1: 300, 256: 30}
QUICK_LATENCY_REPEATS = {1: 5, 256: 2}
WARM_UP_RUNS = 3
DEVICES = ("cpu", "gpu")


def gpu_available() -> bool:
    return torch.cuda.is_available() and cuda_provider_available()


def available_devices() -> tuple[str, ...]:
    return DEVICES if gpu_available() else DEVICES[:1]


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def device_description(device: str, threads: int | None) -> str:
    """What a latency figure was measured on, stored next to it."""
    if device == "gpu":
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"{_cpu_model()}, {threads or torch.get_num_threads()} thread(s)"


def latency_feed(evalset: EvaluationSet, batch_size: int) -> Feed:
    """The first examples of the test split (for text: padded to the longest of them)."""
    return evalset.feed(np.arange(min(batch_size, evalset.size)))


def measure_latencies(
    runners: Mapping[str, Runner], evalset: EvaluationSet, device: str, *, quick: bool
) -> dict[str, dict[str, float]]:
    """{runner name: {batch size: median ms}} on one device, the runners taking turns."""
    repeats = QUICK_LATENCY_REPEATS if quick else LATENCY_REPEATS
    synchronize = torch.cuda.synchronize if device == "gpu" else None
    measured: dict[str, dict[str, float]] = {name: {} for name in runners}
    for size in LATENCY_BATCH_SIZES:
        feed = latency_feed(evalset, size)
        calls = {name: (lambda run=run, feed=feed: run(feed)) for name, run in runners.items()}
        medians = median_ms(calls, repeats[size], warm_up=WARM_UP_RUNS, synchronize=synchronize)
        for name, milliseconds in medians.items():
            measured[name][str(size)] = milliseconds
    return measured


def latency_conditions(evalset: EvaluationSet, *, quick: bool, threads: int | None) -> dict:
    """How the figures were taken: inputs, statistic and devices."""
    repeats = QUICK_LATENCY_REPEATS if quick else LATENCY_REPEATS
    return {
        "latency_inputs": {
            str(size): {
                name: list(array.shape) for name, array in latency_feed(evalset, size).items()
            }
            for size in LATENCY_BATCH_SIZES
        },
        "latency_statistic": (
            f"median over {' / '.join(f'{n} (batch {size})' for size, n in repeats.items())} "
            f"interleaved calls after {WARM_UP_RUNS} warm-up calls, ONNX Runtime default "
            "graph optimisations"
        ),
        "latency_devices": {
            device: device_description(device, threads) for device in available_devices()
        },
        "cpu_threads": threads or torch.get_num_threads(),
    }


def not_measured(device: str) -> str:
    return f"not measured (no {device.upper()} on the verifying machine)"
