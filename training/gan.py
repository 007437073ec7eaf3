"""Train the conditional digit GAN (AC-GAN) and write the generator as the ``digit-gan`` artifact.

    python -m training.gan                         # full run (CUDA when present)
    python -m training.gan --threads 1 --epochs 8
    python -m training.gan --evaluate-only         # re-measure the saved generator
    python -m training.gan --smoke --output-dir /tmp/artifacts \\
        --classifier-dir /tmp/artifacts/mnist-cnn  # seconds, on the CPU

The generator learns from the 55,000 MNIST training images; the discriminator
scores real/fake and classifies the digit (trained on real digits only, so its
class head pulls generated digits towards real ones). The released generator
is an exponential moving average of the training weights with its BatchNorm
statistics recomputed, so eval-mode samples (what the service runs) are the
ones measured. After training, each epoch's generator is scored with the trained
MNIST classifier (``--classifier-dir``, read only then, so the classifier may
train at the same time) against the 5,000 validation images, and the epoch
with the lowest Fréchet distance is kept. The final metrics use 1,000 samples per
digit against the 10,000 test images, next to the real-train-vs-test floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Subset
from tqdm import tqdm

from models.artifacts import REPORT_FILE, WEIGHTS_FILE, staged_artifact, update_metadata
from models.digits import DigitClassifier
from models.gan import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig
from models.registry import (
    DIGIT_GENERATOR,
    DIGIT_LABELS,
    MNIST_CLASSIFIER,
    artifacts_root,
    get_spec,
)
from training import distributed, gan_metrics, reports
from training.common import (
    RunConfig,
    invoked_with,
    resume_from,
    run_provenance,
    save_trained_model,
    seed_everything,
    start_run,
)
from training.config import config_parser, config_record, parse_config
from training.data import MNIST_VALIDATION_SIZE, mnist_test_set, mnist_train_validation

log = logging.getLogger(__name__)

GRID_SEED = 2024
SMOKE_TRAIN_BATCHES = 4
SMOKE_SAMPLES_PER_DIGIT = 20
SMOKE_REAL_IMAGES = 400


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    DEFAULT_EPOCHS: ClassVar[int] = 8
    DATA: ClassVar[str] = "MNIST/raw"
    SMOKE: ClassVar[str] = (
        f"{SMOKE_TRAIN_BATCHES} batches of one epoch, {SMOKE_SAMPLES_PER_DIGIT} samples per digit"
    )

    batch_size: int = field(
        default=64, metadata={"help": "real digits per step, over all processes"}
    )
    learning_rate: float = field(
        default=2e-4, metadata={"help": "Adam's learning rate, for G and D", "flag": "--lr"}
    )
    betas: tuple[float, float] = field(
        default=(0.5, 0.999), metadata={"help": "Adam's betas, for G and D"}
    )
    real_label: float = field(
        default=0.9,
        # One-sided label smoothing keeps D from saturating.
        metadata={"help": "D's target for real digits"},
    )
    ema_decay: float = field(
        default=0.999,
        metadata={"help": "decay of the generator's weight average (what is released)"},
    )
    selection_samples_per_digit: int = field(
        default=200, metadata={"help": "samples per digit that score each epoch on validation"}
    )
    evaluation_samples_per_digit: int = field(
        default=1000, metadata={"help": "samples per digit of the final metrics"}
    )
    real_images: int = field(
        default=10_000, metadata={"help": "test (and train) images the final Fréchet distance uses"}
    )
    classifier_dir: Path | None = field(
        default=None,
        metadata={
            "help": "artifact directory of the trained MNIST classifier used to score "
            "samples (default: the registry's mnist-cnn directory)",
            # Read only after training, to choose the epoch.
            "plumbing": True,
        },
    )
    evaluate_only: bool = field(
        default=False,
        metadata={
            "help": "skip training; re-measure the generator already in --output-dir "
            "and update its metrics and report",
            "plumbing": True,
        },
    )


def build_parser() -> argparse.ArgumentParser:
    return config_parser(TrainConfig, __doc__)


def mnist_pixels(subset: Subset, limit: int | None = None) -> torch.Tensor:
    """The raw digits of an MNIST subset as ``N×1×28×28`` floats in ``[0, 1]``.

    Read straight from the data set's uint8 tensor: no augmentation is wanted
    here, and one tensor is far faster to batch than PIL images one by one."""
    indices = torch.as_tensor(subset.indices[:limit] if limit else subset.indices)
    return subset.dataset.data[indices].unsqueeze(1).float() / 255


def test_pixels(data_dir: Path, limit: int | None = None) -> torch.Tensor:
    test = mnist_test_set(data_dir)
    return mnist_pixels(Subset(test, range(limit or len(test))))


def load_classifier(directory: Path, device: torch.device) -> DigitClassifier:
    spec = get_spec(MNIST_CLASSIFIER)
    artifact = spec.load_artifact(directory)
    if artifact.metadata.get("smoke"):
        log.warning("%s is a smoke-test classifier; its scores mean little", directory)
    return spec.load_module(artifact, device)


def score(
    generator: Generator,
    classifier: DigitClassifier,
    real_features: torch.Tensor,
    samples_per_digit: int,
    device: torch.device,
) -> dict[str, Any]:
    """Conditional accuracy and Fréchet distance to ``real_features`` of an eval-mode generator."""
    accuracy, generated = gan_metrics.conditional_accuracy(
        generator, classifier, samples_per_digit, device
    )
    return {"accuracy": accuracy, "frechet": gan_metrics.frechet_distance(generated, real_features)}


def sample_grid(generator: Generator, device: torch.device, per_digit: int = 10) -> np.ndarray:
    """``10×per_digit×28×28`` eval-mode samples, row ``d`` asked for digit ``d``."""
    rows = [
        gan_metrics.generate_digits(generator, digit, per_digit, GRID_SEED + digit, device)
        for digit in range(generator.config.num_classes)
    ]
    return torch.stack(rows).squeeze(2).numpy()


@dataclass
class GanRun:
    """The networks (DDP-wrapped under torchrun), the generator's moving average,
    both optimisers and the generator that orders the real digits.
    ``state_dict`` is what a checkpoint saves of it."""

    generator_network: Generator
    discriminator_network: Discriminator
    generator: nn.Module
    discriminator: nn.Module
    average: AveragedModel
    optimizer_g: torch.optim.Optimizer
    optimizer_d: torch.optim.Optimizer
    shuffler: torch.Generator

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator_network.state_dict(),
            "discriminator": self.discriminator_network.state_dict(),
            "average": self.average.state_dict(),
            "optimizer_g": self.optimizer_g.state_dict(),
            "optimizer_d": self.optimizer_d.state_dict(),
            "shuffler": self.shuffler.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator_network.load_state_dict(state["generator"])
        self.discriminator_network.load_state_dict(state["discriminator"])
        self.average.load_state_dict(state["average"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        self.shuffler.set_state(state["shuffler"])


def start_gan(config: TrainConfig, device: torch.device) -> GanRun:
    context = distributed.current()
    generator_network = Generator(GeneratorConfig()).to(device)
    discriminator_network = Discriminator(DiscriminatorConfig()).to(device)
    generator = distributed.wrap(generator_network, context, device)
    discriminator = distributed.wrap(discriminator_network, context, device)
    # The moving average of the generator's weights, starting from its initial ones
    # (the first update of an AveragedModel copies).
    average = AveragedModel(
        generator_network, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay)
    ).eval()
    average.update_parameters(generator_network)
    adam = {"lr": config.learning_rate, "betas": config.betas}
    return GanRun(
        generator_network=generator_network,
        discriminator_network=discriminator_network,
        generator=generator,
        discriminator=discriminator,
        average=average,
        optimizer_g=torch.optim.Adam(generator.parameters(), **adam),
        optimizer_d=torch.optim.Adam(discriminator.parameters(), **adam),
        shuffler=torch.Generator().manual_seed(config.seed),
    )


def discriminator_step(
    run: GanRun, images: torch.Tensor, labels: torch.Tensor, fakes: torch.Tensor, real_label: float
) -> torch.Tensor:
    """Real vs fake, and the digit of real images."""
    real_score, real_class = run.discriminator(images)
    fake_score, _ = run.discriminator(fakes.detach())
    loss = (
        F.binary_cross_entropy_with_logits(real_score, torch.full_like(real_score, real_label))
        + F.binary_cross_entropy_with_logits(fake_score, torch.zeros_like(fake_score))
        + F.cross_entropy(real_class, labels)
    )
    run.optimizer_d.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer_d.step()
    return loss


def generator_step(run: GanRun, fakes: torch.Tensor, fake_labels: torch.Tensor) -> torch.Tensor:
    """Look real, and look like the digit that was asked for."""
    with distributed.no_sync(run.discriminator):
        fake_score, fake_class = run.discriminator(fakes)
    loss = F.binary_cross_entropy_with_logits(
        fake_score, torch.ones_like(fake_score)
    ) + F.cross_entropy(fake_class, fake_labels)
    run.optimizer_g.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer_g.step()
    run.average.update_parameters(run.generator_network)
    return loss


def training_step(
    run: GanRun, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig
) -> tuple[float, float]:
    """A D step, then a G step, on this rank's real digits and as many fakes; their losses."""
    count, device = len(labels), images.device
    latent = torch.randn(count, run.generator_network.config.latent_dim, device=device)
    num_classes = run.generator_network.config.num_classes
    fake_labels = torch.randint(0, num_classes, (count,), device=device)
    fakes = run.generator(latent, fake_labels)
    loss_d = discriminator_step(run, images, labels, fakes, config.real_label)
    loss_g = generator_step(run, fakes, fake_labels)
    return loss_d.item(), loss_g.item()


