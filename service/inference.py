"""What the service does with each model, free of BentoML and of HTTP.

Each task has two halves:

* ``prepare_*`` turns one request item into one model input row, using the
  same preprocessing functions as training (``models.preprocessing``,
  ``models.tokenizer``). It runs per request, so a bad item fails only its
  own request.
* ``run_batch`` takes the rows of many requests (already capped at the
  batcher's ``max_batch_size``), calls the predictor and returns one result
  per row. It runs in the batcher's thread.

Images are the exception: their decoding and preprocessing is most of a
classify request's cost, so the classifier's batch takes the identified (still
compressed) images themselves, in two stages the batcher runs on two threads,
off the event loop: ``decode_and_prepare`` prepares a whole batch at once while
``predict_prepared`` runs the model on the batch before. An image that turns out
to be corrupt fails alone: its result is the ``ImageError``.

``TimedPredictor`` reports the time of each model call, so that the cost of
the model can be told apart from everything around it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.preprocessing import (
    WORKING_SIDE,
    digit_pixels_from_images,
    digits_from_generator_output,
    encode_text_arrays,
    latent_arrays,
    normalize_digits,
    shrink_to_working_size,
)
from models.tokenizer import Vocabulary, tokenize
from service.backends import Predictor
from service.imaging import ImageError, decoded_pixels, load_image
from service.memory import PixelBudget

log = logging.getLogger(__name__)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class TimedPredictor:
    """A predictor that reports the seconds of every call to ``observe``."""

    def __init__(self, predictor: Predictor, observe: Callable[[float], None]) -> None:
        self.predictor = predictor
        self.observe = observe

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self.predictor(*inputs)
        finally:
            self.observe(time.perf_counter() - started)

    def describe(self) -> str:
        return self.predictor.describe()


# An item of a classification batch: an identified image still to decode, or a
# row that was already prepared (a large upload, decoded off the batcher's thread).
ImageItem = Image.Image | np.ndarray


class DigitClassification:
    """Images → ``1×28×28`` normalised pixels → probabilities of the ten digits."""

    def __init__(
        self, predictor: Predictor | TimedPredictor, decode_budget: PixelBudget | None = None
    ) -> None:
        self.predictor = predictor
        self.decode_budget = decode_budget

    @staticmethod
    def prepare(image: Image.Image) -> np.ndarray:
        """One decoded image → its model input row (``1×28×28``)."""
        return DigitClassification.prepare_images([image])[0]

    @staticmethod
    def prepare_images(images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded images → ``N×1×28×28`` model input, the preprocessing of training."""
        return normalize_digits(digit_pixels_from_images(images))[:, np.newaxis]

    def decode_and_prepare(self, images: Sequence[ImageItem]) -> list[np.ndarray | ImageError]:
        """Identified images (or ready rows) → one row each, or the ``ImageError`` of a
        corrupt one, which fails only its own item."""
        results: list[np.ndarray | ImageError] = list(images)
        decoded: list[Image.Image] = []
        positions: list[int] = []
        for index, item in enumerate(images):
            if not isinstance(item, Image.Image):
                continue
            try:
                decoded.append(self._decode(item))
                positions.append(index)
            except ImageError as error:
                results[index] = error
        if decoded:
            try:
                rows = DigitClassification.prepare_images(decoded)
            except Exception:
                # Pillow can fail on exotic but well-formed files (odd modes, broken
                # palettes): find the culprit(s) one by one; they fail alone.
                rows = [_prepare_alone(image) for image in decoded]
            for index, row in zip(positions, rows, strict=True):
                results[index] = row
        return results

    def _decode(self, image: Image.Image) -> Image.Image:
        """Decompress one image; a large one within the worker's decode budget, and
        shrunk at once, so that only the small copy outlives this call."""
        pixels = decoded_pixels(image)
        if pixels <= WORKING_SIDE * WORKING_SIDE or self.decode_budget is None:
            return load_image(image)
        with self.decode_budget.hold(pixels):
            small = shrink_to_working_size(load_image(image))
            image.close()  # the full-size pixels go now, not when the request ends
            return small

    def predict_prepared(
        self, rows: list[np.ndarray | ImageError]
    ) -> list[np.ndarray | ImageError]:
        """Prepared rows → the probabilities of each; a row that failed stays its error."""
        results: list = list(rows)
        good = [i for i, row in enumerate(results) if isinstance(row, np.ndarray)]
        if good:
            logits = self.predictor(np.stack([results[i] for i in good]))
            for index, probabilities in zip(good, softmax(logits.astype(np.float32)), strict=True):
                results[index] = probabilities
        return results


