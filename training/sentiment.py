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
import logging
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    add_run_arguments,
    epoch_count,
    resume_from,
    run_provenance,
    save_trained_model,
    seed_everything,
    start_run,
)
from training.data import LabelledText, read_sst2
from training.reports import plot_curves

log = logging.getLogger(__name__)

SMOKE_TRAIN_SIZE = 2_000
SMOKE_EVAL_SIZE = 200
EVAL_BATCH_SIZE = 256


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a run besides the model config; recorded in the metadata."""

    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-3
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    word_dropout: float = 0.25
    gradient_clip: float = 1.0
    ema_decay: float = 0.999
    min_count: int = 6
    # Distillation (used only with teachers): the share of the loss given to
    # matching the teachers, and the softmax temperature both sides use.
    distillation_weight: float = 0.5
    temperature: float = 2.0


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


def train_one_seed(
    seed: int,
    model_config: SentimentClassifierConfig,
    config: TrainConfig,
    train: EncodedSplit,
    dev: EncodedSplit,
    device: torch.device,
    teachers: Sequence[Teacher] = (),
    args: argparse.Namespace | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, list[float]]]:
    """Train one model; return the best-on-dev EMA weights, their dev scores and the history.

    With ``teachers``, the loss mixes the label's cross-entropy with the
    distillation loss, weighted by ``config.distillation_weight``. ``args``
    carries ``--checkpoint-dir`` / ``--resume`` (one checkpoint file per seed).

    Under torchrun every rank draws the same global batches and word dropout
    (both seeded with ``seed``) and trains on its share of each batch.
    """
    seed_everything(seed)
    context = distributed.current()
    network = SentimentClassifier(model_config).to(device)
    model = distributed.wrap(network, context, device)
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
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = max(1, int(config.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total_steps, warmup_steps)
    )
    loss_function = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    batch_order = random.Random(seed)
    dropout_generator = torch.Generator().manual_seed(seed)

    history: dict[str, list[float]] = {
        "train_loss": [],
        "train_accuracy": [],
        "dev_loss": [],
        "dev_accuracy": [],
    }
    best: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    checkpoint_dir = args.checkpoint_dir if args else None
    checkpoint_name = f"checkpoint-seed{seed}.pt"
    settings = {**asdict(config), **asdict(model_config), "seed": seed, "examples": len(train)}
    start = 1
    resumed = resume_from(args, settings, checkpoint_name) if args else None
    if resumed:
        network.load_state_dict(resumed["model"])
        average.load_state_dict(resumed["average"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        version, internal, gauss = resumed["batch_order"]
        batch_order.setstate((version, tuple(internal), gauss))
        dropout_generator.set_state(resumed["dropout_generator"])
        history, best, start = resumed["history"], resumed["best"], resumed["epoch"] + 1
    for epoch in range(start, config.epochs + 1):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        batches = length_bucketed_batches(train, config.batch_size, batch_order)
        progress = tqdm(
            batches,
            desc=f"seed {seed} epoch {epoch}/{config.epochs}",
            leave=False,
            mininterval=2.0,
            disable=not context.is_main,
        )
        for indices in progress:
            token_ids, lengths, labels = pad_batch(train, indices)
            dropped = word_dropout_mask(token_ids, lengths, config.word_dropout, dropout_generator)
            # Weight of this rank's part in the global batch's mean loss (1 in one process):
            # DDP averages over ranks, and the last batch need not split evenly.
            share = len(distributed.shard(context, indices)) * context.world_size / len(indices)
            if context.world_size > 1:
                indices, token_ids, lengths, labels, dropped = (
                    distributed.shard(context, part)
                    for part in (indices, token_ids, lengths, labels, dropped)
                )
                # As wide as this part's longest phrase, like the teachers' own batches.
                width = int(lengths.max())
                token_ids, dropped = token_ids[:, :width], dropped[:, :width]
            token_ids = token_ids.masked_fill(dropped, UNK_ID)
            token_ids, lengths, labels = token_ids.to(device), lengths.to(device), labels.to(device)
            logits = model(token_ids, lengths)
            loss = loss_function(logits, labels)
            if teachers:
                targets = teacher_targets(teachers, indices, dropped, config.temperature, device)
                weight = config.distillation_weight
                loss = (1 - weight) * loss + weight * distillation_loss(
                    logits, targets, config.temperature
                )
            optimizer.zero_grad(set_to_none=True)
            (loss * share if context.world_size > 1 else loss).backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
            optimizer.step()
            scheduler.step()
            average.update_parameters(network)
            loss_sum += loss.item() * len(indices)
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += len(indices)
            progress.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
        loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen])
        # The models are identical on every rank, so each scores all of dev itself.
        scores = evaluate(average.module, dev, device)
        history["train_loss"].append(loss_sum / seen)
        history["train_accuracy"].append(correct / seen)
        history["dev_loss"].append(scores["loss"])
        history["dev_accuracy"].append(scores["accuracy"])
        log.info(
            "seed %d epoch %d: train loss %.4f acc %.4f | dev (EMA) loss %.4f acc %.4f",
            seed,
            epoch,
            loss_sum / seen,
            correct / seen,
            scores["loss"],
            scores["accuracy"],
        )
        if best is None or scores["accuracy"] > best[1]["dev_accuracy"]:
            weights = {k: v.detach().cpu().clone() for k, v in average.module.state_dict().items()}
            best = (
                weights,
                {
                    "seed": seed,
                    "best_epoch": epoch,
                    "dev_accuracy": scores["accuracy"],
                    "dev_loss": scores["loss"],
                },
            )
        distributed.save_checkpoint(
            checkpoint_dir,
            {
                "settings": settings,
                "epoch": epoch,
                "model": network.state_dict(),
                "average": average.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "batch_order": batch_order.getstate(),
                "dropout_generator": dropout_generator.get_state(),
                "history": history,
                "best": best,
            },
            checkpoint_name,
        )
    assert best is not None
    return best[0], best[1], history


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    model_defaults = SentimentClassifierConfig(vocab_size=0)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_run_arguments(
        parser,
        model_name=SENTIMENT_CLASSIFIER,
        data_help="folder holding SST-2/{train,dev,test}.tsv",
        smoke_help=f"a quick end-to-end run on {SMOKE_TRAIN_SIZE} training phrases",
        seed=0,
        epochs=defaults.epochs,
        batch_size=defaults.batch_size,
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="train one model per seed and keep the best on dev"
    )
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    parser.add_argument("--word-dropout", type=float, default=defaults.word_dropout)
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    parser.add_argument(
        "--min-count",
        type=int,
        default=None,
        help=f"keep training tokens seen at least this often (default: {defaults.min_count}; "
        "1 with --smoke)",
    )
    parser.add_argument(
        "--teachers",
        type=Path,
        nargs="+",
        default=[],
        help="trained sentiment artifact directories to distil from (their ensemble)",
    )
    parser.add_argument(
        "--distillation-weight",
        type=float,
        default=defaults.distillation_weight,
        help="share of the loss spent matching the teachers (with --teachers)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=defaults.temperature,
        help="softmax temperature of the distillation loss (with --teachers)",
    )
    parser.add_argument("--embedding-dim", type=int, default=model_defaults.embedding_dim)
    parser.add_argument("--hidden-size", type=int, default=model_defaults.hidden_size)
    parser.add_argument("--embedding-dropout", type=float, default=model_defaults.embedding_dropout)
    parser.add_argument("--output-dropout", type=float, default=model_defaults.output_dropout)
    return parser


@distributed.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    device = start_run(args)
    seeds = args.seeds or [args.seed]

    splits = {name: read_sst2(args.data_dir, name) for name in ("train", "dev", "test")}
    if args.smoke:
        # A fixed, shuffled subset: real data, end to end, in seconds.
        subset = random.Random(0)
        splits = {
            "train": subset.sample(splits["train"], SMOKE_TRAIN_SIZE),
            "dev": subset.sample(splits["dev"], SMOKE_EVAL_SIZE),
            "test": subset.sample(splits["test"], SMOKE_EVAL_SIZE),
        }
    config = TrainConfig(
        epochs=epoch_count(args),
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        word_dropout=args.word_dropout,
        ema_decay=min(args.ema_decay, 0.9) if args.smoke else args.ema_decay,
        min_count=args.min_count or (1 if args.smoke else TrainConfig.min_count),
        distillation_weight=args.distillation_weight,
        temperature=args.temperature,
    )
    vocabulary = Vocabulary.build((row.tokens for row in splits["train"]), config.min_count)
    model_config = SentimentClassifierConfig(
        vocab_size=len(vocabulary),
        embedding_dim=args.embedding_dim,
        hidden_size=args.hidden_size,
        embedding_dropout=args.embedding_dropout,
        output_dropout=args.output_dropout,
    )
    encoded = {name: encode_split(vocabulary, rows) for name, rows in splits.items()}
    log.info(
        "SST-2 %s; vocabulary %d tokens (min count %d); device %s, %d threads",
        {name: len(rows) for name, rows in splits.items()},
        len(vocabulary),
        config.min_count,
        device,
        torch.get_num_threads(),
    )

    teachers = load_teachers(args.teachers, splits, device)
    distillation: dict[str, Any] | None = None
    if teachers:
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

    results = [
        train_one_seed(
            seed, model_config, config, encoded["train"], encoded["dev"], device, teachers, args
        )
        for seed in seeds
    ]
    # Seed selection, like epoch selection, looks at dev only.
    weights, selection, history = max(results, key=lambda result: result[1]["dev_accuracy"])
    model = SentimentClassifier(model_config)
    model.load_state_dict(weights)
    model.to(device)
    test_scores = evaluate(model, encoded["test"], device)
    wall_seconds = time.perf_counter() - started
    log.info(
        "selected seed %d epoch %d: dev accuracy %.4f, test accuracy %.4f (%.0f s)",
        selection["seed"],
        selection["best_epoch"],
        selection["dev_accuracy"],
        test_scores["accuracy"],
        wall_seconds,
    )

    distributed.barrier()
    if not distributed.current().is_main:
        return 0
    spec = get_spec(SENTIMENT_CLASSIFIER)
    metadata = {
        "smoke": args.smoke,
        "metrics": {
            "dev_accuracy": selection["dev_accuracy"],
            "dev_loss": selection["dev_loss"],
            "test_accuracy": test_scores["accuracy"],
            "test_loss": test_scores["loss"],
            "selected_epoch": selection["best_epoch"],
            "selected_seed": selection["seed"],
            "dev_accuracy_per_seed": {str(r[1]["seed"]): r[1]["dev_accuracy"] for r in results},
        },
        "training": {
            **run_provenance(device, None if argv is None else list(argv)),
            "epochs": config.epochs,
            "seeds": seeds,
            "wall_seconds": round(wall_seconds, 1),
            "hyperparameters": asdict(config),
            "history": {str(r[1]["seed"]): r[2] for r in results},
        },
        "dataset": {
            "name": "SST-2 (GLUE), binary sentiment",
            "data_dir": str(args.data_dir),
            "sizes": {name: len(rows) for name, rows in splits.items()},
            "selection_split": "dev",
            "vocabulary": "train split only",
        },
        "distillation": distillation,
        "vocab_size": len(vocabulary),
        "vocab_min_count": config.min_count,
        "tokenizer": "models.tokenizer.tokenize (lower-cased, PTB-style); "
        "Vocabulary.encode with the stem / compound-part fallback for unknown words",
    }
    with tempfile.TemporaryDirectory() as scratch:
        vocab_path = Path(scratch) / VOCAB_FILE
        vocabulary.save(vocab_path)
        report_path = Path(scratch) / REPORT_FILE
        write_report(history, report_path, selection)
        destination = save_trained_model(
            spec,
            args.output_dir,
            module=model,
            config=model_config,
            metadata=metadata,
            extra_files={VOCAB_FILE: vocab_path, REPORT_FILE: report_path},
        )
    log.info("wrote %s", destination)
    return 0


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
