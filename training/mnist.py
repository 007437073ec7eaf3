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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset
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
    add_run_arguments,
    epoch_count,
    resume_from,
    run_provenance,
    save_trained_model,
    seed_everything,
    start_run,
)
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
class TrainConfig:
    epochs: int = 24
    batch_size: int = 128
    max_learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    service_fraction: float = 0.25
    # The released model: 70 % of the training digits redrawn as canvas strokes, which
    # took drawn digits from 98.59 % to 99.01 % (README, drawn digits).
    canvas_fraction: float = 0.7
    seed: int = 0
    smoke: bool = False


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
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(
        parser,
        model_name=MNIST_CLASSIFIER,
        data_help="directory holding MNIST/raw",
        smoke_help=f"{SMOKE_TRAIN_BATCHES} batches of one epoch and "
        f"{SMOKE_EVAL_IMAGES} evaluation images",
        seed=defaults.seed,
        epochs=defaults.epochs,
        batch_size=defaults.batch_size,
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=defaults.max_learning_rate,
        help="peak learning rate of the one-cycle schedule",
    )
    parser.add_argument(
        "--service-fraction",
        type=float,
        default=defaults.service_fraction,
        help="fraction of training images first passed through the service's "
        "image preprocessing (default: %(default)s)",
    )
    parser.add_argument(
        "--canvas-fraction",
        type=float,
        default=defaults.canvas_fraction,
        help="fraction of training images redrawn as canvas strokes of a random width "
        "(default: %(default)s)",
    )
    return parser


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


