"""A conditional DCGAN for 28×28 digits: generator (served) and discriminator (training only).

The generator maps a latent vector and a digit label to a ``1×28×28`` image in
``[-1, 1]`` (tanh). The discriminator is an AC-GAN style critic: it scores
real/fake and also predicts the digit, which keeps samples faithful to the
label they were asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GeneratorConfig:
    latent_dim: int = 64
    num_classes: int = 10
    label_embedding_dim: int = 32
    base_channels: int = 32
    image_size: int = 28

    @property
    def seed_side(self) -> int:
        # Two stride-2 transposed convolutions double the side twice: 7 → 14 → 28.
        return self.image_size // 4


class Generator(nn.Module):
    """``(z: N×latent_dim float, labels: N int64) → N×1×28×28`` images in ``[-1, 1]``."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        wide = config.base_channels * 4
        mid = config.base_channels * 2
        side = config.seed_side
        self.label_embedding = nn.Embedding(config.num_classes, config.label_embedding_dim)
        self.project = nn.Sequential(
            nn.Linear(
                config.latent_dim + config.label_embedding_dim, wide * side * side, bias=False
            ),
            nn.BatchNorm1d(wide * side * side),
            nn.ReLU(inplace=True),
            nn.Unflatten(1, (wide, side, side)),
        )
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(wide, mid, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(mid, config.base_channels, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(config.base_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(config.base_channels, 1, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, latent: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        conditioned = torch.cat([latent, self.label_embedding(labels)], dim=1)
        return self.upsample(self.project(conditioned))


@dataclass(frozen=True)
class DiscriminatorConfig:
    num_classes: int = 10
    base_channels: int = 32
    image_size: int = 28
    dropout: float = 0.3


class Discriminator(nn.Module):
    """``N×1×28×28`` images → (``N`` real/fake logits, ``N×10`` class logits)."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        c = config.base_channels
        side = config.image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Dropout2d(config.dropout),
            nn.Conv2d(c, c * 2, 4, stride=2, padding=1),
            nn.BatchNorm2d(c * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Dropout2d(config.dropout),
            nn.Flatten(),
        )
        flat = c * 2 * side * side
        self.real_fake = nn.Linear(flat, 1)
        self.classifier = nn.Linear(flat, config.num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(images)
        return self.real_fake(h).squeeze(1), self.classifier(h)
