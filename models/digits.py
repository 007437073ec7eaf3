"""The MNIST digit classifier: the classic two-convolution CNN.

conv(1→32, 3×3) → BN → ReLU → max-pool 2×2
conv(32→64, 3×3) → BN → ReLU → max-pool 2×2
flatten (64·7·7 = 3136) → fc 128 → ReLU → dropout → fc 10
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DigitClassifierConfig:
    image_size: int = 28
    in_channels: int = 1
    conv_channels: tuple[int, int] = (32, 64)
    kernel_size: int = 3
    hidden_units: int = 128
    num_classes: int = 10
    dropout: float = 0.3

    @property
    def flat_features(self) -> int:
        # Two 2×2 max-pools shrink each side by 4: 28 → 7.
        side = self.image_size // 4
        return self.conv_channels[1] * side * side


class DigitClassifier(nn.Module):
    """Maps a batch of normalised ``N×1×28×28`` images to ``N×10`` logits."""

    def __init__(self, config: DigitClassifierConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2 = config.conv_channels
        padding = config.kernel_size // 2
        self.features = nn.Sequential(
            nn.Conv2d(config.in_channels, c1, config.kernel_size, padding=padding, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, config.kernel_size, padding=padding, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.embedding = nn.Sequential(
            nn.Flatten(),
            nn.Linear(config.flat_features, config.hidden_units),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_units, config.num_classes),
        )

    def penultimate(self, images: torch.Tensor) -> torch.Tensor:
        """The 128-d feature vector before the last layer (used for the GAN's Fréchet distance)."""
        return self.embedding(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.penultimate(images))
