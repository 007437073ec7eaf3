"""Running a training script on several processes (``torchrun``) and resuming it.

Everything ``torch.distributed`` needs lives here, so a training script only asks
a few questions (which rank am I, which part of the batch is mine, wrap this
module, add up these numbers, save a checkpoint) and stays readable:

    torchrun --standalone --nproc-per-node 2 -m training.mnist --smoke

Without ``torchrun`` nothing is initialised, every helper is a no-op (one
process, rank 0, the whole batch) and the scripts compute exactly what they
did before this module existed.

Conventions the scripts follow:

* ``--batch-size`` is the *global* batch: each of the ``W`` processes takes
  ``1/W`` of every batch, and DistributedDataParallel averages the gradients,
  so the optimiser sees the same batch, and the same learning rate fits, at any
  world size.
* Process ``r`` seeds its random generators with ``seed + r`` (dropout, latent
  noise, augmentation differ between processes, as they must); randomness that
  defines the global batch (its order, word dropout) uses ``seed`` on every
  process.
* Only rank 0 logs at INFO level, draws progress bars and writes files.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")
# Long enough for rank 0 to evaluate and export while the others wait at a
# collective (the pipeline's checks run between two trainings); a crashed rank
# does not wait for it: torchrun stops the whole job as soon as one process fails.
COLLECTIVE_TIMEOUT = timedelta(hours=1)
CHECKPOINT_FILE = "checkpoint.pt"

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job; ``Context()`` is the plain single process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """torchrun (and any launcher following its env:// contract) sets these."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def current() -> Context:
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=dist.get_world_size(),
    )


def choose_backend(device: torch.device, requested: str = "auto") -> str:
    """NCCL for CUDA tensors, gloo for CPU ones, unless asked otherwise."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; expected one of {BACKENDS}")
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device, backend: str = "auto") -> tuple[Context, torch.device]:
    """Join the torchrun job (once per process) and return this rank's context and device.

    On CUDA each local rank gets its own GPU, ``cuda:<LOCAL_RANK>``. Called
    again (the pipeline trains several models in one process) it keeps the
    existing process group."""
    if not launched_by_torchrun():
        return Context(), device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        chosen = choose_backend(device, backend)
        dist.init_process_group(
            chosen,
            timeout=COLLECTIVE_TIMEOUT,
            device_id=device if chosen == "nccl" else None,
        )
    context = current()
    if not context.is_main:
        # Warnings and errors of every rank still reach the console.
        logging.getLogger().setLevel(logging.WARNING)
    log.info(
        "distributed: %d processes, backend %s, rank 0 on %s",
        context.world_size,
        dist.get_backend(),
        device,
    )
    return context, device


def entry_point(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a script's ``main``: torchrun then reports a failing rank's own
    traceback, and the outermost ``main`` leaves the process group when it is done.

    On an exception nothing is torn down: the process exits with the error,
    and torchrun stops the other ranks instead of leaving them waiting."""
    recorded = record(main)

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> int:
        outermost = not (dist.is_available() and dist.is_initialized())
        status = recorded(*args, **kwargs)
        if outermost and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        return status

    return run


def seed_offset(context: Context) -> int:
    """Added to the seed of the per-process generators, so ranks draw different noise."""
    return context.rank


def local_batch_size(context: Context, global_batch_size: int) -> int:
    if global_batch_size % context.world_size:
        raise ValueError(
            f"the global batch size {global_batch_size} must be a multiple of the "
            f"{context.world_size} processes"
        )
    return global_batch_size // context.world_size


def shard(context: Context, items: Sequence[T]) -> Sequence[T]:
    """This rank's share of a global batch (every ``world_size``-th item)."""
    return items if context.world_size == 1 else items[context.rank :: context.world_size]


def evaluation_shard(context: Context, dataset: Dataset) -> Dataset:
    """A disjoint part of an evaluation set per rank (DistributedSampler would
    repeat items to even the parts out, and count them twice)."""
    if context.world_size == 1:
        return dataset
    return Subset(dataset, range(context.rank, len(dataset), context.world_size))


def training_sampler(context: Context, dataset: Dataset, seed: int) -> DistributedSampler:
    """Shuffles with ``seed + epoch`` (call ``set_epoch``); the ranks' parts of
    consecutive positions make up each global batch."""
    return DistributedSampler(
        dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=seed
    )


def wrap(module: nn.Module, context: Context, device: torch.device) -> nn.Module:
    """DistributedDataParallel under torchrun (rank 0's weights are broadcast
    to all at construction, gradients are averaged in ``backward``), else the module."""
    if not context.distributed:
        return module
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def no_sync(module: nn.Module) -> contextlib.AbstractContextManager:
    """Run a forward whose gradients for ``module`` will be discarded without averaging them."""
    if isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(values: Sequence[float] | torch.Tensor) -> Any:
    """Element-wise sum over ranks: a tensor stays a tensor, numbers come back as a list."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = (
        values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    )
    reduced = tensor.detach().clone()
    if dist.get_backend() == "nccl":
        reduced = reduced.cuda()
    dist.all_reduce(reduced)
    reduced = reduced.to(tensor.device)
    return reduced if isinstance(values, torch.Tensor) else reduced.tolist()


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics).

    DDP broadcasts them at the start of each forward, so after the last
    training step of an epoch each rank still holds the statistics of its own
    last batch; a split evaluation needs the same model on every rank."""
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --- checkpoints ----------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    # numpy's state as plain tensors and numbers, so the file loads with weights_only=True.
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss_value = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss_value))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def save_checkpoint(directory: Path | None, state: dict[str, Any], name: str = CHECKPOINT_FILE):
    """Write the training ``state`` plus every rank's RNG state (rank 0 writes).

    Called by all ranks at the end of an epoch. The file is replaced
    atomically, so a kill during the write leaves the previous epoch's."""
    if directory is None:
        return None
    rngs = _gather(_rng_state())
    context = current()
    path = Path(directory) / name
    if context.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save({"state": state, "rng": rngs, "world_size": context.world_size}, partial)
        os.replace(partial, path)
        log.info("checkpoint %s (epoch %s)", path, state.get("epoch"))
    barrier()
    return path


def load_checkpoint(
    directory: Path | None, expected: dict[str, Any], name: str = CHECKPOINT_FILE
) -> dict[str, Any] | None:
    """The state saved by ``save_checkpoint``, with this rank's RNG state restored;
    ``None`` when there is none yet (a first run with ``--resume`` starts afresh).

    ``expected`` (the run's settings) must match what was saved: resuming with
    another batch size or world size would silently train something else."""
    if directory is None:
        return None
    path = Path(directory) / name
    if not path.is_file():
        log.info("no checkpoint in %s; starting from the beginning", directory)
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    context = current()
    saved = {**payload["state"]["settings"], "world_size": payload["world_size"]}
    wanted = {**expected, "world_size": context.world_size}
    if saved != wanted:
        differing = sorted(k for k in wanted.keys() | saved.keys() if saved.get(k) != wanted.get(k))
        raise ValueError(
            f"{path} was written by a run with other settings ({', '.join(differing)}: "
            f"{[saved.get(k) for k in differing]} there, {[wanted.get(k) for k in differing]} "
            "here); resume with the same command or remove it"
        )
    _set_rng_state(payload["rng"][context.rank])
    log.info("resuming from %s after epoch %s", path, payload["state"].get("epoch"))
    return payload["state"]
