"""The SST-2 training script: its pieces, a smoke run end to end, and the released artifact."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

from models.artifacts import VOCAB_FILE
from models.preprocessing import encode_texts
from models.registry import SENTIMENT_CLASSIFIER, get_spec, store_version
from models.sentiment import SentimentClassifier, SentimentClassifierConfig
from models.tokenizer import PAD_ID, UNK_ID, Vocabulary, tokenize
from training import sentiment
from training.common import default_data_dir
from training.data import read_sst2

SPEC = get_spec(SENTIMENT_CLASSIFIER)


def needs_sst2() -> Path:
    data_dir = default_data_dir()
    if not (data_dir / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"SST-2 not found under {data_dir}")
    return data_dir


def toy_split() -> sentiment.EncodedSplit:
    lengths = [1, 5, 2, 9, 3, 3, 7, 1, 4, 6, 8, 2]
    return sentiment.EncodedSplit(
        ids=[list(range(2, 2 + n)) for n in lengths], labels=[i % 2 for i in range(len(lengths))]
    )


def test_length_buckets_cover_every_example_once_with_similar_lengths() -> None:
    split = toy_split()
    batches = sentiment.length_bucketed_batches(split, 4, random.Random(0))
    assert sorted(i for batch in batches for i in batch) == list(range(len(split)))
    assert [len(batch) for batch in batches] == [4, 4, 4]
    spans = sorted(
        max(len(split.ids[i]) for i in b) - min(len(split.ids[i]) for i in b) for b in batches
    )
    assert spans[-1] <= 3  # sorted by length, so a batch never mixes 1 with 9


def test_batch_order_changes_between_epochs_but_is_seeded() -> None:
    split = toy_split()
    first = sentiment.length_bucketed_batches(split, 4, random.Random(0))
    again = sentiment.length_bucketed_batches(split, 4, random.Random(0))
    assert first == again
    generator = random.Random(0)
    epochs = [sentiment.length_bucketed_batches(split, 4, generator) for _ in range(5)]
    assert any(epoch != epochs[0] for epoch in epochs[1:])


def test_word_dropout_replaces_only_real_tokens_with_unknown() -> None:
    split = toy_split()
    indices = list(range(len(split)))
    clean_ids, lengths, labels = sentiment.pad_batch(split, indices)
    assert labels.tolist() == split.labels
    dropped = sentiment.word_dropout_mask(
        clean_ids, lengths, 0.5, generator=torch.Generator().manual_seed(0)
    )
    token_ids = clean_ids.masked_fill(dropped, UNK_ID)
    real = torch.arange(token_ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    assert (token_ids[~real] == PAD_ID).all()
    changed = token_ids != clean_ids
    assert changed.any()
    assert (token_ids[changed] == UNK_ID).all()
    assert 0.3 < changed.sum().item() / real.sum().item() < 0.7


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    factors = [sentiment.learning_rate_factor(step, 100, 10) for step in range(101)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[100] == pytest.approx(0.0)


def test_weight_average_follows_the_weights_slowly() -> None:
    torch.manual_seed(0)
    model = SentimentClassifier(
        SentimentClassifierConfig(vocab_size=10, embedding_dim=4, hidden_size=3)
    )
    average = sentiment.weight_average(model, decay=0.9)
    start = model.classifier.weight.detach().clone()
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    for _ in range(200):
        average.update_parameters(model)
    torch.testing.assert_close(average.module.classifier.weight, start + 1.0)
    average = sentiment.weight_average(model, decay=0.9)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    average.update_parameters(model)  # one step moves only part of the way
    # The first step's decay is warmed up to 2/11: the average moves 9/11 of the way.
    moved = average.module.classifier.weight - (start + 1.0)
    torch.testing.assert_close(moved, torch.full_like(moved, 9 / 11))


def test_distillation_loss_vanishes_only_when_the_student_matches_the_teachers() -> None:
    teacher_logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]])
    temperature = 2.0
    targets = (teacher_logits / temperature).softmax(dim=1)
    matched = sentiment.distillation_loss(teacher_logits, targets, temperature)
    assert matched.item() == pytest.approx(0.0, abs=1e-6)
    student_logits = torch.zeros_like(teacher_logits, requires_grad=True)
    loss = sentiment.distillation_loss(student_logits, targets, temperature)
    assert loss.item() > 0.01
    loss.backward()
    # A gradient step moves each student logit towards the teacher's preferred class.
    step = -student_logits.grad
    assert step[0, 0] > 0 and step[2, 1] > 0 and step[1].abs().max() < 1e-6


def toy_teacher(split_ids: list[list[int]], vocab_size: int) -> sentiment.Teacher:
    torch.manual_seed(0)
    module = SentimentClassifier(
        SentimentClassifierConfig(vocab_size=vocab_size, embedding_dim=4, hidden_size=3)
    ).eval()
    labels = [0] * len(split_ids)
    return sentiment.Teacher(
        directory=Path("unused"),
        module=module,
        splits={"train": sentiment.EncodedSplit(split_ids, labels)},
        metadata={},
    )


def test_teachers_see_the_students_dropped_words_through_their_own_vocabulary() -> None:
    student_split = toy_split()
    # The teacher's vocabulary numbers the same words differently (ids shifted by 3).
    teacher = toy_teacher([[i + 3 for i in ids] for ids in student_split.ids], vocab_size=20)
    indices = [3, 6, 9]
    token_ids, lengths, _ = sentiment.pad_batch(student_split, indices)
    dropped = sentiment.word_dropout_mask(token_ids, lengths, 0.5, torch.Generator().manual_seed(1))
    assert dropped.any()
    targets = sentiment.teacher_targets(
        [teacher, teacher], indices, dropped, 2.0, torch.device("cpu")
    )
    teacher_ids, teacher_lengths, _ = sentiment.pad_batch(teacher.splits["train"], indices)
    expected = teacher.module(teacher_ids.masked_fill(dropped, UNK_ID), teacher_lengths) / 2.0
    torch.testing.assert_close(targets, expected.softmax(dim=1))
    clean = sentiment.teacher_targets(
        [teacher], indices, torch.zeros_like(dropped), 2.0, torch.device("cpu")
    )
    assert not torch.allclose(clean, targets)


SMOKE_ARGS = ["--smoke", "--device", "cpu", "--threads", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """One smoke run shared by the tests below (it trains on real data for a few seconds)."""
    data_dir = needs_sst2()
    output_dir = tmp_path_factory.mktemp("artifacts")
    argv = [*SMOKE_ARGS, "--data-dir", str(data_dir), "--output-dir", str(output_dir)]
    assert sentiment.main(argv) == 0
    return argv, SPEC.artifact_dir(output_dir)


def test_smoke_run_writes_a_complete_loadable_artifact(smoke_run: tuple[list[str], Path]) -> None:
    argv, directory = smoke_run
    artifact = SPEC.load_artifact(directory)  # verifies every checksum
    assert set(artifact.metadata["files"]) == {
        "weights.pt",
        "config.json",
        "vocab.json",
        "report.png",
    }
    assert artifact.path("report.png").read_bytes().startswith(b"\x89PNG")
    metadata = artifact.metadata
    assert metadata["smoke"] is True
    assert metadata["labels"] == ["negative", "positive"]
    assert metadata["dataset"]["sizes"] == {
        "train": sentiment.SMOKE_TRAIN_SIZE,
        "dev": sentiment.SMOKE_EVAL_SIZE,
        "test": sentiment.SMOKE_EVAL_SIZE,
    }
    # A few batches learn next to nothing (about 0.49), so the recorded figures are
    # checked against the saved model itself on the smoke run's own subsets (drawn
    # as the script draws them): a figure from another model, split or label
    # column would differ.
    vocabulary = Vocabulary.load(artifact.path(VOCAB_FILE))
    model = SPEC.load_module(artifact)
    subset = random.Random(0)
    splits = {name: read_sst2(needs_sst2(), name) for name in ("train", "dev", "test")}
    subset.sample(splits["train"], sentiment.SMOKE_TRAIN_SIZE)
    for split in ("dev", "test"):
        rows = subset.sample(splits[split], sentiment.SMOKE_EVAL_SIZE)
        with torch.no_grad():
            logits = model(*encode_texts([vocabulary.encode(row.tokens) for row in rows]))
        labels = torch.tensor([row.label for row in rows])
        accuracy = float((logits.argmax(1) == labels).float().mean())
        assert metadata["metrics"][f"{split}_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metadata["metrics"]["selected_seed"] == 3
    training = metadata["training"]
    assert training["command"].endswith(" ".join(argv))
    assert training["epochs"] == 1 and training["cpu_threads"] == 1 and training["device"] == "cpu"
    assert training["wall_seconds"] > 0

    assert len(vocabulary) == metadata["vocab_size"] == artifact.config["vocab_size"]
    token_ids, lengths = encode_texts([vocabulary.encode(tokenize("A fine, moving film."))])
    assert model(token_ids, lengths).shape == (1, 2)


def test_smoke_run_distils_from_teachers_with_another_vocabulary_and_size(
    smoke_run: tuple[list[str], Path], tmp_path: Path
) -> None:
    _, teacher_dir = smoke_run
    argv = [
        *SMOKE_ARGS,
        "--data-dir",
        str(needs_sst2()),
        "--output-dir",
        str(tmp_path),
        "--min-count",
        "2",  # the teacher (a smoke run) kept every token: the vocabularies differ
        "--embedding-dim",
        "16",
        "--hidden-size",
        "24",
        "--teachers",
        str(teacher_dir),
        str(teacher_dir),
        "--distillation-weight",
        "0.7",
    ]
    assert sentiment.main(argv) == 0
    artifact = SPEC.load_artifact(SPEC.artifact_dir(tmp_path))
    assert artifact.config["embedding_dim"] == 16 and artifact.config["hidden_size"] == 24
    assert artifact.config["vocab_size"] < SPEC.load_artifact(teacher_dir).config["vocab_size"]
    distillation = artifact.metadata["distillation"]
    teacher_metadata = SPEC.load_artifact(teacher_dir).metadata
    # Each teacher is recorded by its content, not by a path that may be gone.
    for recorded in distillation["teachers"]:
        assert recorded["sha256"] == teacher_metadata["files"]
        assert recorded["version"] == store_version(teacher_metadata)
        assert "directory" not in recorded
    assert distillation["teachers"][0]["command"] == teacher_metadata["training"]["command"]
    # Two copies of one teacher score exactly as that teacher does alone.
    ensemble = distillation["ensemble"]
    assert ensemble["dev_accuracy"] == teacher_metadata["metrics"]["dev_accuracy"]
    assert ensemble["test_accuracy"] == teacher_metadata["metrics"]["test_accuracy"]
    assert distillation["distillation_weight"] == 0.7
    assert artifact.metadata["training"]["hyperparameters"]["distillation_weight"] == 0.7


def test_vocabulary_comes_from_the_training_split_only(
    smoke_run: tuple[list[str], Path],
) -> None:
    _, directory = smoke_run
    vocabulary = Vocabulary.load(directory / VOCAB_FILE)
    train_tokens = {token for row in read_sst2(needs_sst2(), "train") for token in row.tokens}
    dev_only = {t for row in read_sst2(needs_sst2(), "dev") for t in row.tokens} - train_tokens
    assert dev_only, "dev has tokens that train lacks; none of them may enter the vocabulary"
    assert set(vocabulary.tokens[2:]) <= train_tokens


# --- the released artifact -----------------------------------------------------------------

RELEASED = SPEC.artifact_dir()


def released_model() -> tuple[SentimentClassifier, Vocabulary, dict]:
    artifact = SPEC.load_artifact(RELEASED)
    vocabulary = Vocabulary.load(artifact.path(VOCAB_FILE))
    return SPEC.load_module(artifact), vocabulary, artifact.metadata


def classify(model: SentimentClassifier, vocabulary: Vocabulary, texts: list[str]) -> list[int]:
    token_ids, lengths = encode_texts([vocabulary.encode(tokenize(text)) for text in texts])
    with torch.no_grad():
        return model(token_ids, lengths).argmax(dim=1).tolist()


def test_released_artifact_is_a_full_run_within_the_size_budget() -> None:
    _, vocabulary, metadata = released_model()
    assert metadata["smoke"] is False
    assert metadata["metrics"]["test_accuracy"] >= 0.85  # the quality bar
    assert metadata["dataset"]["sizes"] == {"train": 67_349, "dev": 872, "test": 1_821}
    assert metadata["training"]["command"].startswith("python -m training.sentiment")
    assert len(vocabulary) == metadata["vocab_size"]
    assert (RELEASED / "weights.pt").stat().st_size <= 7.5 * 2**20
    # Distilled from an ensemble of larger models, each recorded with its command.
    teachers = metadata["distillation"]["teachers"]
    assert len(teachers) >= 2
    assert all(t["command"].startswith("python -m training.sentiment") for t in teachers)


def test_released_artifact_reproduces_its_test_accuracy_on_a_sample() -> None:
    data_dir = needs_sst2()
    model, vocabulary, metadata = released_model()
    sample = random.Random(0).sample(read_sst2(data_dir, "test"), 300)
    predictions = classify(model, vocabulary, [row.text for row in sample])
    accuracy = sum(p == row.label for p, row in zip(predictions, sample, strict=True)) / 300
    # 300 sentences: a few points of sampling noise around the recorded figure.
    assert accuracy >= 0.80
    assert abs(accuracy - metadata["metrics"]["test_accuracy"]) < 0.06


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("I didn't like it at all, it was boring.", 0),
        ("An absolutely wonderful, moving film.", 1),
        ("A dull, lifeless mess with no redeeming qualities.", 0),
        ("One of the funniest and most charming movies of the year!", 1),
        ("The plot is predictable and the acting is terrible.", 0),
        ("Beautifully shot, brilliantly acted and deeply touching.", 1),
    ],
)
def test_released_artifact_classifies_raw_text(text: str, label: int) -> None:
    model, vocabulary, _ = released_model()
    assert classify(model, vocabulary, [text]) == [label]