def train(config: TrainConfig, args: argparse.Namespace, device: torch.device):
    augmented = transforms.Compose(
        [
            CanvasStrokes(config.canvas_fraction),
            ServicePreprocessing(config.service_fraction),
            mnist_transform(augment=True),
        ]
    )
    train_set, validation_set = mnist_train_validation(
        args.data_dir, train_transform=augmented, seed=config.seed
    )
    eval_limit = SMOKE_EVAL_IMAGES if config.smoke else None
    validation_loader = _evaluation_loader(validation_set, eval_limit)
    context = distributed.current()
    # Under torchrun each rank loads its share of every global batch.
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
    steps_per_epoch = SMOKE_TRAIN_BATCHES if config.smoke else len(train_loader)

    network = DigitClassifier(DigitClassifierConfig()).to(device)
    model = distributed.wrap(network, context, device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.max_learning_rate, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.max_learning_rate,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    history: dict[str, list[float]] = {
        "train_loss": [],
        "validation_loss": [],
        "train_accuracy": [],
        "validation_accuracy": [],
    }
    best = {"accuracy": -1.0, "epoch": 0, "state": None}
    start = 1
    resumed = resume_from(args, {**config.__dict__, "data_dir": str(args.data_dir)})
    if resumed:
        network.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        schedule.load_state_dict(resumed["schedule"])
        train_loader.generator.set_state(resumed["loader_generator"])
        history, best, start = resumed["history"], resumed["best"], resumed["epoch"] + 1

    for epoch in range(start, config.epochs + 1):
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        seen, correct, loss_sum = 0, 0, 0.0
        progress = tqdm(
            train_loader,
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            leave=False,
            disable=not context.is_main,
        )
        for step, (images, labels) in enumerate(progress):
            if step >= steps_per_epoch:
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
        distributed.broadcast_buffers(network)
        validation = evaluate(network, validation_loader, device)
        history["train_loss"].append(loss_sum / seen)
        history["train_accuracy"].append(correct / seen)
        history["validation_loss"].append(validation["loss"])
        history["validation_accuracy"].append(validation["accuracy"])
        log.info(
            "epoch %d: train loss %.4f acc %.4f | validation loss %.4f acc %.4f",
            epoch,
            loss_sum / seen,
            correct / seen,
            validation["loss"],
            validation["accuracy"],
        )
        if validation["accuracy"] > best["accuracy"]:
            best = {
                "accuracy": validation["accuracy"],
                "epoch": epoch,
                "state": copy.deepcopy(network.state_dict()),
            }
        distributed.save_checkpoint(
            args.checkpoint_dir,
            {
                "settings": {**config.__dict__, "data_dir": str(args.data_dir)},
                "epoch": epoch,
                "model": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                # Without torchrun the loader's shuffling generator is the sampler state;
                # DistributedSampler's order follows from the seed and the epoch alone.
                "loader_generator": train_loader.generator.get_state(),
                "history": history,
                "best": best,
            },
        )

    network.load_state_dict(best["state"])
    return network.eval(), history, best, len(train_set)


@distributed.entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = start_run(args)
    config = TrainConfig(
        epochs=epoch_count(args),
        batch_size=args.batch_size,
        max_learning_rate=args.lr,
        service_fraction=args.service_fraction,
        canvas_fraction=args.canvas_fraction,
        seed=args.seed,
        smoke=args.smoke,
    )
    seed_everything(config.seed)
    log.info("training %s on %s with %s", MNIST_CLASSIFIER, device, config)
    started = time.perf_counter()

    model, history, best, train_size = train(config, args, device)
    training_seconds = time.perf_counter() - started

    eval_limit = SMOKE_EVAL_IMAGES if config.smoke else None
    test = evaluate(
        model,
        _evaluation_loader(mnist_test_set(args.data_dir, mnist_transform(False)), eval_limit),
        device,
    )
    service_test = evaluate(
        model, service_preprocessed_test_batches(args.data_dir, eval_limit), device
    )
    distributed.barrier()
    if not distributed.current().is_main:
        return 0
    log.info(
        "test accuracy %.4f (%d images); through service preprocessing %.4f",
        test["accuracy"],
        test["count"],
        service_test["accuracy"],
    )

    metrics = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_images": test["count"],
        "test_accuracy_service_preprocessing": service_test["accuracy"],
        "test_loss_service_preprocessing": service_test["loss"],
        "validation_accuracy": best["accuracy"],
        "best_epoch": best["epoch"],
        "test_per_class_accuracy": {
            label: float(test["confusion"][i, i] / max(test["confusion"][i].sum(), 1))
            for i, label in enumerate(DIGIT_LABELS)
        },
        "test_confusion_matrix": test["confusion"].tolist(),
    }
    metadata = {
        "smoke": config.smoke,
        "metrics": metrics,
        "history": history,
        "training": {
            **run_provenance(device, argv),
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "optimizer": f"AdamW(weight_decay={config.weight_decay}) + OneCycleLR("
            f"max_lr={config.max_learning_rate})",
            "label_smoothing": config.label_smoothing,
            "augmentation": "RandomAffine(degrees=10, translate=0.1, scale=0.9-1.1)",
            "service_preprocessing_fraction": config.service_fraction,
            "canvas_stroke_fraction": config.canvas_fraction,
            "seed": config.seed,
            "wall_seconds": round(training_seconds, 1),
        },
        "dataset": {
            "name": "MNIST",
            "train_images": train_size,
            "validation_images": MNIST_VALIDATION_SIZE,
            "test_images": test["count"],
            "selection": "best epoch by validation accuracy",
        },
        "preprocessing": {
            "mean": MNIST_MEAN,
            "std": MNIST_STD,
            "input": "N×1×28×28 float32, white ink on black, (pixel/255 - mean) / std",
            "image_preprocessing": "models.preprocessing.digit_tensor_from_image",
        },
    }
    title = (
        f"{MNIST_CLASSIFIER}{' (smoke)' if config.smoke else ''}: test accuracy "
        f"{test['accuracy']:.2%}, through service preprocessing {service_test['accuracy']:.2%}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        report = reports.save_report(
            Path(scratch) / REPORT_FILE,
            title,
            history,
            [lambda ax: reports.draw_confusion_matrix(ax, test["confusion"], DIGIT_LABELS)],
        )
        destination = save_trained_model(
            get_spec(MNIST_CLASSIFIER),
            args.output_dir or artifacts_root(),
            module=model.cpu(),
            config=model.config,
            metadata=metadata,
            extra_files={REPORT_FILE: report},
        )
    log.info("wrote %s", destination)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
