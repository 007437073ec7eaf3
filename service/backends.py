"""Inference backends: one loaded model behind one small interface, free of BentoML.

A ``Predictor`` takes a batch as NumPy arrays (in the order of the registry's
ONNX input names) and returns the model's first output as a float32 array.
Two implementations:

* ``TorchPredictor``: the registry module rebuilt from the artifact's
  state_dict, on the CPU or a GPU, in inference mode, optionally in half
  precision (GPU only).
* ``OnnxPredictor``: the artifact's ONNX graph (``model.onnx``, or the
  ``model.fp16.onnx`` / ``model.int8.onnx`` variant where exported) in ONNX
  Runtime with the CUDA or the CPU execution provider.

``load_predictor`` builds either from a verified artifact directory and fails
with a clear message when the requested backend cannot run (no ONNX file, no
CUDA provider, half precision on the CPU, no PyTorch installed): there is no
silent fallback.

torch is imported only when a PyTorch model is loaded. Choosing a device asks
the NVIDIA driver (NVML) instead, so the ``bentoml serve`` parent process, which
runs no model, and the ONNX-only CPU image never import it.
"""

from __future__ import annotations

import abc
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from models.artifacts import ONNX_FILES, Artifact
from models.devices import DeviceError, choose_device
from models.onnx_session import ProviderUnavailable, open_session
from models.registry import ModelSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The configured backend cannot run this model here."""


def torch_installed() -> bool:
    """Whether PyTorch can be imported here, without importing it."""
    return importlib.util.find_spec("torch") is not None


@dataclass(frozen=True)
class Device:
    """A device as torch names it (``cpu``, ``cuda:0``), without importing torch."""

    type: str  # cpu | cuda
    index: int | None = None

    @classmethod
    def parse(cls, name: str) -> Device:
        kind, _, index = name.partition(":")
        return cls(kind, int(index) if index else None)

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs."""

    backend: str  # torch | onnx
    device: Device
    precision: str  # fp32 | fp16 | int8 (int8: ONNX only)
    threads: int


class Predictor(abc.ABC):
    """A batch of NumPy inputs → the model's first output as float32 NumPy."""

    def __init__(self, spec: ModelSpec, placement: Placement) -> None:
        self.spec = spec
        self.placement = placement

    @abc.abstractmethod
    def __call__(self, *inputs: np.ndarray) -> np.ndarray: ...

    def describe(self) -> str:
        p = self.placement
        return f"{p.backend} on {p.device} ({p.precision}, {p.threads} thread(s))"


class TorchPredictor(Predictor):
    def __init__(self, spec: ModelSpec, artifact: Artifact, placement: Placement) -> None:
        super().__init__(spec, placement)
        check_placement(spec, artifact, placement)
        import torch

        if placement.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(
                f"{spec.name}: the NVIDIA driver reports a GPU but PyTorch cannot use CUDA "
                f"(torch {torch.__version__}); install a CUDA build of torch or use "
                "SERVING_DEVICE=cpu"
            )
        self._torch = torch  # bound once: the module is imported here, not at the top
        self._device = torch.device(str(placement.device))
        module = spec.load_module(artifact, self._device)
        self._float_dtype = torch.float16 if placement.precision == "fp16" else torch.float32
        self.module = module.to(self._float_dtype)
        self._non_blocking = placement.device.type == "cuda"

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            tensors = [self._to_device(array) for array in inputs]
            output = self.module(*tensors)
            return output.float().cpu().numpy()

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = self._torch.from_numpy(array)
        if tensor.is_floating_point():
            tensor = tensor.to(self._float_dtype)
        return tensor.to(self._device, non_blocking=self._non_blocking)