def train_one_epoch(
    run: GanRun,
    real: torch.Tensor,
    real_labels: torch.Tensor,
    config: TrainConfig,
    device: torch.device,
    epoch: int,
) -> tuple[float, float]:
    """``steps`` batches in a fresh order; the mean D and G losses over every rank."""
    context = distributed.current()
    run.generator.train()
    run.discriminator.train()
    order = torch.randperm(len(real), generator=run.shuffler)
    steps = steps_per_epoch(config, len(real))
    sums = [0.0, 0.0]
    progress = tqdm(
        range(steps),
        desc=f"epoch {epoch}/{config.epochs}",
        unit="batch",
        leave=False,
        disable=not context.is_main,
    )
    for step in progress:
        batch = order[step * config.batch_size : (step + 1) * config.batch_size]
        batch = distributed.shard(context, batch)
        losses = training_step(run, real[batch].to(device), real_labels[batch].to(device), config)
        sums = [total + loss for total, loss in zip(sums, losses, strict=True)]
        progress.set_postfix(d=f"{sums[0] / (step + 1):.3f}", g=f"{sums[1] / (step + 1):.3f}")
    progress.close()
    if context.world_size > 1:
        # Every rank's losses are means over equal parts of the batch: average them.
        sums = [total / context.world_size for total in distributed.all_reduce_sum(sums)]
    return sums[0] / steps, sums[1] / steps


