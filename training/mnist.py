"""Train the MNIST digit classifier and write it as the ``mnist-cnn`` artifact.

    python -m training.mnist                       # full run (CUDA when present)
    python -m training.mnist --threads 1 --canvas-fraction 0.7 --epochs 24   # the release
    python -m training.mnist --smoke --output-dir /tmp/artifacts   # seconds, on the CPU

55,000 training images (light affine augmentation; a fraction also passes
through the service's own image preprocessing, see ``--service-fraction``),
5,000 held out for choosing the best epoch, and the 10,000 test images for the
final numbers. The test set is evaluated twice: as torchvision gives it, and
with every raw test image sent through
``models.preprocessing.digit_tensor_from_image`` exactly as an uploaded image
is in the service. Metrics, provenance and a report PNG (curves and confusion
matrix) are stored inside the artifact.
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import transforms
from tqdm import tqdm

from models.artifacts import REPORT_FILE
from models.digits import DigitClassifier, DigitClassifierConfig
from models.preprocessing import (
    MNIST_MEAN,
    MNIST_STD,
    digit_pixels_from_image,
    digit_tensor_from_image,
)
from models.registry import DIGIT_LABELS, MNIST_CLASSIFIER, artifacts_root, get_spec
from training import distributed, drawn_digits, reports
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
from training.data import (
    MNIST_VALIDATION_SIZE,
    mnist_test_set,
    mnist_train_validation,
    mnist_transform,
)

log = logging.getLogger(__name__)

SMOKE_TRAIN_BATCHES = 4
SMOKE_EVAL_IMAGES = 256


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    DEFAULT_EPOCHS: ClassVar[int] = 24
    DATA: ClassVar[str] = "MNIST/raw"
    SMOKE: ClassVar[str] = (
        f"{SMOKE_TRAIN_BATCHES} batches of one epoch and {SMOKE_EVAL_IMAGES} evaluation images"
    )

    batch_size: int = field(default=128, metadata={"help": "images per step, over all processes"})
    max_learning_rate: float = field(
        default=3e-3,
        metadata={"help": "peak learning rate of the one-cycle schedule", "flag": "--lr"},
    )
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    label_smoothing: float = field(
        default=0.05, metadata={"help": "label smoothing of the cross-entropy"}
    )
    service_fraction: float = field(
        default=0.25,
        metadata={
            "help": "fraction of training images first passed through the service's "
            "image preprocessing"
        },
    )
    # The released model: 70 % of the training digits redrawn as canvas strokes, which
    # took drawn digits from 98.59 % to 99.01 % (docs/models.md, drawn digits).
    canvas_fraction: float = field(
        default=0.7,
        metadata={
            "help": "fraction of training images redrawn as canvas strokes of a random width"
        },
    )


class ServicePreprocessing:
    """With probability ``fraction``, send a raw PIL digit through the service's
    own preprocessing (ink stretch, 20×20 box, centre of mass) before augmentation,
    so the classifier also learns the exact input distribution it is served."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def __call__(self, image: Image.Image) -> Image.Image:
        # ``random`` is seeded by seed_everything; with num_workers=0 the order is fixed.
        if self.fraction <= 0 or random.random() >= self.fraction:
            return image
        pixels = digit_pixels_from_image(image)
        return Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")


class CanvasStrokes:
    """With probability ``fraction``, redraw a raw PIL training digit as a browser canvas
    would: its skeleton traced with one round brush of a random width, on a larger
    canvas at a random size and place (``training.drawn_digits``), then brought back
    to 28×28 by the service's preprocessing. Stroke width and placement vary far more
    than in MNIST, which is what a digit drawn on the web page (``/ui``) looks like."""

    CANVAS_SIDES = (96, 128)
    STROKE_WIDTHS = (0.05, 0.2)

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.fraction <= 0 or random.random() >= self.fraction:
            return image
        ink = drawn_digits.upsampled(np.asarray(image)[np.newaxis]) > drawn_digits.INK_LEVEL
        [skeleton], [depths] = drawn_digits.skeletons(ink), drawn_digits.stroke_depths(ink)
        if not skeleton.any():
            return image
        drawing = drawn_digits.Drawing(
            canvas_side=random.choice(self.CANVAS_SIDES),
            stroke_width=random.uniform(*self.STROKE_WIDTHS),
            digit_height=random.uniform(*drawn_digits.DIGIT_HEIGHTS),
            offset_x=random.random(),
            offset_y=random.random(),
        )
        pixels = digit_pixels_from_image(
            drawn_digits.draw(skeleton, drawing, depths, supersample=2)
        )
        return Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")


