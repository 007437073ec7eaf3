"""Train the SST-2 sentiment classifier (embedding → BiLSTM → max-pool → linear) from scratch.

    python -m training.sentiment                 # full run → models/artifacts/sst2-bilstm
    python -m training.sentiment --seeds 0 1     # train two seeds, keep the better one on dev
    python -m training.sentiment --smoke --output-dir /tmp/artifacts   # seconds, data subset
    python -m training.sentiment --teachers runs/a/sst2-bilstm runs/b/sst2-bilstm
                                                 # distil an ensemble of trained models

The vocabulary is built from the SST-2 training split only and saved with the
weights. The model trains on all 67,349 labelled training phrases; the epoch
(and, with several ``--seeds``, the seed) is chosen on the 872 dev sentences
only, and the chosen model is evaluated once on the 1,821 test sentences.

No pretrained embeddings are used; the accuracy comes from regularisation:
embedding dropout plus word dropout (tokens replaced by ``<unk>``, which also
teaches the model what an unknown word at serving time looks like), output
dropout, weight decay, label smoothing, gradient clipping, a warm-up + cosine
learning-rate schedule and an exponential moving average (EMA) of the weights,
which is what gets evaluated and saved.

With ``--teachers``, the model is also taught by an ensemble of already trained
sentiment artifacts (knowledge distillation): besides the phrase label it
matches the ensemble's averaged, temperature-softened prediction for the very
same word-dropped input. The teachers may be larger than the released size
budget allows; only the student, at the size given here, is saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from models.artifacts import REPORT_FILE, VOCAB_FILE, config_to_dict
from models.preprocessing import encode_texts
from models.registry import SENTIMENT_CLASSIFIER, get_spec, store_version
from models.sentiment import SentimentClassifier, SentimentClassifierConfig
from models.tokenizer import UNK_ID, Vocabulary
from training import distributed
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
from training.data import LabelledText, read_sst2
from training.reports import plot_curves

log = logging.getLogger(__name__)

SMOKE_TRAIN_SIZE = 2_000
SMOKE_EVAL_SIZE = 200
EVAL_BATCH_SIZE = 256


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Everything that shapes a run; recorded in the metadata."""

    DEFAULT_EPOCHS: ClassVar[int] = 8
    DEFAULT_MIN_COUNT: ClassVar[int] = 6
    DATA: ClassVar[str] = "SST-2/{train,dev,test}.tsv"
    SMOKE: ClassVar[str] = f"a quick end-to-end run on {SMOKE_TRAIN_SIZE} training phrases"

    batch_size: int = field(default=64, metadata={"help": "phrases per step, over all processes"})
    seeds: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "train one model per seed and keep the best on dev (default: --seed)",
            # Each seed has its own checkpoint, which records that seed.
            "plumbing": True,
        },
    )
    learning_rate: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(
        default=1e-3, metadata={"help": "AdamW weight decay, on weight matrices only"}
    )
    warmup_fraction: float = field(
        default=0.05, metadata={"help": "share of the steps spent warming the learning rate up"}
    )
    label_smoothing: float = field(
        default=0.1, metadata={"help": "label smoothing of the cross-entropy"}
    )
    word_dropout: float = field(
        default=0.25, metadata={"help": "probability of replacing a training token by <unk>"}
    )
    gradient_clip: float = field(default=1.0, metadata={"help": "largest gradient norm"})
    ema_decay: float = field(
        default=0.999,
        metadata={
            "help": "decay of the weight average that is evaluated and saved "
            "(0.9 at most with --smoke)"
        },
    )
    min_count: int | None = field(
        default=None,
        metadata={
            "help": "keep training tokens seen at least this often "
            "(default: {DEFAULT_MIN_COUNT}; 1 with --smoke)"
        },
    )
    teachers: tuple[Path, ...] = field(
        default=(),
        metadata={"help": "trained sentiment artifact directories to distil from (their ensemble)"},
    )
    # Distillation (used only with teachers): the share of the loss given to
    # matching the teachers, and the softmax temperature both sides use.
    distillation_weight: float = field(
        default=0.5,
        metadata={"help": "share of the loss spent matching the teachers (with --teachers)"},
    )
    temperature: float = field(
        default=2.0,
        metadata={"help": "softmax temperature of the distillation loss (with --teachers)"},
    )
    embedding_dim: int = field(
        default=SentimentClassifierConfig.embedding_dim, metadata={"help": "model: embedding size"}
    )
    hidden_size: int = field(
        default=SentimentClassifierConfig.hidden_size,
        metadata={"help": "model: LSTM units per direction"},
    )
    embedding_dropout: float = field(
        default=SentimentClassifierConfig.embedding_dropout,
        metadata={"help": "model: dropout on the embeddings"},
    )
    output_dropout: float = field(
        default=SentimentClassifierConfig.output_dropout,
        metadata={"help": "model: dropout before the linear layer"},
    )

    def resolved(self) -> Self:
        """Also settles the smoke run's vocabulary (every token) and its shorter
        weight average (a few steps would leave it near the initial weights)."""
        config = super().resolved()
        return dataclasses.replace(
            config,
            ema_decay=min(config.ema_decay, 0.9) if config.smoke else config.ema_decay,
            min_count=config.min_count or (1 if config.smoke else self.DEFAULT_MIN_COUNT),
        )

    def model_config(self, vocab_size: int) -> SentimentClassifierConfig:
        return SentimentClassifierConfig(
            vocab_size=vocab_size,
            embedding_dim=self.embedding_dim,
            hidden_size=self.hidden_size,
            embedding_dropout=self.embedding_dropout,
            output_dropout=self.output_dropout,
        )


