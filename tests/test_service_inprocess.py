"""The service class in-process, on the released models: right answers for real
inputs, adaptive batching under concurrency, request splitting, determinism.

The API methods are awaited directly (no HTTP); uploads are passed the way the
request schema hands them over, identified from their bytes by
``service.imaging.open_image``.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from models.preprocessing import digit_tensor_from_image
from service.imaging import open_image
from service.inference import softmax

MAX_PIXELS = 4096 * 4096
RAW_SENTENCES = [
    ("What a wonderful, moving film. I loved every minute of it!", "positive"),
    ("The acting is superb and the story is beautifully told.", "positive"),
    ("A dull, tedious mess that goes nowhere.", "negative"),
    ("I didn't like it at all: boring, predictable and far too long.", "negative"),
]


def encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def upload(data: bytes) -> Image.Image:
    return open_image(data, max_pixels=MAX_PIXELS)


class RecordingPredictor:
    """Wraps a real predictor and records the batch size of every call."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.batch_sizes: list[int] = []

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(inputs[0]))
        return self.predictor(*inputs)


@pytest.fixture(scope="module")
def svc(model_store):
    from service.service import ServingService

    return ServingService()


@pytest.fixture
def recording(svc):
    """Record the classifier's batch sizes for one test."""
    original = svc.classification.predictor
    svc.classification.predictor = RecordingPredictor(original)
    yield svc.classification.predictor
    svc.classification.predictor = original


def run(coroutine):
    return asyncio.run(coroutine)


async def gather(calls: Sequence):
    return await asyncio.gather(*calls)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("polarity", ["light-on-dark", "dark-on-light"])
def test_classify_mnist_test_digits(svc, mnist_test_digits, fmt, polarity):
    images, labels = mnist_test_digits
    images, labels = images[:40], labels[:40]
    if polarity == "dark-on-light":
        images = 255 - images
    options = {"quality": 95} if fmt == "JPEG" else {}
    results = run(gather([svc.classify(upload(encode(p, fmt, **options))) for p in images]))
    predicted = np.array([r.digit for r in results])
    assert (predicted == labels).mean() >= 0.95
    for result in results:
        assert len(result.probabilities) == 10
        assert sum(result.probabilities) == pytest.approx(1.0, abs=1e-4)
        assert result.confidence == max(result.probabilities)


def test_classify_answers_what_the_model_says_on_the_training_preprocessing(svc, mnist_test_digits):
    images, _ = mnist_test_digits
    pixels = images[0]
    result = run(svc.classify(upload(encode(pixels, "PNG"))))
    row = digit_tensor_from_image(Image.fromarray(pixels)).numpy()[None]
    expected = softmax(svc.classification.predictor(row))[0]
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)


def test_classify_any_mode_and_size(svc, mnist_test_digits):
    images, labels = mnist_test_digits
    digit, label = images[1], int(labels[1])
    gray = Image.fromarray(255 - digit)  # dark ink on white paper
    variants = {
        "RGB": gray.convert("RGB"),
        "RGBA": gray.convert("RGBA"),
        "P": gray.convert("P"),
        "1": gray.convert("1", dither=Image.Dither.NONE),
        "I;16": Image.fromarray((255 - digit).astype(np.uint16) * 257),
        "large": gray.resize((1400, 1400), Image.Resampling.BILINEAR),
        "small": gray.resize((20, 20), Image.Resampling.BILINEAR),
        "wide": Image.fromarray(np.pad(255 - digit, ((0, 0), (60, 60)), constant_values=255)),
    }
    for name, image in variants.items():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        result = run(svc.classify(upload(buffer.getvalue())))
        assert result.digit == label, name


def test_classify_batch_answers_each_image_in_order(svc, mnist_test_digits):
    images, labels = mnist_test_digits
    uploads = [upload(encode(p, "PNG")) for p in images[:12]]
    batch = run(svc.classify_batch(uploads))
    singles = [run(svc.classify(upload(encode(p, "PNG")))) for p in images[:12]]
    assert [r.digit for r in batch] == [r.digit for r in singles]
    for together, alone in zip(batch, singles, strict=True):
        np.testing.assert_allclose(together.probabilities, alone.probabilities, atol=1e-5)
    assert (np.array([r.digit for r in batch]) == labels[:12]).mean() >= 0.9


def test_concurrent_requests_are_batched_and_each_gets_its_answer(
    svc, recording, mnist_test_digits
):
    images, _ = mnist_test_digits
    alone = [run(svc.classify(upload(encode(p, "PNG")))) for p in images[:64]]
    recording.batch_sizes.clear()
    together = run(gather([svc.classify(upload(encode(p, "PNG"))) for p in images[:64]]))
    assert max(recording.batch_sizes) > 1
    assert [r.digit for r in together] == [r.digit for r in alone]