def build_parser() -> argparse.ArgumentParser:
    return config_parser(TrainConfig, __doc__)


def _loader(dataset, batch_size: int, *, shuffle: bool, seed: int = 0, sampler=None) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=0,
    )


def _evaluation_loader(dataset, limit: int | None) -> DataLoader:
    """This rank's part of the first ``limit`` images (``evaluate`` adds the parts up)."""
    context = distributed.current()
    return _loader(
        distributed.evaluation_shard(context, _first(dataset, limit)), 1000, shuffle=False
    )


def _first(dataset, count: int | None):
    return dataset if count is None else Subset(dataset, range(min(count, len(dataset))))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device) -> dict:
    """Loss, accuracy and confusion matrix of ``model`` (put in eval mode) over ``batches``,
    summed over the ranks under torchrun (each passes its own part of the images)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, confusion = 0.0, torch.zeros(10, 10, dtype=torch.int64)
    for images, labels in batches:
        logits = model(images.to(device))
        total_loss += loss_fn(logits, labels.to(device)).item()
        predicted = logits.argmax(1).cpu()
        confusion += torch.bincount(labels * 10 + predicted, minlength=100).reshape(10, 10)
    confusion = distributed.all_reduce_sum(confusion)
    (total_loss,) = distributed.all_reduce_sum([total_loss])
    count = int(confusion.sum())
    return {
        "loss": total_loss / max(count, 1),
        "accuracy": float(confusion.diag().sum()) / max(count, 1),
        "count": count,
        "confusion": confusion.numpy(),
    }


def service_preprocessed_test_batches(data_dir: Path, limit: int | None):
    """Raw test images through ``digit_tensor_from_image``, as an uploaded PNG would be."""
    return _evaluation_loader(mnist_test_set(data_dir, transform=digit_tensor_from_image), limit)


def _eval_limit(config: TrainConfig) -> int | None:
    return SMOKE_EVAL_IMAGES if config.smoke else None


@dataclass
class TrainingData:
    """The training split's loader (this rank's share of each global batch) and the
    validation split's, with the number of steps an epoch takes."""

    train_images: int
    train_loader: DataLoader
    # DistributedSampler under torchrun (reshuffled every epoch), else None.
    sampler: DistributedSampler | None
    validation_loader: DataLoader
    steps_per_epoch: int


def training_data(config: TrainConfig) -> TrainingData:
    augmented = transforms.Compose(
        [
            CanvasStrokes(config.canvas_fraction),
            ServicePreprocessing(config.service_fraction),
            mnist_transform(augment=True),
        ]
    )
    train_set, validation_set = mnist_train_validation(
        config.data_dir, train_transform=augmented, seed=config.seed
    )
    context = distributed.current()
    sampler = (
        distributed.training_sampler(context, train_set, config.seed)
        if context.distributed
        else None
    )
    train_loader = _loader(
        train_set,
        distributed.local_batch_size(context, config.batch_size),
        shuffle=True,
        seed=config.seed,
        sampler=sampler,
    )
    return TrainingData(
        train_images=len(train_set),
        train_loader=train_loader,
        sampler=sampler,
        validation_loader=_evaluation_loader(validation_set, _eval_limit(config)),
        steps_per_epoch=SMOKE_TRAIN_BATCHES if config.smoke else len(train_loader),
    )


def train_one_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    data: TrainingData,
    device: torch.device,
    progress_label: str,
) -> dict[str, float]:
    """One pass over the training loader (``steps_per_epoch`` batches); the mean
    loss and accuracy over every rank's images."""
    model.train()
    seen, correct, loss_sum = 0, 0, 0.0
    progress = tqdm(
        data.train_loader,
        total=data.steps_per_epoch,
        desc=progress_label,
        unit="batch",
        leave=False,
        disable=not distributed.current().is_main,
    )
    for step, (images, labels) in enumerate(progress):
        if step >= data.steps_per_epoch:
            break
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        seen += len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        loss_sum += loss.item() * len(labels)
        progress.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
    progress.close()
    seen, correct, loss_sum = distributed.all_reduce_sum([seen, correct, loss_sum])
    return {"loss": loss_sum / seen, "accuracy": correct / seen}


