"""Choosing a compute device by name, for training and serving alike, without torch.

``auto`` is the first GPU when there is one, else the CPU; ``cpu``, ``cuda`` and
``cuda:N`` name one, and a GPU must exist when one is named. Where the number
of GPUs comes from is the caller's: training asks torch, the service asks the
NVIDIA driver (so that its processes need not import torch).
"""

from __future__ import annotations

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """The requested device is not a device name, or is not on this machine."""


def valid_device_name(requested: str) -> str:
    """The name, normalised; a ``DeviceError`` if it names no device."""
    name = requested.strip().lower()
    kind, colon, index = name.partition(":")
    if name in ("auto", "cpu", "cuda") or (kind == "cuda" and colon and index.isdigit()):
        return name
    raise DeviceError(f"device {requested!r}: expected {DEVICE_NAMES}")


def choose_device(requested: str, gpu_count: int) -> str:
    """The device to use (``cpu`` or ``cuda:N``) on a machine with ``gpu_count`` GPUs."""
    name = valid_device_name(requested)
    if name == "auto":
        return "cuda:0" if gpu_count else "cpu"
    if name == "cpu":
        return name
    index = int(name.partition(":")[2] or 0)
    if index >= gpu_count:
        raise DeviceError(
            f"device {requested!r} was requested but this machine has {gpu_count} usable GPU(s)"
        )
    return f"cuda:{index}"