@dataclass
class EncodedSplit:
    """A split as id lists and labels, ready to batch."""

    ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def encode_split(vocabulary: Vocabulary, rows: Sequence[LabelledText]) -> EncodedSplit:
    return EncodedSplit(
        [vocabulary.encode(row.tokens) for row in rows], [row.label for row in rows]
    )


def length_bucketed_batches(
    split: EncodedSplit, batch_size: int, generator: random.Random
) -> list[list[int]]:
    """Index batches of similar length (little padding, so fast on a CPU), in random order.

    Sorting by length plus a random tie-break key keeps batches different from
    epoch to epoch; the batch order is then shuffled as a whole.
    """
    order = sorted(range(len(split)), key=lambda i: (len(split.ids[i]), generator.random()))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    generator.shuffle(batches)
    return batches


def pad_batch(
    split: EncodedSplit, indices: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ids, lengths and labels of some examples."""
    token_ids, lengths = encode_texts([split.ids[i] for i in indices])
    labels = torch.tensor([split.labels[i] for i in indices], dtype=torch.int64)
    return token_ids, lengths, labels


def word_dropout_mask(
    token_ids: torch.Tensor,
    lengths: torch.Tensor,
    rate: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Real (non-padding) positions to replace by ``<unk>``, each with probability ``rate``."""
    steps = torch.arange(token_ids.shape[1]).unsqueeze(0)
    real = steps < lengths.unsqueeze(1)
    return real & (torch.rand(token_ids.shape, generator=generator) < rate)


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, split: EncodedSplit, device: torch.device
) -> torch.Tensor:
    """Class probabilities for every example of a split, in the split's order (eval mode)."""
    model.eval()
    order = sorted(range(len(split)), key=lambda i: len(split.ids[i]))
    probabilities = torch.empty(len(split), SentimentClassifierConfig.num_classes)
    for start in range(0, len(order), EVAL_BATCH_SIZE):
        indices = order[start : start + EVAL_BATCH_SIZE]
        token_ids, lengths, _ = pad_batch(split, indices)
        logits = model(token_ids.to(device), lengths.to(device))
        probabilities[indices] = logits.softmax(dim=1).cpu()
    return probabilities


