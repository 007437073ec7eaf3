"""The service built in process from explicit settings, called through httpx's ASGI
transport (``conftest.InProcessService``): right answers for real inputs, adaptive
batching under concurrency, request splitting, determinism. Every layer of a
worker's app takes part (BentoML's middleware, the gate, the route table, the
batchers, the ONNX models); only the process and the socket are left out, and
``tests/test_service_http.py`` covers those.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from bench.multipart import file_parts, multipart_body
from models.preprocessing import digit_tensor_from_image
from service.inference import softmax
from tests.service_payloads import RecordingPredictor, encode

RAW_SENTENCES = [
    ("What a wonderful, moving film. I loved every minute of it!", "positive"),
    ("The acting is superb and the story is beautifully told.", "positive"),
    ("A dull, tedious mess that goes nowhere.", "negative"),
    ("I didn't like it at all: boring, predictable and far too long.", "negative"),
]
JSON_TYPE = "application/json"


@pytest.fixture(scope="module")
def svc(in_process):
    return in_process()


@pytest.fixture
def recording(svc):
    """Record the classifier's batch sizes for one test."""
    model = svc.instance.tasks["classify"].model
    original = model.predictor
    model.predictor = RecordingPredictor(original)
    yield model.predictor
    model.predictor = original


def form(field: str, files: list[bytes]) -> tuple[bytes, str]:
    return multipart_body(file_parts(field, files, "application/octet-stream"))


def classify_requests(images: list[bytes]) -> list[tuple[str, bytes, str]]:
    return [("/classify", *form("image", [data])) for data in images]


def answers(replies: list[tuple[int, bytes]]) -> list:
    assert [status for status, _ in replies] == [200] * len(replies), replies[:3]
    return [json.loads(body) for _, body in replies]


def classify(svc, data: bytes) -> dict:
    status, answer = svc.post_files("/classify", "image", [data])
    assert status == 200, answer
    return answer


def classify_batch(svc, images: list[bytes]) -> list[dict]:
    status, answer = svc.post_files("/classify_batch", "images", images)
    assert status == 200, answer
    return answer


def sentiment(svc, text: str) -> dict:
    status, answer = svc.post_json("/sentiment", {"text": text})
    assert status == 200, answer
    return answer


def generate(svc, **request) -> dict:
    status, answer = svc.post_json("/generate", request)
    assert status == 200, answer
    return answer


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("polarity", ["light-on-dark", "dark-on-light"])
def test_classify_mnist_test_digits(svc, mnist_test_digits, fmt, polarity):
    images, labels = mnist_test_digits
    images, labels = images[:40], labels[:40]
    if polarity == "dark-on-light":
        images = 255 - images
    results = answers(svc.request_all(classify_requests([encode(p, fmt) for p in images])))
    predicted = np.array([r["digit"] for r in results])
    assert (predicted == labels).mean() >= 0.95
    for result in results:
        assert len(result["probabilities"]) == 10
        assert sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        assert result["confidence"] == max(result["probabilities"])


def test_classify_answers_what_the_model_says_on_the_training_preprocessing(svc, mnist_test_digits):
    images, _ = mnist_test_digits
    pixels = images[0]
    result = classify(svc, encode(pixels, "PNG"))
    row = digit_tensor_from_image(Image.fromarray(pixels)).numpy()[None]
    expected = softmax(svc.instance.tasks["classify"].model.predictor(row))[0]
    np.testing.assert_allclose(result["probabilities"], expected, atol=1e-5)


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
        assert classify(svc, buffer.getvalue())["digit"] == label, name


def test_classify_batch_answers_each_image_in_order(svc, mnist_test_digits):
    images, labels = mnist_test_digits
    pngs = [encode(p, "PNG") for p in images[:12]]
    batch = classify_batch(svc, pngs)
    singles = [classify(svc, png) for png in pngs]
    assert [r["digit"] for r in batch] == [r["digit"] for r in singles]
    for together, alone in zip(batch, singles, strict=True):
        np.testing.assert_allclose(together["probabilities"], alone["probabilities"], atol=1e-5)
    assert (np.array([r["digit"] for r in batch]) == labels[:12]).mean() >= 0.9


def test_concurrent_requests_are_batched_and_each_gets_its_answer(
    svc, recording, mnist_test_digits
):
    images, _ = mnist_test_digits
    pngs = [encode(p, "PNG") for p in images[:64]]
    alone = [classify(svc, png) for png in pngs]
    recording.batch_sizes.clear()
    together = answers(svc.request_all(classify_requests(pngs)))
    assert max(recording.batch_sizes) > 1
    assert [r["digit"] for r in together] == [r["digit"] for r in alone]


