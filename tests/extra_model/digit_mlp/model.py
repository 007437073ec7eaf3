"""The architecture: 28×28 digits → one hidden layer → ten logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DigitMLPConfig:
    image_size: int = 28
    in_channels: int = 1
    hidden: int = 64
    num_classes: int = 10


class DigitMLP(nn.Module):
    def __init__(self, config: DigitMLPConfig) -> None:
        super().__init__()
        inputs = config.in_channels * config.image_size * config.image_size
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(inputs, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, config.num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)