def _prepare_alone(image: Image.Image) -> np.ndarray | ImageError:
    try:
        return DigitClassification.prepare_images([image])[0]
    except Exception as error:
        log.warning("could not process an uploaded %s image", image.format, exc_info=True)
        return ImageError(
            "unsupported_image", f"cannot process this {image.format} image ({error})"
        )


class EmptyText(ValueError):
    """The text has no tokens to classify."""


class SentimentClassification:
    """Raw text → SST-2 tokens → vocabulary ids → P(positive)."""

    # Rows are grouped by length so that a long text does not make every short
    # one in its batch pay for padding: a group's longest row is at most this
    # many times its shortest (plus a few tokens).
    LENGTH_RATIO = 2.0
    LENGTH_SLACK = 8

    def __init__(self, predictor: Predictor | TimedPredictor, vocabulary: Vocabulary) -> None:
        self.predictor = predictor
        self.vocabulary = vocabulary

    def prepare(self, text: str) -> list[int]:
        tokens = tokenize(text)
        if not tokens:
            raise EmptyText("the text contains no words or symbols to classify")
        return self.vocabulary.encode(tokens)

    def run_batch(self, rows: list[list[int]]) -> list[float]:
        scores = [0.0] * len(rows)
        for group in self._length_groups(rows):
            token_ids, lengths = encode_text_arrays([rows[i] for i in group])
            logits = self.predictor(token_ids, lengths)
            positive = softmax(logits.astype(np.float32))[:, 1]
            for index, score in zip(group, positive.tolist(), strict=True):
                scores[index] = score
        return scores

    def _length_groups(self, rows: Sequence[Sequence[int]]) -> list[list[int]]:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        groups: list[list[int]] = []
        for index in order:
            if groups:
                shortest = len(rows[groups[-1][0]])
                if len(rows[index]) <= shortest * self.LENGTH_RATIO + self.LENGTH_SLACK:
                    groups[-1].append(index)
                    continue
            groups.append([index])
        return groups


@dataclass(frozen=True)
class LatentRow:
    latent: np.ndarray  # float32, latent_dim
    label: int


class DigitGeneration:
    """(n, digit, seed) → latent rows → generated ``28×28`` uint8 digits, white on black."""

    def __init__(
        self, predictor: Predictor | TimedPredictor, latent_dim: int, num_classes: int
    ) -> None:
        self.predictor = predictor
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        # When set, every model call is padded to this many rows, so the kernels
        # always see one batch shape (cheap on a GPU, where they may otherwise pick
        # a different algorithm per batch size).
        self.pad_to: int | None = None

    def prepare(self, count: int, digit: int | None, seed: int) -> list[LatentRow]:
        latent, labels = latent_arrays(count, self.latent_dim, seed, digit, self.num_classes)
        return [LatentRow(row, label) for row, label in zip(latent, labels.tolist(), strict=True)]

    def prepare_digits(self, digits: Sequence[int], seed: int) -> list[LatentRow]:
        """One row per digit, from the latent vectors ``seed`` draws first: the images are
        those ``prepare`` gives for the same seed whenever the digits are the same."""
        latent, _ = latent_arrays(len(digits), self.latent_dim, seed, 0, self.num_classes)
        return [LatentRow(row, int(digit)) for row, digit in zip(latent, digits, strict=True)]

    def run_batch(self, rows: list[LatentRow]) -> list[np.ndarray]:
        images = self._raw(rows)
        pixels = digits_from_generator_output(images)
        return list(np.rint(pixels[:, 0] * 255).astype(np.uint8))

    def rows_independent_of_batch(self, sizes: Sequence[int]) -> bool:
        """Whether a row's output is bitwise the same whatever else shares its batch.

        Only then may rows of different requests share a model call without
        breaking "same seed, same bytes": kernels can pick a different
        algorithm (and rounding) per batch size. Checked once at start-up, with
        the batch sizes the batcher can produce.
        """
        probe = self.prepare(max(sizes), None, seed=0)
        reference = self._raw(probe)
        for size in sizes:
            for start in (0, len(probe) - size):
                chunk = probe[start : start + size]
                if not np.array_equal(self._raw(chunk), reference[start : start + size]):
                    return False
        return True

    def _raw(self, rows: Sequence[LatentRow]) -> np.ndarray:
        latent = np.stack([row.latent for row in rows])
        labels = np.array([row.label for row in rows], dtype=np.int64)
        padding = (self.pad_to or 0) - len(rows)
        if padding > 0:
            latent = np.concatenate([latent, np.zeros((padding, self.latent_dim), np.float32)])
            labels = np.concatenate([labels, np.zeros(padding, np.int64)])
        return self.predictor(latent, labels)[: len(rows)]
