"""Pieces every training script shares: the run options (``RunConfig``), device
choice, seeding, data paths, run provenance, and writing a trained model as a
verified artifact."""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import os
import platform
import random
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch

from models.artifacts import staged_artifact, write_model_files
from models.devices import DEVICE_NAMES, DeviceError, choose_device, valid_device_name
from models.registry import REGISTRY, ModelSpec, artifacts_root
from training import distributed
from training.config import config_record
from training.log import configure_logging
from training.sources import default_data_dir, require_data


def device_argument(value: str) -> str:
    """argparse type of ``--device``: any name ``models.devices`` accepts (cuda:N too)."""
    try:
        return valid_device_name(value)
    except DeviceError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@dataclass(frozen=True)
class RunConfig:
    """The options every training script shares; each script's ``TrainConfig``
    extends it with its own fields (``training.config`` makes them its command line).

    A script sets ``DEFAULT_EPOCHS``, and ``DATA`` and ``SMOKE`` for its help."""

    DEFAULT_EPOCHS: ClassVar[int] = 1
    DATA: ClassVar[str] = "the data sets (training.sources)"
    SMOKE: ClassVar[str] = "a run of seconds on a subset"

    data_dir: Path = field(
        default_factory=default_data_dir, metadata={"help": "directory holding {DATA}"}
    )
    output_dir: Path | None = field(
        default=None,
        metadata={
            "help": "artifact root; the model goes to <root>/<model name> "
            "(default: models.registry.artifacts_root())",
            "plumbing": True,
        },
    )
    device: str = field(
        default="auto",
        metadata={"help": DEVICE_NAMES, "parse": device_argument, "plumbing": True},
    )
    seed: int = field(
        default=0, metadata={"help": "seed of every generator (torchrun's process r: seed + r)"}
    )
    epochs: int | None = field(
        default=None,
        metadata={
            "help": "passes over the training data (default: {DEFAULT_EPOCHS}; 1 with --smoke)"
        },
    )
    batch_size: int = field(
        default=64, metadata={"help": "examples per optimiser step, over all processes"}
    )
    threads: int | None = field(
        default=None, metadata={"help": "torch.set_num_threads", "plumbing": True}
    )
    smoke: bool = field(default=False, metadata={"help": "{SMOKE}; marks the artifact smoke"})
    checkpoint_dir: Path | None = field(
        default=None,
        metadata={
            "help": "write a checkpoint there after every epoch (default: none)",
            "plumbing": True,
        },
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue from the checkpoint in --checkpoint-dir if there is one",
            "plumbing": True,
        },
    )
    dist_backend: str = field(
        default="auto",
        metadata={
            "help": "torch.distributed backend under torchrun (auto: nccl on CUDA, else gloo)",
            "choices": distributed.BACKENDS,
            "plumbing": True,
        },
    )

    def resolved(self) -> Self:
        """The config with the defaults that depend on ``--smoke`` settled (``epochs``;
        a script adds its own): what ``run`` trains with and records."""
        if self.epochs is not None:
            return self
        return dataclasses.replace(self, epochs=1 if self.smoke else self.DEFAULT_EPOCHS)

    def settings(self) -> dict[str, Any]:
        """What shapes the trained weights: every field but the plumbing. A checkpoint
        resumes only under the same settings (``training.distributed.load_checkpoint``)."""
        plumbing = {item.name for item in dataclasses.fields(self) if item.metadata.get("plumbing")}
        return {name: value for name, value in config_record(self).items() if name not in plumbing}


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` → the first GPU torch can use, else the CPU (``models.devices``)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return torch.device(choose_device(requested, gpus))


def seed_everything(seed: int) -> None:
    """Seed every generator; under torchrun process ``r`` uses ``seed + r``, so the
    ranks draw different dropout and noise (rank 0, and a plain run, use ``seed``)."""
    seed += distributed.seed_offset(distributed.current())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# The command line ``main`` parsed, while its ``run`` runs; unset when ``run`` is
# called with a config object (the pipeline), and the process's own command is recorded.
_COMMAND_LINE: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "command_line", default=None
)


@contextlib.contextmanager
def invoked_with(argv: Sequence[str] | None) -> Iterator[None]:
    """Record ``argv`` (``None``: the process's own) as the command of the run inside."""
    token = _COMMAND_LINE.set(None if argv is None else list(argv))
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def run_provenance(device: torch.device) -> dict[str, Any]:
    """What reproduces this run: the exact command (with its launcher), how many
    processes trained and how they talked, the device and framework versions.

    The command is the script's own when its ``main`` parsed it, else the
    process's: ``python -m training.pipeline ...`` for a pipeline run."""
    module = sys.modules["__main__"].__spec__
    program = ["-m", module.name] if module else [sys.argv[0]]
    argv = _COMMAND_LINE.get()
    args = sys.argv[1:] if argv is None else argv
    context = distributed.current()
    if distributed.launched_by_torchrun():
        launcher = "torchrun"
        nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(context.world_size))
        entry = ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={per_node}", *program]
    else:
        launcher = "python"
        entry = ["python", *program]
    return {
        "command": " ".join([*entry, *map(shlex.quote, args)]),
        "launcher": launcher,
        "world_size": context.world_size,
        "dist_backend": torch.distributed.get_backend() if context.distributed else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def save_trained_model(
    spec: ModelSpec,
    output_dir: Path,
    *,
    module: torch.nn.Module,
    config: Any,
    metadata: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write a freshly trained model as a complete artifact (replacing any old one atomically)."""
    destination = spec.artifact_dir(output_dir)
    with staged_artifact(destination, start_empty=True) as staging:
        write_model_files(
            staging,
            state_dict=module.state_dict(),
            config=config,
            metadata={
                "name": spec.name,
                "description": spec.description,
                "labels": list(spec.labels),
                **metadata,
            },
        )
        for filename, source in (extra_files or {}).items():
            (staging / filename).write_bytes(Path(source).read_bytes())
    return destination


def add_model_selection_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """``--model`` (repeatable) and ``--artifacts-dir``, shared by the per-artifact commands."""
    parser.add_argument(
        "--model",
        action="append",
        choices=sorted(REGISTRY),
        help=f"{verb} only this model (repeatable); default: all",
    )
    parser.add_argument(
        "--artifacts-dir",
        type=Path,
        default=None,
        help=f"root of the artifact directories (default: {artifacts_root()})",
    )


def start_run(config: RunConfig) -> torch.device:
    """Logging, CPU threads and the device for a training script's ``run``; under
    torchrun also joins the process group (see ``training.distributed``)."""
    configure_logging()
    if config.resume and config.checkpoint_dir is None:
        raise SystemExit("--resume needs --checkpoint-dir")
    require_data(config.data_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    _, device = distributed.init(pick_device(config.device), config.dist_backend)
    return device


def resume_from(config: RunConfig, settings: dict[str, Any], name: str | None = None):
    """The checkpoint to continue from (``--resume``), or ``None`` for a fresh start."""
    if not config.resume:
        return None
    extra = {} if name is None else {"name": name}
    return distributed.load_checkpoint(config.checkpoint_dir, settings, **extra)
