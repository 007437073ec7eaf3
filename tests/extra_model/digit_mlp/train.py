"""Train the one-hidden-layer digit classifier on MNIST and write its artifact.

    python -m digit_mlp.train [--smoke] [--output-dir DIR]

A training script as the pipeline drives one (``training.pipeline``): a
``TrainConfig`` extending ``training.common.RunConfig`` and ``run(config)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torchvision import datasets

from digit_mlp.model import DigitMLP, DigitMLPConfig
from models.preprocessing import normalize_digits
from models.registry import artifacts_root, get_spec
from training.common import (
    RunConfig,
    invoked_with,
    run_provenance,
    save_trained_model,
    seed_everything,
    start_run,
)
from training.config import config_record, parse_config

NAME = "digit-mlp"
SMOKE_TRAIN_IMAGES = 12_000


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    DEFAULT_EPOCHS: ClassVar[int] = 3
    DATA = "MNIST/raw"
    SMOKE = f"one epoch on the first {SMOKE_TRAIN_IMAGES:,} training images"

    learning_rate: float = field(default=1e-3, metadata={"help": "Adam step size", "flag": "--lr"})
    hidden: int = field(default=64, metadata={"help": "width of the hidden layer"})


def mnist_tensors(config: TrainConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as normalised ``N×1×28×28`` images (the service's model input) and labels."""
    split = datasets.MNIST(str(config.data_dir), train=train, download=False)
    images, labels = split.data, split.targets
    if train and config.smoke:
        images, labels = images[:SMOKE_TRAIN_IMAGES], labels[:SMOKE_TRAIN_IMAGES]
    pixels = normalize_digits(images.numpy().astype("float32") / 255)
    return torch.from_numpy(pixels)[:, None], labels


def train_one_epoch(model, images, labels, optimizer, batch_size: int, device) -> float:
    model.train()
    order = torch.randperm(len(images))
    total = 0.0
    for start in range(0, len(images), batch_size):
        batch = order[start : start + batch_size]
        loss = nn.functional.cross_entropy(
            model(images[batch].to(device)), labels[batch].to(device)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch)
    return total / len(images)


@torch.inference_mode()
def measure_accuracy(model, images, labels, device) -> float:
    model.eval()
    predicted = model(images.to(device)).argmax(dim=1).cpu()
    return (predicted == labels).float().mean().item()


def run(config: TrainConfig) -> int:
    config = config.resolved()
    device = start_run(config)
    seed_everything(config.seed)
    model = DigitMLP(DigitMLPConfig(hidden=config.hidden)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    images, labels = mnist_tensors(config, train=True)
    losses = [
        train_one_epoch(model, images, labels, optimizer, config.batch_size, device)
        for _ in range(config.epochs)
    ]
    accuracy = measure_accuracy(model, *mnist_tensors(config, train=False), device)
    save_trained_model(
        get_spec(NAME),
        config.output_dir or artifacts_root(),
        module=model.cpu(),
        config=DigitMLPConfig(hidden=config.hidden),
        metadata={
            "smoke": config.smoke,
            "metrics": {"test_accuracy": accuracy, "train_loss": losses[-1]},
            "training": {**run_provenance(device), "hyperparameters": config_record(config)},
        },
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    config = parse_config(TrainConfig, argv, __doc__)
    with invoked_with(argv):
        return run(config)


if __name__ == "__main__":
    raise SystemExit(main())