@dataclass
class Progress:
    """What a run has learnt so far, kept in its checkpoint: the curves and the best
    epoch's validation accuracy and weights; and the epoch to train first."""

    history: dict[str, list[float]] = field(
        default_factory=lambda: {
            "train_loss": [],
            "validation_loss": [],
            "train_accuracy": [],
            "validation_accuracy": [],
        }
    )
    best: dict = field(default_factory=lambda: {"accuracy": -1.0, "epoch": 0, "state": None})
    first_epoch: int = 1

    def record(self, epoch: int, train: dict, validation: dict, network: nn.Module) -> None:
        self.history["train_loss"].append(train["loss"])
        self.history["train_accuracy"].append(train["accuracy"])
        self.history["validation_loss"].append(validation["loss"])
        self.history["validation_accuracy"].append(validation["accuracy"])
        log.info(
            "epoch %d: train loss %.4f acc %.4f | validation loss %.4f acc %.4f",
            epoch,
            train["loss"],
            train["accuracy"],
            validation["loss"],
            validation["accuracy"],
        )
        if validation["accuracy"] > self.best["accuracy"]:
            state = copy.deepcopy(network.state_dict())
            self.best = {"accuracy": validation["accuracy"], "epoch": epoch, "state": state}


@dataclass
class Learner:
    """What a checkpoint saves besides the progress: the weights, the optimiser and its
    schedule, and the training loader's shuffling generator."""

    network: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    data: TrainingData

    def state_dict(self) -> dict:
        return {
            "model": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            # Without torchrun the loader's shuffling generator is the sampler state;
            # DistributedSampler's order follows from the seed and the epoch alone.
            "loader_generator": self.data.train_loader.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.data.train_loader.generator.set_state(state["loader_generator"])


def save_checkpoint(config: TrainConfig, epoch: int, learner: Learner, progress: Progress) -> None:
    state = {"settings": config.settings(), "epoch": epoch, **learner.state_dict()}
    state |= {"history": progress.history, "best": progress.best}
    distributed.save_checkpoint(config.checkpoint_dir, state)


def resume(config: TrainConfig, learner: Learner) -> Progress:
    """The checkpoint's progress with its state loaded (``--resume``), else a fresh start."""
    resumed = resume_from(config, config.settings())
    if not resumed:
        return Progress()
    learner.load_state_dict(resumed)
    return Progress(resumed["history"], resumed["best"], resumed["epoch"] + 1)


def train(config: TrainConfig, device: torch.device) -> tuple[nn.Module, Progress, int]:
    """Train for ``config.epochs`` epochs; the model of the epoch with the best
    validation accuracy (in eval mode), the progress and the number of training images."""
    data = training_data(config)
    network = DigitClassifier(DigitClassifierConfig()).to(device)
    model = distributed.wrap(network, distributed.current(), device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.max_learning_rate, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.max_learning_rate,
        epochs=config.epochs,
        steps_per_epoch=data.steps_per_epoch,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    learner = Learner(network, optimizer, schedule, data)
    progress = resume(config, learner)
    for epoch in range(progress.first_epoch, config.epochs + 1):
        if data.sampler is not None:
            data.sampler.set_epoch(epoch)
        label = f"epoch {epoch}/{config.epochs}"
        scores = train_one_epoch(model, loss_fn, optimizer, schedule, data, device, label)
        distributed.broadcast_buffers(network)
        validation = evaluate(network, data.validation_loader, device)
        progress.record(epoch, scores, validation, network)
        save_checkpoint(config, epoch, learner, progress)
    network.load_state_dict(progress.best["state"])
    return network.eval(), progress, data.train_images


def evaluate_on_test(
    model: nn.Module, config: TrainConfig, device: torch.device
) -> tuple[dict, dict]:
    """The test split's scores as torchvision gives it and through the service's
    image preprocessing."""
    plain = mnist_test_set(config.data_dir, mnist_transform(False))
    return (
        evaluate(model, _evaluation_loader(plain, _eval_limit(config)), device),
        evaluate(
            model, service_preprocessed_test_batches(config.data_dir, _eval_limit(config)), device
        ),
    )


def final_metrics(scores: tuple[dict, dict], progress: Progress) -> dict:
    """The test scores (plain and through the service's preprocessing) and the chosen epoch."""
    test_scores, service_test = scores
    confusion = test_scores["confusion"]
    return {
        "test_accuracy": test_scores["accuracy"],
        "test_loss": test_scores["loss"],
        "test_images": test_scores["count"],
        "test_accuracy_service_preprocessing": service_test["accuracy"],
        "test_loss_service_preprocessing": service_test["loss"],
        "validation_accuracy": progress.best["accuracy"],
        "best_epoch": progress.best["epoch"],
        "test_per_class_accuracy": {
            label: float(confusion[i, i] / max(confusion[i].sum(), 1))
            for i, label in enumerate(DIGIT_LABELS)
        },
        "test_confusion_matrix": confusion.tolist(),
    }


def artifact_metadata(
    config: TrainConfig,
    device: torch.device,
    progress: Progress,
    train_images: int,
    scores: tuple[dict, dict],
    training_seconds: float,
) -> dict:
    metrics = final_metrics(scores, progress)
    return {
        "smoke": config.smoke,
        "metrics": metrics,
        "history": progress.history,
        "training": {
            **run_provenance(device),
            "epochs": config.epochs,
            "optimizer": f"AdamW(weight_decay={config.weight_decay}) + OneCycleLR("
            f"max_lr={config.max_learning_rate})",
            "augmentation": "RandomAffine(degrees=10, translate=0.1, scale=0.9-1.1)",
            "hyperparameters": config_record(config),
            "wall_seconds": round(training_seconds, 1),
        },
        "dataset": {
            "name": "MNIST",
            "train_images": train_images,
            "validation_images": MNIST_VALIDATION_SIZE,
            "test_images": metrics["test_images"],
            "selection": "best epoch by validation accuracy",
        },
        "preprocessing": {
            "mean": MNIST_MEAN,
            "std": MNIST_STD,
            "input": "N×1×28×28 float32, white ink on black, (pixel/255 - mean) / std",
            "image_preprocessing": "models.preprocessing.digit_tensor_from_image",
        },
    }


def write_artifact(
    model: nn.Module, config: TrainConfig, metadata: dict, confusion: np.ndarray
) -> Path:
    """The artifact with a report PNG: the curves beside the test confusion matrix."""
    metrics = metadata["metrics"]
    title = (
        f"{MNIST_CLASSIFIER}{' (smoke)' if config.smoke else ''}: test accuracy "
        f"{metrics['test_accuracy']:.2%}, through service preprocessing "
        f"{metrics['test_accuracy_service_preprocessing']:.2%}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        report = reports.save_report(
            Path(scratch) / REPORT_FILE,
            title,
            metadata["history"],
            [lambda ax: reports.draw_confusion_matrix(ax, confusion, DIGIT_LABELS)],
        )
        return save_trained_model(
            get_spec(MNIST_CLASSIFIER),
            config.output_dir or artifacts_root(),
            module=model.cpu(),
            config=model.config,
            metadata=metadata,
            extra_files={REPORT_FILE: report},
        )


def run(config: TrainConfig) -> int:
    """Train, test and write the ``mnist-cnn`` artifact (rank 0 writes); 0 on success."""
    config = config.resolved()
    device = start_run(config)
    seed_everything(config.seed)
    log.info("training %s on %s with %s", MNIST_CLASSIFIER, device, config)
    started = time.perf_counter()
    model, progress, train_images = train(config, device)
    training_seconds = time.perf_counter() - started
    scores = evaluate_on_test(model, config, device)
    distributed.barrier()
    if not distributed.current().is_main:
        return 0
    log.info(
        "test accuracy %.4f (%d images); through service preprocessing %.4f",
        scores[0]["accuracy"],
        scores[0]["count"],
        scores[1]["accuracy"],
    )
    metadata = artifact_metadata(config, device, progress, train_images, scores, training_seconds)
    log.info("wrote %s", write_artifact(model, config, metadata, scores[0]["confusion"]))
    return 0


@distributed.entry_point
def main(argv: list[str] | None = None) -> int:
    """``run`` the config the command line gives."""
    config = parse_config(TrainConfig, argv, __doc__)
    with invoked_with(argv):
        return run(config)


if __name__ == "__main__":
    raise SystemExit(main())