def score(probabilities: torch.Tensor, split: EncodedSplit) -> dict[str, float]:
    """Accuracy and mean cross-entropy of predicted probabilities against a split's labels."""
    labels = torch.tensor(split.labels)
    picked = probabilities.gather(1, labels.unsqueeze(1)).squeeze(1)
    return {
        "accuracy": int((probabilities.argmax(dim=1) == labels).sum()) / len(split),
        "loss": float(-picked.clamp_min(1e-12).log().double().mean()),
    }


def evaluate(model: nn.Module, split: EncodedSplit, device: torch.device) -> dict[str, float]:
    """Accuracy and mean cross-entropy over a whole split."""
    return score(predict_probabilities(model, split, device), split)


@dataclass
class Teacher:
    """A trained sentiment artifact whose predictions a student learns to match.

    A teacher keeps its own vocabulary, so every split is also encoded in it;
    the student and its teachers see the same examples with the same words
    dropped, each through its own ids.
    """

    directory: Path
    module: nn.Module
    splits: dict[str, EncodedSplit]
    metadata: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """What identifies the teacher after its directory is gone: its content (the
        store version and the sha256 of every file), how it was made and how it scored."""
        return {
            "version": store_version(self.metadata),
            "sha256": self.metadata["files"],
            "config": config_to_dict(self.module.config),
            "vocab_min_count": self.metadata.get("vocab_min_count"),
            "dev_accuracy": self.metadata["metrics"]["dev_accuracy"],
            "test_accuracy": self.metadata["metrics"]["test_accuracy"],
            "command": self.metadata["training"]["command"],
        }


def load_teachers(
    directories: Sequence[Path],
    splits: dict[str, Sequence[LabelledText]],
    device: torch.device,
) -> list[Teacher]:
    spec = get_spec(SENTIMENT_CLASSIFIER)
    teachers = []
    for directory in directories:
        artifact = spec.load_artifact(Path(directory))
        if artifact.metadata.get("smoke"):
            log.warning("teacher %s is a smoke-mode artifact", directory)
        vocabulary = Vocabulary.load(artifact.path(VOCAB_FILE))
        teachers.append(
            Teacher(
                directory=Path(directory),
                module=spec.load_module(artifact, device),
                splits={name: encode_split(vocabulary, rows) for name, rows in splits.items()},
                metadata=artifact.metadata,
            )
        )
    return teachers


def ensemble_scores(
    teachers: Sequence[Teacher], split_name: str, device: torch.device
) -> dict[str, float]:
    """How the teachers do together, their probabilities averaged."""
    probabilities = torch.stack(
        [predict_probabilities(t.module, t.splits[split_name], device) for t in teachers]
    ).mean(dim=0)
    return score(probabilities, teachers[0].splits[split_name])


@torch.no_grad()
def teacher_targets(
    teachers: Sequence[Teacher],
    indices: Sequence[int],
    dropped: torch.Tensor,
    temperature: float,
    device: torch.device,
) -> torch.Tensor:
    """The teachers' averaged softened prediction for a batch, with the student's words dropped."""
    total = None
    for teacher in teachers:
        token_ids, lengths, _ = pad_batch(teacher.splits["train"], indices)
        token_ids = token_ids.masked_fill(dropped, UNK_ID)
        logits = teacher.module(token_ids.to(device), lengths.to(device))
        probabilities = (logits / temperature).softmax(dim=1)
        total = probabilities if total is None else total + probabilities
    assert total is not None
    return total / len(teachers)