class OnnxPredictor(Predictor):
    def __init__(self, spec: ModelSpec, artifact: Artifact, placement: Placement) -> None:
        super().__init__(spec, placement)
        check_placement(spec, artifact, placement)
        filename = ONNX_FILES[placement.precision]
        try:
            self.session = open_session(
                artifact.path(filename),
                cuda=placement.device.type == "cuda",
                device_id=placement.device.index or 0,
                threads=placement.threads,
                inter_op_threads=1,
            )
        except ProviderUnavailable as error:
            raise BackendError(f"{spec.name}: {error}, or use SERVING_DEVICE=cpu") from None
        names = tuple(node.name for node in self.session.get_inputs())
        if names != spec.onnx.inputs:
            raise BackendError(
                f"{spec.name}: {filename} has inputs {names}, the registry expects "
                f"{spec.onnx.inputs}; re-export the model"
            )
        self._input_names = names

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        feeds = dict(zip(self._input_names, inputs, strict=True))
        return self.session.run(None, feeds)[0]


def visible_gpus() -> list[str]:
    """The names of the NVIDIA GPUs this process may use, in CUDA's order.

    Asked of the driver through NVML (``nvidia-ml-py``, a BentoML dependency), which
    needs neither torch nor a CUDA runtime; ``CUDA_VISIBLE_DEVICES`` is honoured as
    CUDA would (an empty value or ``-1`` hides every GPU).
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: no usable GPU
        return []
    try:
        names = [
            pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
            for index in range(pynvml.nvmlDeviceGetCount())
        ]
    except Exception:
        return []
    finally:
        pynvml.nvmlShutdown()
    return cuda_visible(names, os.environ.get("CUDA_VISIBLE_DEVICES"))


def cuda_visible(names: list[str], visible: str | None) -> list[str]:
    """The GPUs that ``CUDA_VISIBLE_DEVICES`` leaves visible, in the order it lists them."""
    if visible is None:
        return names
    chosen = []
    for entry in visible.split(","):
        entry = entry.strip()
        if not entry.isdigit() or int(entry) >= len(names):
            break  # CUDA ignores the list from the first entry it cannot use
        chosen.append(names[int(entry)])
    return chosen


def resolve_device(requested: str) -> Device:
    """``auto`` → the first GPU the driver reports, else the CPU; a named GPU must exist."""
    gpus = visible_gpus() if requested.strip().lower() != "cpu" else []
    try:
        return Device.parse(choose_device(requested, len(gpus)))
    except DeviceError as error:
        raise BackendError(str(error)) from None


def device_name(device: Device) -> str:
    """A human name for the start-up log: the GPU's model, or ``CPU``."""
    if device.type != "cuda":
        return "CPU"
    gpus = visible_gpus()
    index = device.index or 0
    return gpus[index] if index < len(gpus) else str(device)


def use_torch_threads(threads: int) -> None:
    """Set PyTorch's intra-op threads (one setting per process) before its models load."""
    import torch

    torch.set_num_threads(threads)


def check_placement(spec: ModelSpec, artifact: Artifact, placement: Placement) -> None:
    """Raise ``BackendError`` if this model cannot run so; cheap, builds nothing."""
    if placement.backend == "torch":
        if not torch_installed():
            raise BackendError(
                f"{spec.name}: the torch backend needs PyTorch, which is not installed here; "
                "serve through ONNX Runtime (SERVING_BACKEND=onnx)"
            )
        if placement.precision not in ("fp32", "fp16"):
            raise BackendError(f"{spec.name}: the torch backend runs fp32 or fp16")
        if placement.precision == "fp16" and placement.device.type != "cuda":
            raise BackendError(f"{spec.name}: half precision needs a CUDA device")
    elif placement.backend == "onnx":
        filename = ONNX_FILES.get(placement.precision)
        if filename is None:
            raise BackendError(f"{spec.name}: no ONNX variant for {placement.precision!r}")
        if not artifact.has(filename):
            raise BackendError(
                f"{spec.name}: the artifact in {artifact.directory} has no {filename} "
                f"(the {placement.precision} ONNX graph); export it first "
                "(python -m training.export) or choose another backend or precision"
            )
    else:
        raise BackendError(f"unknown backend {placement.backend!r}; expected torch or onnx")


def load_predictor(spec: ModelSpec, artifact: Artifact, placement: Placement) -> Predictor:
    if placement.backend == "torch":
        return TorchPredictor(spec, artifact, placement)
    if placement.backend == "onnx":
        return OnnxPredictor(spec, artifact, placement)
    check_placement(spec, artifact, placement)  # raises for an unknown backend
    raise AssertionError("unreachable")
