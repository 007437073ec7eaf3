"""Train the SST-2 sentiment classifier (embedding → BiLSTM → max-pool → linear) from scratch.

    python -m training.sentiment                 # full run → models/artifacts/sst2-bilstm
    python -m training.sentiment --seeds 0 1     # train two seeds, keep the better one on dev
    python -m training.sentiment --smoke --output-dir /tmp/artifacts   # seconds, data subset

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
"""

from __future__ import annotations

import argparse
import copy
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
from tqdm import tqdm

from models.preprocessing import encode_texts
from models.registry import SENTIMENT_CLASSIFIER, get_spec
from models.sentiment import UNK_ID, SentimentClassifier, SentimentClassifierConfig
from models.tokenizer import Vocabulary
from training.common import (
    add_run_arguments,
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
class TrainingConfig:
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
    min_count: int = 3


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


def make_batch(
    split: EncodedSplit,
    indices: Sequence[int],
    word_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ids, lengths and labels; with ``word_dropout`` some real tokens become ``<unk>``."""
    token_ids, lengths = encode_texts([split.ids[i] for i in indices])
    if word_dropout > 0:
        steps = torch.arange(token_ids.shape[1]).unsqueeze(0)
        real = steps < lengths.unsqueeze(1)
        dropped = torch.rand(token_ids.shape, generator=generator) < word_dropout
        token_ids = token_ids.masked_fill(real & dropped, UNK_ID)
    labels = torch.tensor([split.labels[i] for i in indices], dtype=torch.int64)
    return token_ids, lengths, labels


@torch.no_grad()
def evaluate(model: nn.Module, split: EncodedSplit, device: torch.device) -> dict[str, float]:
    """Accuracy and mean cross-entropy over a whole split (model in eval mode)."""
    model.eval()
    order = sorted(range(len(split)), key=lambda i: len(split.ids[i]))
    correct, loss_sum = 0, 0.0
    for start in range(0, len(order), EVAL_BATCH_SIZE):
        token_ids, lengths, labels = make_batch(split, order[start : start + EVAL_BATCH_SIZE])
        logits = model(token_ids.to(device), lengths.to(device))
        labels = labels.to(device)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
    return {"accuracy": correct / len(split), "loss": loss_sum / len(split)}


class WeightAverage:
    """Exponential moving average of a module's parameters, kept in a copy of the module."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(module).eval()
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        # Early on the average would be dominated by the random initialisation;
        # the usual warm-up of the decay avoids that.
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for averaged, current in zip(
            self.module.state_dict().values(), module.state_dict().values(), strict=True
        ):
            if averaged.dtype.is_floating_point:
                averaged.lerp_(current, 1 - decay)
            else:
                averaged.copy_(current)


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_one_seed(
    seed: int,
    model_config: SentimentClassifierConfig,
    config: TrainingConfig,
    train: EncodedSplit,
    dev: EncodedSplit,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, list[float]]]:
    """Train one model; return the best-on-dev EMA weights, their dev scores and the history."""
    seed_everything(seed)
    model = SentimentClassifier(model_config).to(device)
    average = WeightAverage(model, config.ema_decay)
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
    for epoch in range(1, config.epochs + 1):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        batches = length_bucketed_batches(train, config.batch_size, batch_order)
        progress = tqdm(
            batches, desc=f"seed {seed} epoch {epoch}/{config.epochs}", leave=False, mininterval=2.0
        )
        for indices in progress:
            token_ids, lengths, labels = make_batch(
                train, indices, config.word_dropout, dropout_generator
            )
            token_ids, lengths, labels = token_ids.to(device), lengths.to(device), labels.to(device)
            logits = model(token_ids, lengths)
            loss = loss_function(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
            optimizer.step()
            scheduler.step()
            average.update(model)
            loss_sum += loss.item() * len(indices)
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += len(indices)
            progress.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
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
    assert best is not None
    return best[0], best[1], history


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainingConfig()
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
        default=defaults.min_count,
        help="keep training tokens seen at least this often",
    )
    parser.add_argument("--embedding-dim", type=int, default=model_defaults.embedding_dim)
    parser.add_argument("--hidden-size", type=int, default=model_defaults.hidden_size)
    parser.add_argument("--embedding-dropout", type=float, default=model_defaults.embedding_dropout)
    parser.add_argument("--output-dropout", type=float, default=model_defaults.output_dropout)
    return parser


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
    config = TrainingConfig(
        epochs=1 if args.smoke else args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        word_dropout=args.word_dropout,
        ema_decay=min(args.ema_decay, 0.9) if args.smoke else args.ema_decay,
        min_count=1 if args.smoke else args.min_count,
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

    results = [
        train_one_seed(seed, model_config, config, encoded["train"], encoded["dev"], device)
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
        "vocab_size": len(vocabulary),
        "vocab_min_count": config.min_count,
        "tokenizer": "models.tokenizer.tokenize (lower-cased, PTB-style)",
    }
    with tempfile.TemporaryDirectory() as scratch:
        vocab_path = Path(scratch) / "vocab.json"
        vocabulary.save(vocab_path)
        report_path = Path(scratch) / "report.png"
        write_report(history, report_path, selection)
        destination = save_trained_model(
            spec,
            args.output_dir,
            module=model,
            config=model_config,
            metadata=metadata,
            extra_files={"vocab.json": vocab_path, "report.png": report_path},
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