def distillation_loss(
    student_logits: torch.Tensor, teacher_probabilities: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher ‖ student) at a temperature, scaled by T² so its gradients keep their size."""
    log_probabilities = nn.functional.log_softmax(student_logits / temperature, dim=1)
    divergence = nn.functional.kl_div(
        log_probabilities, teacher_probabilities, reduction="batchmean"
    )
    return divergence * temperature**2


def weight_average(module: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``module``'s weights (and buffers), starting from
    its current ones.

    Early on the average would be dominated by the random initialisation, so the
    decay warms up: after ``t`` updates it is ``min(decay, (1 + t) / (10 + t))``.
    """

    def warmed_up(averaged: torch.Tensor, current: torch.Tensor, count: torch.Tensor):
        updates = int(count)  # the initial copy counts as one
        return averaged.lerp(current, 1 - min(decay, (1 + updates) / (10 + updates)))

    average = AveragedModel(module, avg_fn=warmed_up, use_buffers=True).eval()
    average.update_parameters(module)  # the first update copies
    return average


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class SeedRun:
    """One seed's training: the model (DDP-wrapped under torchrun), its weight average,
    the optimiser and schedule, and the generators that draw the batch order and
    the word dropout. ``state_dict`` is what a checkpoint saves of it."""

    seed: int
    network: SentimentClassifier
    model: nn.Module
    average: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_function: nn.Module
    batch_order: random.Random
    dropout_generator: torch.Generator

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.network.state_dict(),
            "average": self.average.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "batch_order": self.batch_order.getstate(),
            "dropout_generator": self.dropout_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["model"])
        self.average.load_state_dict(state["average"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        version, internal, gauss = state["batch_order"]
        self.batch_order.setstate((version, tuple(internal), gauss))
        self.dropout_generator.set_state(state["dropout_generator"])


def start_seed(
    seed: int,
    model_config: SentimentClassifierConfig,
    config: TrainConfig,
    examples: int,
    device: torch.device,
) -> SeedRun:
    """A freshly initialised model (seeded with ``seed``) and everything that trains it."""
    seed_everything(seed)
    network = SentimentClassifier(model_config).to(device)
    model = distributed.wrap(network, distributed.current(), device)
    average = weight_average(network, config.ema_decay)
    # Weight decay on matrices only: biases and the embedding's padding row stay untouched.
    decayed = [p for name, p in model.named_parameters() if p.dim() > 1]
    plain = [p for name, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": config.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
    )
    total_steps = math.ceil(examples / config.batch_size) * config.epochs
    warmup_steps = max(1, int(config.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total_steps, warmup_steps)
    )
    return SeedRun(
        seed=seed,
        network=network,
        model=model,
        average=average,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_function=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        batch_order=random.Random(seed),
        dropout_generator=torch.Generator().manual_seed(seed),
    )


def shard_batch(context: distributed.Context, *parts: Sequence) -> list:
    """This rank's share of every part of a global batch; the padded ones cut to the
    width of the share's longest phrase, like the teachers' own batches.

    ``parts``: indices, token ids, lengths, labels and the word-dropout mask."""
    indices, token_ids, lengths, labels, dropped = (distributed.shard(context, p) for p in parts)
    width = int(lengths.max())
    return [indices, token_ids[:, :width], lengths, labels, dropped[:, :width]]


def distilled(
    label_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, config: TrainConfig
) -> torch.Tensor:
    """The label's loss mixed with matching the teachers' softened prediction ``targets``."""
    weight = config.distillation_weight
    matching = distillation_loss(logits, targets, config.temperature)
    return (1 - weight) * label_loss + weight * matching


def training_step(
    run: SeedRun,
    train: EncodedSplit,
    indices: list[int],
    config: TrainConfig,
    teachers: Sequence[Teacher],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step on a global batch, of which this rank computes its share;
    the share's loss, logits and labels."""
    context = distributed.current()
    token_ids, lengths, labels = pad_batch(train, indices)
    dropped = word_dropout_mask(token_ids, lengths, config.word_dropout, run.dropout_generator)
    # Weight of this rank's part in the global batch's mean loss (1 in one process):
    # DDP averages over ranks, and the last batch need not split evenly.
    share = len(distributed.shard(context, indices)) * context.world_size / len(indices)
    if context.world_size > 1:
        parts = shard_batch(context, indices, token_ids, lengths, labels, dropped)
        indices, token_ids, lengths, labels, dropped = parts
    token_ids = token_ids.masked_fill(dropped, UNK_ID)
    token_ids, lengths, labels = token_ids.to(device), lengths.to(device), labels.to(device)
    logits = run.model(token_ids, lengths)
    loss = run.loss_function(logits, labels)
    if teachers:
        targets = teacher_targets(teachers, indices, dropped, config.temperature, device)
        loss = distilled(loss, logits, targets, config)
    run.optimizer.zero_grad(set_to_none=True)
    (loss * share if context.world_size > 1 else loss).backward()
    nn.utils.clip_grad_norm_(run.model.parameters(), config.gradient_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.average.update_parameters(run.network)
    return loss, logits, labels


def train_one_epoch(
    run: SeedRun,
    train: EncodedSplit,
    config: TrainConfig,
    teachers: Sequence[Teacher],
    device: torch.device,
    epoch: int,
) -> dict[str, float]:
    """One pass over the training split in length-bucketed batches; the mean loss and
    accuracy over every rank's phrases."""
    run.model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    progress = tqdm(
        length_bucketed_batches(train, config.batch_size, run.batch_order),
        desc=f"seed {run.seed} epoch {epoch}/{config.epochs}",
        leave=False,
        mininterval=2.0,
        disable=not distributed.current().is_main,
    )
    for indices in progress:
        loss, logits, labels = training_step(run, train, indices, config, teachers, device)
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
        progress.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
    loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen])
    return {"loss": loss_sum / seen, "accuracy": correct / seen}


@dataclass
class Progress:
    """One seed's curves and its best epoch so far (the weight average's weights and
    dev scores), kept in its checkpoint; and the epoch to train first."""

    seed: int
    history: dict[str, list[float]] = field(
        default_factory=lambda: {
            "train_loss": [],
            "train_accuracy": [],
            "dev_loss": [],
            "dev_accuracy": [],
        }
    )
    best: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    first_epoch: int = 1

    def record(self, epoch: int, train: dict, dev: dict, average: nn.Module) -> None:
        self.history["train_loss"].append(train["loss"])
        self.history["train_accuracy"].append(train["accuracy"])
        self.history["dev_loss"].append(dev["loss"])
        self.history["dev_accuracy"].append(dev["accuracy"])
        log.info(
            "seed %d epoch %d: train loss %.4f acc %.4f | dev (EMA) loss %.4f acc %.4f",
            self.seed,
            epoch,
            train["loss"],
            train["accuracy"],
            dev["loss"],
            dev["accuracy"],
        )
        if self.best is None or dev["accuracy"] > self.best[1]["dev_accuracy"]:
            weights = {k: v.detach().cpu().clone() for k, v in average.state_dict().items()}
            scores = {"dev_accuracy": dev["accuracy"], "dev_loss": dev["loss"]}
            self.best = (weights, {"seed": self.seed, "best_epoch": epoch, **scores})


def train_one_seed(
    seed: int,
    model_config: SentimentClassifierConfig,
    config: TrainConfig,
    train: EncodedSplit,
    dev: EncodedSplit,
    device: torch.device,
    teachers: Sequence[Teacher] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, list[float]]]:
    """Train one model; return the best-on-dev EMA weights, their dev scores and the history.

    With ``teachers``, the loss mixes the label's cross-entropy with the
    distillation loss, weighted by ``config.distillation_weight``. With
    ``config.checkpoint_dir`` each seed has its own checkpoint file.

    Under torchrun every rank draws the same global batches and word dropout
    (both seeded with ``seed``) and trains on its share of each batch.
    """
    run = start_seed(seed, model_config, config, len(train), device)
    settings = {**config.settings(), **asdict(model_config), "seed": seed, "examples": len(train)}
    checkpoint = f"checkpoint-seed{seed}.pt"
    progress = Progress(seed)
    resumed = resume_from(config, settings, checkpoint)
    if resumed:
        run.load_state_dict(resumed)
        progress = Progress(seed, resumed["history"], resumed["best"], resumed["epoch"] + 1)
    for epoch in range(progress.first_epoch, config.epochs + 1):
        scores = train_one_epoch(run, train, config, teachers, device, epoch)
        # The models are identical on every rank, so each scores all of dev itself.
        progress.record(
            epoch, scores, evaluate(run.average.module, dev, device), run.average.module
        )
        state = {"settings": settings, "epoch": epoch, **run.state_dict()}
        state |= {"history": progress.history, "best": progress.best}
        distributed.save_checkpoint(config.checkpoint_dir, state, checkpoint)
    assert progress.best is not None
    return progress.best[0], progress.best[1], progress.history


def build_parser() -> argparse.ArgumentParser:
    return config_parser(TrainConfig, __doc__)


@dataclass
class Data:
    """The SST-2 splits (a fixed subset with ``--smoke``), the vocabulary built from
    the training split, and the splits encoded in it."""

    splits: dict[str, list[LabelledText]]
    vocabulary: Vocabulary
    encoded: dict[str, EncodedSplit]


def read_data(config: TrainConfig) -> Data:
    splits = {name: read_sst2(config.data_dir, name) for name in ("train", "dev", "test")}
    if config.smoke:
        # A fixed, shuffled subset: real data, end to end, in seconds.
        subset = random.Random(0)
        splits = {
            "train": subset.sample(splits["train"], SMOKE_TRAIN_SIZE),
            "dev": subset.sample(splits["dev"], SMOKE_EVAL_SIZE),
            "test": subset.sample(splits["test"], SMOKE_EVAL_SIZE),
        }
    vocabulary = Vocabulary.build((row.tokens for row in splits["train"]), config.min_count)
    encoded = {name: encode_split(vocabulary, rows) for name, rows in splits.items()}
    return Data(splits, vocabulary, encoded)


def distillation_record(
    teachers: Sequence[Teacher], config: TrainConfig, device: torch.device
) -> dict[str, Any] | None:
    """The teachers, their ensemble's scores and the loss's mix (``None`` without teachers)."""
    if not teachers:
        return None
    distillation = {
        "teachers": [teacher.summary() for teacher in teachers],
        "ensemble": {
            f"{name}_accuracy": ensemble_scores(teachers, name, device)["accuracy"]
            for name in ("dev", "test")
        },
        "distillation_weight": config.distillation_weight,
        "temperature": config.temperature,
    }
    log.info(
        "distilling from %d teachers; their ensemble scores %.4f on dev",
        len(teachers),
        distillation["ensemble"]["dev_accuracy"],
    )
    return distillation


@dataclass
class Outcome:
    """Every seed's result, the one chosen on dev (its weights in ``model``) and its
    test scores."""

    results: list[tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, list[float]]]]
    selection: dict[str, Any]
    history: dict[str, list[float]]
    model: SentimentClassifier
    test: dict[str, float]


