"""The BiLSTM sentiment classifier: shapes, exact padding invariance, save → load round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.preprocessing import encode_texts
from models.registry import SENTIMENT_CLASSIFIER, get_spec
from models.sentiment import (
    SentimentClassifier,
    SentimentClassifierConfig,
    reverse_within_lengths,
)
from models.tokenizer import PAD_ID
from training.common import save_trained_model

CONFIG = SentimentClassifierConfig(vocab_size=50, embedding_dim=8, hidden_size=6)


@pytest.fixture
def model() -> SentimentClassifier:
    torch.manual_seed(0)
    return SentimentClassifier(CONFIG).eval()


def random_ids(generator: torch.Generator, length: int) -> list[int]:
    return torch.randint(2, CONFIG.vocab_size, (length,), generator=generator).tolist()


def test_output_shape_and_dtype(model: SentimentClassifier) -> None:
    token_ids, lengths = encode_texts([[2, 3, 4], [5], [6, 7, 8, 9, 10]])
    logits = model(token_ids, lengths)
    assert logits.shape == (3, CONFIG.num_classes)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_a_sentence_scores_the_same_alone_and_batched_with_longer_ones(
    model: SentimentClassifier,
) -> None:
    generator = torch.Generator().manual_seed(1)
    sentence = random_ids(generator, 4)
    others = [random_ids(generator, n) for n in (9, 1, 17, 4)]
    with torch.no_grad():
        alone = model(*encode_texts([sentence]))
        batched = model(*encode_texts([*others[:2], sentence, *others[2:]]))
    # Padding never reaches the sentence's states; only float rounding of a
    # different-sized matrix product may differ, far below any decision margin.
    torch.testing.assert_close(batched[2:3], alone, rtol=0, atol=1e-6)


def test_extra_trailing_padding_changes_nothing(model: SentimentClassifier) -> None:
    token_ids, lengths = encode_texts([[2, 3, 4, 5], [6, 7]])
    padded = torch.cat([token_ids, torch.full((2, 11), PAD_ID)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(padded, lengths), model(token_ids, lengths), rtol=0, atol=1e-6
        )


def test_the_padding_value_itself_is_ignored(model: SentimentClassifier) -> None:
    token_ids, lengths = encode_texts([[2, 3], [4, 5, 6, 7, 8]])
    garbage = token_ids.clone()
    garbage[0, 2:] = 9  # whatever sits beyond a row's length must not matter
    with torch.no_grad():
        torch.testing.assert_close(
            model(garbage, lengths), model(token_ids, lengths), rtol=0, atol=1e-6
        )


def test_word_order_matters(model: SentimentClassifier) -> None:
    with torch.no_grad():
        forward = model(*encode_texts([[2, 3, 4, 5, 6]]))
        backward = model(*encode_texts([[6, 5, 4, 3, 2]]))
    assert not torch.allclose(forward, backward)


def test_reverse_within_lengths_is_an_involution_that_keeps_padding() -> None:
    sequences = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    lengths = torch.tensor([3, 5])
    reversed_ = reverse_within_lengths(sequences, lengths)
    assert reversed_[0, :, 0].tolist() == [2, 1, 0, 3, 4]
    assert reversed_[1, :, 0].tolist() == [9, 8, 7, 6, 5]
    torch.testing.assert_close(reverse_within_lengths(reversed_, lengths), sequences)


def test_save_and_load_give_identical_outputs(model: SentimentClassifier, tmp_path: Path) -> None:
    spec = get_spec(SENTIMENT_CLASSIFIER)
    vocab = tmp_path / "vocab.json"
    vocab.write_text('["<pad>", "<unk>"]\n')
    directory = save_trained_model(
        spec,
        tmp_path,
        module=model,
        config=CONFIG,
        metadata={"smoke": True},
        extra_files={"vocab.json": vocab},
    )
    loaded = spec.load_module(spec.load_artifact(directory))
    assert isinstance(loaded, SentimentClassifier)
    assert loaded.config == CONFIG
    assert not loaded.training
    token_ids, lengths = encode_texts([[2, 3, 4], [5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(token_ids, lengths), model(token_ids, lengths), rtol=0, atol=0
        )
