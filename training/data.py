"""Data set loading: MNIST through torchvision, SST-2 from its TSV files.

The data root is always passed in (``--data-dir``, default
``training.sources.default_data_dir()``, which also describes the expected
file layout); nothing here is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from models.preprocessing import MNIST_MEAN, MNIST_STD
from models.tokenizer import tokenize
from training.sources import MNIST_FILES, read_sst2_rows, require_data

MNIST_VALIDATION_SIZE = 5_000


def mnist_transform(augment: bool = False) -> transforms.Compose:
    """uint8 PIL digit → normalised tensor; the normalisation constants live in ``models``."""
    steps: list = []
    if augment:
        steps.append(transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)))
    steps += [transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]
    return transforms.Compose(steps)


def mnist_test_set(data_dir: Path, transform=None) -> Dataset:
    require_data(data_dir, *MNIST_FILES["test"])
    return datasets.MNIST(str(data_dir), train=False, download=False, transform=transform)


def mnist_train_validation(
    data_dir: Path,
    *,
    train_transform: Callable[[Any], Any] | None = None,
    seed: int = 0,
    validation_size: int = MNIST_VALIDATION_SIZE,
) -> tuple[Subset, Subset]:
    """Split the 60,000 training images into train/validation with a fixed permutation.

    The two subsets wrap separate dataset objects, so that ``train_transform`` (for
    augmentation; default the plain ``mnist_transform()``) applies to the training
    part only.
    """
    require_data(data_dir, *MNIST_FILES["train"])
    train_full = datasets.MNIST(
        str(data_dir), train=True, download=False, transform=train_transform or mnist_transform()
    )
    plain_full = datasets.MNIST(
        str(data_dir), train=True, download=False, transform=mnist_transform(False)
    )
    order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(train_full, order[validation_size:]), Subset(plain_full, order[:validation_size])


@dataclass(frozen=True)
class LabelledText:
    label: int
    text: str
    tokens: tuple[str, ...]


def read_sst2(data_dir: Path, split: str) -> list[LabelledText]:
    """Rows of ``SST-2/<split>.tsv``, tokenised with the same tokenizer the service uses."""
    return [
        LabelledText(label, text, tuple(tokenize(text)))
        for label, text in read_sst2_rows(data_dir, split)
    ]