def train_seeds(
    config: TrainConfig,
    model_config: SentimentClassifierConfig,
    data: Data,
    teachers: Sequence[Teacher],
    device: torch.device,
) -> Outcome:
    """Train one model per seed, keep the best on dev, score it on test."""
    train, dev = data.encoded["train"], data.encoded["dev"]
    results = [
        train_one_seed(seed, model_config, config, train, dev, device, teachers)
        for seed in config.seeds or (config.seed,)
    ]
    # Seed selection, like epoch selection, looks at dev only.
    weights, selection, history = max(results, key=lambda result: result[1]["dev_accuracy"])
    model = SentimentClassifier(model_config)
    model.load_state_dict(weights)
    model.to(device)
    return Outcome(
        results, selection, history, model, evaluate(model, data.encoded["test"], device)
    )


def artifact_metadata(
    config: TrainConfig,
    device: torch.device,
    data: Data,
    outcome: Outcome,
    distillation: dict[str, Any] | None,
    wall_seconds: float,
) -> dict[str, Any]:
    selection, results = outcome.selection, outcome.results
    return {
        "smoke": config.smoke,
        "metrics": {
            "dev_accuracy": selection["dev_accuracy"],
            "dev_loss": selection["dev_loss"],
            "test_accuracy": outcome.test["accuracy"],
            "test_loss": outcome.test["loss"],
            "selected_epoch": selection["best_epoch"],
            "selected_seed": selection["seed"],
            "dev_accuracy_per_seed": {str(r[1]["seed"]): r[1]["dev_accuracy"] for r in results},
        },
        "training": {
            **run_provenance(device),
            "epochs": config.epochs,
            "seeds": list(config.seeds or (config.seed,)),
            "wall_seconds": round(wall_seconds, 1),
            "hyperparameters": config_record(config),
            "history": {str(r[1]["seed"]): r[2] for r in results},
        },
        "dataset": {
            "name": "SST-2 (GLUE), binary sentiment",
            "data_dir": str(config.data_dir),
            "sizes": {name: len(rows) for name, rows in data.splits.items()},
            "selection_split": "dev",
            "vocabulary": "train split only",
        },
        "distillation": distillation,
        "vocab_size": len(data.vocabulary),
        "vocab_min_count": config.min_count,
        "tokenizer": "models.tokenizer.tokenize (lower-cased, PTB-style); "
        "Vocabulary.encode with the stem / compound-part fallback for unknown words",
    }