def test_no_model_call_exceeds_the_maximum_batch(svc, recording, mnist_test_digits):
    images, _ = mnist_test_digits
    limit = svc.batchers["classify"].max_batch_size
    many = [upload(encode(p, "PNG")) for p in images[: limit * 2 + 5]]
    # One oversized request, plus single requests that together add up past the limit.
    calls = [svc.classify_batch(many)] + [
        svc.classify(upload(encode(p, "PNG"))) for p in images[:limit]
    ]
    results = run(gather(calls))
    assert len(results[0]) == len(many)
    assert max(recording.batch_sizes) <= limit
    assert sum(recording.batch_sizes) == len(many) + limit


def test_sentiment_on_sst2_test_sentences(svc, sst2_test_sentences):
    sentences = sst2_test_sentences[:100]
    results = run(gather([svc.sentiment(text) for text, _ in sentences]))
    predicted = np.array([r.label == "positive" for r in results])
    labels = np.array([label == 1 for _, label in sentences])
    assert (predicted == labels).mean() >= 0.8
    for result in results:
        assert 0.0 <= result.score <= 1.0
        assert result.label == ("positive" if result.score >= 0.5 else "negative")


def test_sentiment_on_raw_text(svc):
    for text, label in RAW_SENTENCES:
        assert run(svc.sentiment(text)).label == label, text


def test_sentiment_batch_matches_single_requests(svc, sst2_test_sentences):
    texts = [text for text, _ in sst2_test_sentences[:20]] + [t for t, _ in RAW_SENTENCES]
    batch = run(svc.sentiment_batch(texts))
    singles = [run(svc.sentiment(text)) for text in texts]
    for together, alone in zip(batch, singles, strict=True):
        assert together.label == alone.label
        assert together.score == pytest.approx(alone.score, abs=1e-5)


def test_blank_text_is_a_client_error(svc):
    response = run(svc.sentiment("   \n\t "))
    assert response.status_code == 400
    assert b"empty_text" in response.body


def _pngs(answer) -> list[bytes]:
    return [base64.b64decode(image.png) for image in answer.images]


def test_generate_is_deterministic_and_draws_the_requested_digit(svc):
    first = run(svc.generate(n=6, digit=3, seed=11))
    again = run(svc.generate(n=6, digit=3, seed=11))
    assert first.seed == 11 and _pngs(first) == _pngs(again)
    assert [image.digit for image in first.images] == [3] * 6
    decoded = Image.open(io.BytesIO(_pngs(first)[0]))
    assert decoded.size == (28, 28) and decoded.mode == "L"
    other = run(svc.generate(n=6, digit=3, seed=12))
    assert _pngs(other) != _pngs(first)
    random_digits = run(svc.generate(n=10, seed=5))
    assert [i.digit for i in random_digits.images] == [
        i.digit for i in run(svc.generate(n=10, seed=5)).images
    ]
    assert len({i.digit for i in random_digits.images}) > 1


def test_generate_bytes_do_not_depend_on_other_requests_in_the_batch(svc):
    alone = _pngs(run(svc.generate(n=5, digit=None, seed=2024)))
    crowd = [svc.generate(n=n, digit=d, seed=s) for n, d, s in [(3, 1, 1), (7, None, 2), (1, 4, 3)]]
    answers = run(gather([*crowd, svc.generate(n=5, digit=None, seed=2024), *crowd]))
    assert _pngs(answers[3]) == alone


def test_generated_digits_are_recognised_by_the_classifier(svc):
    answer = run(svc.generate(n=40, seed=7))
    uploads = [upload(png) for png in _pngs(answer)]
    recognised = run(svc.classify_batch(uploads))
    agreement = np.mean(
        [r.digit == image.digit for r, image in zip(recognised, answer.images, strict=True)]
    )
    assert agreement >= 0.8


def test_the_grid_is_one_png_with_the_seed_in_a_header(svc):
    response = run(svc.generate(n=9, digit=None, seed=3, grid=True))
    assert response.media_type == "image/png" and response.headers["X-Seed"] == "3"
    grid = Image.open(io.BytesIO(response.body))
    assert grid.size == (3 * 28 + 4 * 2, 3 * 28 + 4 * 2)
    assert response.body == run(svc.generate(n=9, digit=None, seed=3, grid=True)).body


def test_previews_beyond_the_limit_are_refused_and_the_count_returns_to_zero(svc):
    from service.service import MAX_PREVIEWS_WAITING, PNG

    buffer = io.BytesIO()
    Image.new("L", (28, 28)).save(buffer, format="PNG")
    body = buffer.getvalue()

    async def previews(count: int) -> list:
        return await asyncio.gather(
            *(svc.handle("/classify_input", PNG, PNG, body) for _ in range(count))
        )

    replies = run(previews(MAX_PREVIEWS_WAITING + 8))
    statuses = sorted(reply.status for reply in replies)
    # Every request starts before any decode finishes (they wait on worker threads),
    # so exactly the limit is prepared and the rest are told to retry.
    assert statuses == [200] * MAX_PREVIEWS_WAITING + [503] * 8
    assert svc.previews_waiting == 0
    assert run(previews(1))[0].status == 200