def test_no_model_call_exceeds_the_maximum_batch(svc, recording, mnist_test_digits):
    images, _ = mnist_test_digits
    limit = svc.instance.tasks["classify"].batcher.max_batch_size
    many = [encode(p, "PNG") for p in images[: limit + limit // 2 + 5]]
    # One oversized request, plus single requests that together add up past the limit.
    requests = [("/classify_batch", *form("images", many))]
    requests += classify_requests([encode(p, "PNG") for p in images[:limit]])
    results = answers(svc.request_all(requests))
    assert len(results[0]) == len(many)
    assert max(recording.batch_sizes) <= limit
    assert sum(recording.batch_sizes) == len(many) + limit


def sentiment_requests(texts: list[str]) -> list[tuple[str, bytes, str]]:
    return [("/sentiment", json.dumps({"text": text}).encode(), JSON_TYPE) for text in texts]


def test_sentiment_on_sst2_test_sentences(svc, sst2_test_sentences):
    sentences = sst2_test_sentences[:100]
    results = answers(svc.request_all(sentiment_requests([text for text, _ in sentences])))
    predicted = np.array([r["label"] == "positive" for r in results])
    labels = np.array([label == 1 for _, label in sentences])
    assert (predicted == labels).mean() >= 0.8
    for result in results:
        assert 0.0 <= result["score"] <= 1.0
        assert result["label"] == ("positive" if result["score"] >= 0.5 else "negative")


def test_sentiment_on_raw_text(svc):
    for text, label in RAW_SENTENCES:
        assert sentiment(svc, text)["label"] == label, text


def test_sentiment_batch_matches_single_requests(svc, sst2_test_sentences):
    texts = [text for text, _ in sst2_test_sentences[:20]] + [t for t, _ in RAW_SENTENCES]
    status, batch = svc.post_json("/sentiment_batch", {"texts": texts})
    assert status == 200
    singles = [sentiment(svc, text) for text in texts]
    for together, alone in zip(batch, singles, strict=True):
        assert together["label"] == alone["label"]
        assert together["score"] == pytest.approx(alone["score"], abs=1e-5)


def test_blank_text_is_a_client_error(svc):
    status, answer = svc.post_json("/sentiment", {"text": "   \n\t "})
    assert status == 400
    assert answer["detail"][0]["type"] == "empty_text"


def _pngs(answer: dict) -> list[bytes]:
    return [base64.b64decode(image["png"]) for image in answer["images"]]


def test_generate_is_deterministic_and_draws_the_requested_digit(svc):
    first = generate(svc, n=6, digit=3, seed=11)
    again = generate(svc, n=6, digit=3, seed=11)
    assert first["seed"] == 11 and _pngs(first) == _pngs(again)
    assert [image["digit"] for image in first["images"]] == [3] * 6
    decoded = Image.open(io.BytesIO(_pngs(first)[0]))
    assert decoded.size == (28, 28) and decoded.mode == "L"
    assert _pngs(generate(svc, n=6, digit=3, seed=12)) != _pngs(first)
    random_digits = [i["digit"] for i in generate(svc, n=10, seed=5)["images"]]
    assert random_digits == [i["digit"] for i in generate(svc, n=10, seed=5)["images"]]
    assert len(set(random_digits)) > 1


def test_generate_bytes_do_not_depend_on_other_requests_in_the_batch(svc):
    alone = _pngs(generate(svc, n=5, seed=2024))
    crowd = [
        ("/generate", json.dumps({"n": n, "digit": d, "seed": seed}).encode(), JSON_TYPE)
        for n, d, seed in [(3, 1, 1), (7, None, 2), (1, 4, 3)]
    ]
    target = ("/generate", json.dumps({"n": 5, "seed": 2024}).encode(), JSON_TYPE)
    replies = answers(svc.request_all([*crowd, target, *crowd]))
    assert _pngs(replies[3]) == alone


def test_generated_digits_are_recognised_by_the_classifier(svc):
    answer = generate(svc, n=40, seed=7)
    recognised = classify_batch(svc, _pngs(answer))
    agreement = np.mean(
        [
            r["digit"] == image["digit"]
            for r, image in zip(recognised, answer["images"], strict=True)
        ]
    )
    assert agreement >= 0.8


def test_the_grid_is_one_png_with_the_seed_in_a_header(svc):
    request = json.dumps({"n": 9, "seed": 3, "grid": True}).encode()
    status, headers, body = svc.request(
        "/generate", data=request, headers={"Content-Type": JSON_TYPE}
    )
    assert status == 200
    assert headers["content-type"] == "image/png" and headers["x-seed"] == "3"
    grid = Image.open(io.BytesIO(body))
    assert grid.size == (3 * 28 + 4 * 2, 3 * 28 + 4 * 2)
    assert svc.request("/generate", data=request, headers={"Content-Type": JSON_TYPE})[2] == body


def test_previews_beyond_the_limit_are_refused_and_the_count_returns_to_zero(svc):
    from service.tasks import MAX_PREVIEWS_WAITING

    body = encode(np.zeros((28, 28), np.uint8), "PNG")
    previews = [("/classify_input", body, "image/png")] * (MAX_PREVIEWS_WAITING + 8)
    statuses = sorted(status for status, _ in svc.request_all(previews))
    # Every request starts before any decode finishes (they wait on worker threads),
    # so exactly the limit is prepared and the rest are told to retry.
    assert statuses == [200] * MAX_PREVIEWS_WAITING + [503] * 8
    assert svc.instance.tasks["classify"].previews_waiting == 0
    assert svc.request_all(previews[:1])[0][0] == 200


def test_every_answer_says_which_model_version_produced_it(svc, model_store):
    versions = {tag.split(":")[0]: tag.split(":")[1] for tag in model_store.values()}
    png = encode(np.zeros((28, 28), np.uint8), "PNG")
    status, headers, _ = svc.request("/classify", data=png, headers={"Content-Type": "image/png"})
    assert status == 200 and headers["x-model-version"] == versions["mnist-cnn"]
    request = json.dumps({"text": "Fine."}).encode()
    status, headers, _ = svc.request("/sentiment", data=request,
                                     headers={"Content-Type": JSON_TYPE})  # fmt: skip
    assert headers["x-model-version"] == versions["sst2-bilstm"]
    v2 = json.dumps({"inputs": [{"name": "digits", "datatype": "INT64", "shape": [1],
                                 "data": [3]}]}).encode()  # fmt: skip
    status, headers, raw = svc.request("/v2/models/digit-gan/infer", data=v2,
                                       headers={"Content-Type": JSON_TYPE})  # fmt: skip
    assert headers["x-model-version"] == json.loads(raw)["model_version"] == versions["digit-gan"]
    assert "x-model-version" not in svc.request("/v2/health/ready")[1]  # not a model's answer