def write_artifact(
    config: TrainConfig, outcome: Outcome, vocabulary: Vocabulary, metadata: dict[str, Any]
) -> Path:
    with tempfile.TemporaryDirectory() as scratch:
        vocab_path = Path(scratch) / VOCAB_FILE
        vocabulary.save(vocab_path)
        report_path = Path(scratch) / REPORT_FILE
        write_report(outcome.history, report_path, outcome.selection)
        return save_trained_model(
            get_spec(SENTIMENT_CLASSIFIER),
            config.output_dir,
            module=outcome.model,
            config=outcome.model.config,
            metadata=metadata,
            extra_files={VOCAB_FILE: vocab_path, REPORT_FILE: report_path},
        )


def run(config: TrainConfig) -> int:
    """Train, select, test and write the ``sst2-bilstm`` artifact (rank 0 writes);
    0 on success."""
    started = time.perf_counter()
    config = config.resolved()
    device = start_run(config)
    data = read_data(config)
    model_config = config.model_config(len(data.vocabulary))
    log.info(
        "SST-2 %s; vocabulary %d tokens (min count %d); device %s, %d threads",
        {name: len(rows) for name, rows in data.splits.items()},
        len(data.vocabulary),
        config.min_count,
        device,
        torch.get_num_threads(),
    )
    teachers = load_teachers(config.teachers, data.splits, device)
    distillation = distillation_record(teachers, config, device)
    outcome = train_seeds(config, model_config, data, teachers, device)
    wall_seconds = time.perf_counter() - started
    log.info(
        "selected seed %d epoch %d: dev accuracy %.4f, test accuracy %.4f (%.0f s)",
        outcome.selection["seed"],
        outcome.selection["best_epoch"],
        outcome.selection["dev_accuracy"],
        outcome.test["accuracy"],
        wall_seconds,
    )
    distributed.barrier()
    if not distributed.current().is_main:
        return 0
    metadata = artifact_metadata(config, device, data, outcome, distillation, wall_seconds)
    log.info("wrote %s", write_artifact(config, outcome, data.vocabulary, metadata))
    return 0


@distributed.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """``run`` the config the command line gives."""
    config = parse_config(TrainConfig, argv, __doc__)
    with invoked_with(argv):
        return run(config)


def write_report(history: dict[str, list[float]], path: Path, selection: dict[str, Any]) -> None:
    plot_curves(
        history,
        path,
        f"SST-2 BiLSTM (seed {selection['seed']}): "
        f"best dev accuracy {selection['dev_accuracy']:.4f} at epoch "
        f"{selection['best_epoch']}",
    )


if __name__ == "__main__":
    raise SystemExit(main())
