"""How good is a digit generator, judged by the trained MNIST classifier.

* ``conditional_accuracy``: the share of samples asked for digit ``d`` that the
  classifier labels ``d`` (per digit and overall).
* ``frechet_distance``: the Fréchet distance between two Gaussians fitted to
  feature sets; with ``classifier_features`` (the classifier's 128-d
  penultimate layer) this is an MNIST analogue of FID. The distance between
  real training and real test digits is the floor a perfect generator would hit.

All generator samples come from ``models.preprocessing.latent_batch`` and go
through ``digits_from_generator_output`` + ``normalize_digits``, the same path
the service uses, so the numbers describe what is served.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.digits import DigitClassifier
from models.gan import Generator
from models.preprocessing import digits_from_generator_output, latent_batch, normalize_digits

EVALUATION_SEED = 1234


@torch.no_grad()
def generate_digits(
    generator: Generator,
    digit: int,
    count: int,
    seed: int,
    device: torch.device,
    batch_size: int = 500,
) -> torch.Tensor:
    """``count`` samples of ``digit`` as pixels in ``[0, 1]`` (``count×1×28×28``, on the CPU).

    The generator must already be in the mode to evaluate (normally eval)."""
    latent, labels = latent_batch(
        count,
        generator.config.latent_dim,
        seed,
        digit=digit,
        num_classes=generator.config.num_classes,
    )
    chunks = [
        digits_from_generator_output(
            generator(latent[i : i + batch_size].to(device), labels[i : i + batch_size].to(device))
        ).cpu()
        for i in range(0, count, batch_size)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def classifier_outputs(
    classifier: DigitClassifier, pixels: torch.Tensor, device: torch.device, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in ``[0, 1]`` → (predicted digits ``N``, penultimate features ``N×128``)."""
    classifier.eval()
    predictions, features = [], []
    for i in range(0, len(pixels), batch_size):
        batch = normalize_digits(pixels[i : i + batch_size]).to(device)
        hidden = classifier.penultimate(batch)
        predictions.append(classifier.head(hidden).argmax(1).cpu())
        features.append(hidden.double().cpu())
    return torch.cat(predictions), torch.cat(features)


def classifier_features(
    classifier: DigitClassifier, pixels: torch.Tensor, device: torch.device
) -> torch.Tensor:
    return classifier_outputs(classifier, pixels, device)[1]


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½), computed in float64.

    The symmetric form has the same trace as the usual ``sqrtm(Σa Σb)`` and
    needs only ``eigh``, so no SciPy is required.
    """
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _symmetric_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    distance = (
        (mean_a - mean_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    )
    return float(distance)


def conditional_accuracy(
    generator: Generator,
    classifier: DigitClassifier,
    samples_per_digit: int,
    device: torch.device,
    seed: int = EVALUATION_SEED,
) -> tuple[dict[str, float], torch.Tensor]:
    """Classifier agreement with the requested digit, and the generated samples' features.

    Digit ``d`` uses latent seed ``seed + d``, so the numbers are reproducible."""
    per_digit, features = {}, []
    for digit in range(generator.config.num_classes):
        pixels = generate_digits(generator, digit, samples_per_digit, seed + digit, device)
        predicted, hidden = classifier_outputs(classifier, pixels, device)
        per_digit[str(digit)] = float((predicted == digit).float().mean())
        features.append(hidden)
    per_digit["overall"] = float(np.mean(list(per_digit.values())))
    return per_digit, torch.cat(features)


def recalibrate_batch_norm(
    generator: Generator,
    device: torch.device,
    batches: int = 50,
    batch_size: int = 256,
    seed: int = 0,
) -> Generator:
    """Recompute every BatchNorm running mean/variance of ``generator`` as an exact
    average over fresh random inputs (balanced labels), then return it in eval mode.

    Needed because the running statistics gathered while training lag behind the
    weights, and averaged (EMA) weights never produced statistics of their own;
    eval-mode samples are only as good as these statistics."""
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over all calibration batches
    generator.train()
    with torch.no_grad():
        for index in range(batches):
            latent, labels = latent_batch(
                batch_size,
                generator.config.latent_dim,
                seed + index,
                num_classes=generator.config.num_classes,
            )
            generator(latent.to(device), labels.to(device))
    for module, momentum in zip(norms, saved, strict=True):
        module.momentum = momentum
    return generator.eval()
