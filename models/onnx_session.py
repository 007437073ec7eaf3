"""One way to open an ONNX Runtime session, for verification, the service and benchmarks.

The settings every caller needs are here once: the execution provider (CUDA on
a given device, with the CPU provider behind it for the few operators CUDA
lacks), thread counts, no spinning of idle worker threads, and a check that the
requested provider really started, since ONNX Runtime falls back to the CPU
silently and a GPU figure must never be a CPU one. onnxruntime is imported on
first use, so importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


class ProviderUnavailable(RuntimeError):
    """ONNX Runtime could not start the requested execution provider."""


def cuda_provider_available() -> bool:
    import onnxruntime

    return CUDA_PROVIDER in onnxruntime.get_available_providers()


def open_session(
    model: Path | str | bytes,
    *,
    cuda: bool = False,
    device_id: int = 0,
    threads: int | None = None,
    inter_op_threads: int | None = None,
    errors_only: bool = False,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for a file (or serialized model).

    ``threads`` sets the intra-op pool (ONNX Runtime's default, one per core,
    when None). ``errors_only`` silences warnings, e.g. the upcast notices fp16
    graphs log on the CPU for every operator without an fp16 kernel.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if errors_only:
        options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    # Sessions share cores (several models per worker; models timed in turn): an idle
    # pool that spins would take CPU from the session that has work.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[Any] = [CPU_PROVIDER]
    if cuda:
        if hasattr(onnxruntime, "preload_dlls"):
            # Finds the CUDA and cuDNN libraries installed from pip wheels.
            onnxruntime.preload_dlls()
        providers.insert(0, (CUDA_PROVIDER, {"device_id": device_id}))
    source = model if isinstance(model, bytes) else str(model)
    session = onnxruntime.InferenceSession(source, options, providers=providers)
    active = session.get_providers()
    if cuda and active[0] != CUDA_PROVIDER:
        raise ProviderUnavailable(
            f"ONNX Runtime could not start its CUDA execution provider for {model!s:.200} "
            f"(active: {active}); check the CUDA/cuDNN libraries"
        )
    return session