def steps_per_epoch(config: TrainConfig, real_images: int) -> int:
    return SMOKE_TRAIN_BATCHES if config.smoke else real_images // config.batch_size


def snapshot(run: GanRun, config: TrainConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """The moving average with its BatchNorm statistics recomputed: what would be released."""
    gan_metrics.recalibrate_batch_norm(
        run.average.module, device, batches=2 if config.smoke else 40, seed=config.seed
    )
    return {k: v.detach().cpu().clone() for k, v in run.average.module.state_dict().items()}


def train(
    config: TrainConfig, device: torch.device
) -> tuple[list[dict[str, torch.Tensor]], dict[str, list[float]], int]:
    """Train G and D; return one eval-ready generator state per epoch and the loss history.

    Each snapshot is the moving average of the generator weights with its
    BatchNorm statistics recomputed. Scoring them needs the classifier, which is
    loaded only afterwards, so the classifier may still be training meanwhile.

    Under torchrun G and D are each wrapped in DistributedDataParallel: every
    rank takes its share of the same global batch of real digits (the order is
    seeded with ``seed`` everywhere) and draws its own latent noise; each
    ``backward`` averages that network's gradients over the ranks, so both
    optimisers take identical steps everywhere, and each network's BatchNorm
    buffers are broadcast from rank 0 at its forward. The generator step runs D
    under ``no_sync``: those D gradients are thrown away, so averaging them
    would be wasted traffic."""
    train_set, _ = mnist_train_validation(config.data_dir, seed=config.seed)
    real = mnist_pixels(train_set) * 2 - 1  # the generator's tanh range
    real_labels = torch.as_tensor(train_set.dataset.targets[torch.as_tensor(train_set.indices)])
    run = start_gan(config, device)
    history: dict[str, list[float]] = {"discriminator_loss": [], "generator_loss": []}
    snapshots: list[dict[str, torch.Tensor]] = []
    start = 1
    resumed = resume_from(config, config.settings())
    if resumed:
        run.load_state_dict(resumed)
        history, snapshots, start = resumed["history"], resumed["snapshots"], resumed["epoch"] + 1
    distributed.local_batch_size(
        distributed.current(), config.batch_size
    )  # refuses an uneven split
    for epoch in range(start, config.epochs + 1):
        loss_d, loss_g = train_one_epoch(run, real, real_labels, config, device, epoch)
        history["discriminator_loss"].append(loss_d)
        history["generator_loss"].append(loss_g)
        log.info("epoch %d: D loss %.4f G loss %.4f", epoch, loss_d, loss_g)
        snapshots.append(snapshot(run, config, device))
        state = {"settings": config.settings(), "epoch": epoch, **run.state_dict()}
        state |= {"history": history, "snapshots": snapshots}
        distributed.save_checkpoint(config.checkpoint_dir, state)
    return snapshots, history, len(real)


def select_epoch(
    snapshots: list[dict[str, torch.Tensor]],
    history: dict[str, list[float]],
    classifier: DigitClassifier,
    config: TrainConfig,
    device: torch.device,
) -> tuple[Generator, dict[str, Any]]:
    """Score every epoch's generator against the validation images; keep the lowest
    Fréchet distance. Adds the validation curves to ``history``."""
    _, validation_set = mnist_train_validation(config.data_dir, seed=config.seed)
    validation_features = gan_metrics.classifier_features(
        classifier,
        mnist_pixels(validation_set, SMOKE_REAL_IMAGES if config.smoke else None),
        device,
    )
    samples = SMOKE_SAMPLES_PER_DIGIT if config.smoke else config.selection_samples_per_digit
    candidate = Generator(GeneratorConfig()).to(device)
    history["validation_frechet"], history["validation_accuracy"] = [], []
    best: dict[str, Any] = {"frechet": float("inf")}
    for epoch, state in enumerate(snapshots, start=1):
        candidate.load_state_dict(state)
        result = score(candidate.eval(), classifier, validation_features, samples, device)
        history["validation_frechet"].append(result["frechet"])
        history["validation_accuracy"].append(result["accuracy"]["overall"])
        log.info(
            "epoch %d: validation Fréchet %.3f, conditional accuracy %.4f",
            epoch,
            result["frechet"],
            result["accuracy"]["overall"],
        )
        if result["frechet"] < best["frechet"]:
            best = {
                "frechet": result["frechet"],
                "accuracy": result["accuracy"]["overall"],
                "epoch": epoch,
            }
    candidate.load_state_dict(snapshots[best["epoch"] - 1])
    return candidate.eval(), best


def evaluate(
    generator: Generator,
    classifier: DigitClassifier,
    data_dir: Path,
    config: TrainConfig,
    device: torch.device,
) -> dict[str, Any]:
    """The released numbers: conditional accuracy and Fréchet distance to the test set,
    with the real-train-vs-real-test distance as the floor."""
    real_count = SMOKE_REAL_IMAGES if config.smoke else config.real_images
    per_digit = SMOKE_SAMPLES_PER_DIGIT if config.smoke else config.evaluation_samples_per_digit
    test_features = gan_metrics.classifier_features(
        classifier, test_pixels(data_dir, real_count), device
    )
    train_set, _ = mnist_train_validation(data_dir, seed=config.seed)
    train_features = gan_metrics.classifier_features(
        classifier, mnist_pixels(train_set, real_count), device
    )
    result = score(generator.eval(), classifier, test_features, per_digit, device)
    floor = gan_metrics.frechet_distance(train_features, test_features)
    log.info(
        "conditional accuracy %.4f; Fréchet to test %.3f (real train vs test %.3f)",
        result["accuracy"]["overall"],
        result["frechet"],
        floor,
    )
    return {
        "conditional_accuracy": result["accuracy"]["overall"],
        "conditional_accuracy_per_digit": {
            k: v for k, v in result["accuracy"].items() if k != "overall"
        },
        "samples_per_digit": per_digit,
        "frechet_distance_generated_vs_test": result["frechet"],
        "frechet_distance_train_vs_test": floor,
        "frechet_real_images": real_count,
        "frechet_features": "DigitClassifier.penultimate (128-d) of the mnist-cnn artifact",
        "generator_mode": "eval (BatchNorm running statistics)",
    }


def write_report(
    path: Path,
    generator: Generator,
    history: dict,
    metrics: dict,
    device: torch.device,
    smoke: bool,
) -> Path:
    grid = sample_grid(generator, device)
    title = (
        f"{DIGIT_GENERATOR}{' (smoke)' if smoke else ''}: conditional accuracy "
        f"{metrics['conditional_accuracy']:.2%}, Fréchet to test "
        f"{metrics['frechet_distance_generated_vs_test']:.2f} "
        f"(train vs test {metrics['frechet_distance_train_vs_test']:.2f})"
    )
    return reports.save_report(
        path, title, history, [lambda ax: reports.draw_digit_grid(ax, grid, DIGIT_LABELS)]
    )


def classifier_provenance(classifier_dir: Path) -> dict:
    """Which classifier the metrics were measured with (its figures depend on it)."""
    metadata = get_spec(MNIST_CLASSIFIER).load_artifact(classifier_dir).metadata
    return {
        "name": MNIST_CLASSIFIER,
        "test_accuracy": metadata.get("metrics", {}).get("test_accuracy"),
        "weights_sha256": metadata["files"][WEIGHTS_FILE],
    }


def evaluate_saved(config: TrainConfig, classifier_dir: Path, device: torch.device) -> Path:
    """``--evaluate-only``: re-measure the generator artifact and refresh its metrics,
    report and the record of the classifier that measured them."""
    spec = get_spec(DIGIT_GENERATOR)
    destination = spec.artifact_dir(config.output_dir or artifacts_root())
    artifact = spec.load_artifact(destination)
    generator = spec.load_module(artifact, device)
    classifier = load_classifier(classifier_dir, device)
    config = dataclasses.replace(config, smoke=bool(artifact.metadata.get("smoke")))
    metrics = {
        **artifact.metadata.get("metrics", {}),
        **evaluate(generator, classifier, config.data_dir, config, device),
    }
    with staged_artifact(destination) as staging:
        update_metadata(
            staging, metrics=metrics, evaluation_classifier=classifier_provenance(classifier_dir)
        )
        write_report(
            staging / REPORT_FILE,
            generator,
            artifact.metadata.get("history", {}),
            metrics,
            device,
            config.smoke,
        )
    return destination


def artifact_metadata(
    config: TrainConfig,
    device: torch.device,
    history: dict[str, list[float]],
    metrics: dict[str, Any],
    classifier_dir: Path,
    train_images: int,
    training_seconds: float,
) -> dict[str, Any]:
    return {
        "smoke": config.smoke,
        "metrics": metrics,
        "history": history,
        "evaluation_classifier": classifier_provenance(classifier_dir),
        "training": {
            **run_provenance(device),
            "epochs": config.epochs,
            "optimizer": f"Adam(lr={config.learning_rate}, betas={config.betas}) for G and D",
            "objective": "AC-GAN: BCE real/fake (real label "
            f"{config.real_label}) + class cross-entropy (D on real, G on fake)",
            "weights": f"EMA(decay={config.ema_decay}) of the generator, BatchNorm recalibrated",
            "discriminator": DiscriminatorConfig().__dict__,
            "selection": "epoch with the lowest Fréchet distance to the validation images",
            "hyperparameters": config_record(config),
            "wall_seconds": round(training_seconds, 1),
        },
        "dataset": {
            "name": "MNIST",
            "train_images": train_images,
            "validation_images": MNIST_VALIDATION_SIZE,
            "test_images_for_metrics": metrics["frechet_real_images"],
        },
        "preprocessing": {
            "latent": "standard normal N×latent_dim float32 (models.preprocessing.latent_batch)",
            "labels": "N int64 digits 0-9",
            "output": "N×1×28×28 in [-1, 1]; pixels = (x + 1) / 2, white ink on black",
        },
    }


def write_artifact(
    generator: Generator, config: TrainConfig, metadata: dict[str, Any], device: torch.device
) -> Path:
    with tempfile.TemporaryDirectory() as scratch:
        report = write_report(
            Path(scratch) / REPORT_FILE,
            generator,
            metadata["history"],
            metadata["metrics"],
            device,
            config.smoke,
        )
        return save_trained_model(
            get_spec(DIGIT_GENERATOR),
            config.output_dir or artifacts_root(),
            module=generator.cpu(),
            config=generator.config,
            metadata=metadata,
            extra_files={REPORT_FILE: report},
        )


def run(config: TrainConfig) -> int:
    """Train, choose the epoch, measure and write the ``digit-gan`` artifact (rank 0
    does all after training); or only re-measure it. 0 on success."""
    config = config.resolved()
    device = start_run(config)
    seed_everything(config.seed)
    classifier_dir = config.classifier_dir or get_spec(MNIST_CLASSIFIER).artifact_dir()
    if config.evaluate_only:
        if distributed.current().is_main:
            log.info("re-evaluated %s", evaluate_saved(config, classifier_dir, device))
        return 0
    log.info("training %s on %s with %s", DIGIT_GENERATOR, device, config)
    started = time.perf_counter()
    snapshots, history, train_images = train(config, device)
    training_seconds = time.perf_counter() - started
    # The snapshots are the same on every rank; rank 0 alone scores and writes them.
    distributed.barrier()
    if not distributed.current().is_main:
        return 0
    classifier = load_classifier(classifier_dir, device)
    generator, best = select_epoch(snapshots, history, classifier, config, device)
    metrics = {
        **evaluate(generator, classifier, config.data_dir, config, device),
        "best_epoch": best["epoch"],
        "validation_frechet": best["frechet"],
        "validation_conditional_accuracy": best["accuracy"],
    }
    metadata = artifact_metadata(
        config, device, history, metrics, classifier_dir, train_images, training_seconds
    )
    log.info("wrote %s", write_artifact(generator, config, metadata, device))
    return 0


@distributed.entry_point
def main(argv: list[str] | None = None) -> int:
    """``run`` the config the command line gives."""
    config = parse_config(TrainConfig, argv, __doc__)
    with invoked_with(argv):
        return run(config)


if __name__ == "__main__":
    raise SystemExit(main())
