"""Pieces every training script shares: device choice, seeding, data paths,
run provenance, and writing a trained model as a verified artifact."""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.artifacts import staged_artifact, write_model_files
from models.devices import DEVICE_NAMES, DeviceError, choose_device, valid_device_name
from models.registry import REGISTRY, ModelSpec, artifacts_root
from training import distributed
from training.log import configure_logging
from training.sources import default_data_dir


def device_argument(value: str) -> str:
    """argparse type of ``--device``: any name ``models.devices`` accepts (cuda:N too)."""
    try:
        return valid_device_name(value)
    except DeviceError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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


def run_provenance(device: torch.device, argv: list[str] | None) -> dict[str, Any]:
    """What reproduces this run: the exact command (with its launcher), how many
    processes trained and how they talked, the device and framework versions."""
    module = sys.modules["__main__"].__spec__
    program = ["-m", module.name] if module else [sys.argv[0]]
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


def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    model_name: str,
    data_help: str,
    smoke_help: str,
    seed: int,
    epochs: int,
    batch_size: int,
) -> None:
    """The flags every training script shares: data, output, device, seed, size, smoke."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help=f"{data_help} (default: %(default)s)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"artifact root; the model goes to <root>/{model_name} "
        "(default: models.registry.artifacts_root())",
    )
    parser.add_argument("--device", type=device_argument, default="auto", help=DEVICE_NAMES)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"(default: {epochs}; 1 with --smoke)"
    )
    parser.set_defaults(default_epochs=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--smoke", action="store_true", help=f"{smoke_help}; marks the artifact smoke"
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="write a checkpoint there after every epoch (default: none)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --checkpoint-dir if there is one",
    )
    parser.add_argument(
        "--dist-backend",
        choices=distributed.BACKENDS,
        default="auto",
        help="torch.distributed backend under torchrun (auto: nccl on CUDA, else gloo)",
    )


def epoch_count(args: argparse.Namespace) -> int:
    """``--epochs`` if given, else one epoch for ``--smoke`` and the script's default otherwise."""
    if args.epochs is not None:
        return args.epochs
    return 1 if args.smoke else args.default_epochs


def start_run(args: argparse.Namespace) -> torch.device:
    """Logging, CPU threads and the device for a training script's ``main``; under
    torchrun also joins the process group (see ``training.distributed``)."""
    configure_logging()
    if args.resume and args.checkpoint_dir is None:
        raise SystemExit("--resume needs --checkpoint-dir")
    if args.threads:
        torch.set_num_threads(args.threads)
    _, device = distributed.init(pick_device(args.device), args.dist_backend)
    return device


def resume_from(args: argparse.Namespace, settings: dict[str, Any], name: str | None = None):
    """The checkpoint to continue from (``--resume``), or ``None`` for a fresh start."""
    if not args.resume:
        return None
    extra = {} if name is None else {"name": name}
    return distributed.load_checkpoint(args.checkpoint_dir, settings, **extra)
