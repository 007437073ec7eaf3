"""Every kind of request body, good and bad, against the service built in process
(``conftest.InProcessService``: the gate, the route table, the decoders and the
models, called through httpx's ASGI transport). Bad input always gets a 4xx with
a JSON object naming the problem. The service runs with small limits so the
limit checks stay cheap: 16 items per request, batches of at most 8 images, 500
characters of text.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from tests.service_payloads import RecordingPredictor, encode, multipart

MAX_ITEMS = 16
CLASSIFY_MAX_BATCH = 8
MAX_TEXT = 500
SERVICE_ENV = {
    "SERVING_MAX_ITEMS_PER_REQUEST": str(MAX_ITEMS),
    "SERVING_CLASSIFY_MAX_BATCH_SIZE": str(CLASSIFY_MAX_BATCH),
    "SERVING_MAX_TEXT_CHARS": str(MAX_TEXT),
}
JSON_TYPE = "application/json"


@pytest.fixture(scope="module")
def server(in_process):
    return in_process(SERVICE_ENV)


def post_files(server, path: str, field: str, files: Sequence[bytes], content_type="image/png"):
    return server.post_files(path, field, files, content_type)


# --- right answers, every body form ---------------------------------------------------


def test_classify_input_is_the_preprocessed_image_the_classifier_sees(server, mnist_test_digits):
    from models.preprocessing import digit_pixels_from_image

    images, _ = mnist_test_digits
    # Off-centre and dark on light, as a drawing is: the answer is the centred MNIST view.
    canvas = np.full((200, 160), 255, dtype=np.uint8)
    canvas[10:66, 90:146] = 255 - np.asarray(Image.fromarray(images[0]).resize((56, 56)))
    expected = np.round(digit_pixels_from_image(Image.fromarray(canvas)) * 255).astype(np.uint8)
    form, form_type = multipart([("image", "drawing.png", encode(canvas, "PNG"), "image/png")])
    for data, content_type in ((form, form_type), (encode(canvas, "PNG"), "image/png")):
        status, _, body = server.request(
            "/classify_input", data=data, headers={"Content-Type": content_type}
        )
        assert status == 200
        seen = np.asarray(Image.open(io.BytesIO(body)))
        assert seen.shape == (28, 28)
        assert np.abs(seen.astype(int) - expected).max() <= 1
    status, error = post_files(server, "/classify_input", "image", [b"not an image"])
    assert status == 400 and error["detail"][0]["type"] == "invalid_image"
    assert server.request("/classify_input")[0] == 405


def test_a_raw_image_body_is_classified_like_an_upload(server, mnist_test_digits):
    """BentoML #5215: the image as the whole body, without multipart."""
    images, labels = mnist_test_digits
    for fmt, media_type in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        data = encode(images[3], fmt)
        expected = post_files(server, "/classify", "image", [data])[1]
        status, _, raw = server.request(
            "/classify", data=data, headers={"Content-Type": media_type}
        )
        assert status == 200 and json.loads(raw) == expected
        assert expected["digit"] == labels[3]


def test_a_valid_image_with_a_misleading_part_type_is_classified(server, mnist_test_digits):
    images, _ = mnist_test_digits
    png = encode(images[0], "PNG")
    expected = post_files(server, "/classify", "image", [png])[1]
    for content_type in ("image/jpg", "image/svg+xml", "application/octet-stream", None):
        status, answer = post_files(server, "/classify", "image", [png], content_type=content_type)
        assert status == 200 and answer == expected, content_type


def test_an_oversized_request_is_split_below_the_maximum_batch(server, mnist_test_digits):
    images, _ = mnist_test_digits
    model = server.instance.tasks["classify"].model
    calls = model.predictor = RecordingPredictor(model.predictor)
    try:
        files = [encode(p, "PNG") for p in images[:MAX_ITEMS]]
        status, answers = post_files(server, "/classify_batch", "images", files)
    finally:
        model.predictor = calls.predictor
    assert status == 200 and len(answers) == MAX_ITEMS
    assert sum(calls.batch_sizes) == MAX_ITEMS
    assert max(calls.batch_sizes) <= CLASSIFY_MAX_BATCH  # every model call
    status, error = post_files(server, "/classify_batch", "images", files + files[:1])
    assert status == 400 and error["detail"][0]["type"] == "too_long"


# --- bad input: always a 4xx with a JSON object naming the problem ---------------------


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(999)))


def _jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    return encode(noise, "JPEG")


def _tiff() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (28, 28)).save(buffer, format="TIFF")
    return buffer.getvalue()


BAD_UPLOADS = {
    "not an image": (b"hello, world", "image/png", "invalid_image"),
    "unsupported format (TIFF)": (_tiff(), "image/tiff", "invalid_image"),
    "truncated JPEG": (_jpeg()[:400], "image/jpeg", "corrupt_image"),
    "decompression bomb": (_png_header_only(60_000, 60_000), "image/png", "image_too_large"),
    "over the pixel limit": (_png_header_only(5_000, 5_000), "image/png", "image_too_large"),
    "empty file": (b"", "image/png", "empty_file"),
    # BentoML #5006: a part Content-Type Pillow does not know must not become a 500.
    "non-image labelled image/x-unknown": (b"GIF89a?", "image/x-unknown", "invalid_image"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_uploads(server, case):
    data, content_type, kind = BAD_UPLOADS[case]
    status, error = post_files(server, "/classify", "image", [data], content_type=content_type)
    assert status == 400
    assert error["detail"][0]["type"] == kind and error["detail"][0]["loc"] == ["image"]
    status, error = post_files(
        server, "/classify_batch", "images", [encode(np.zeros((28, 28), np.uint8), "PNG"), data]
    )
    assert status == 400 and error["detail"][0]["loc"] == ["images", 1]


def test_a_request_over_one_batch_reports_every_bad_upload(server, mnist_test_digits):
    # More images than one batch take the chunked path (headers read off the event
    # loop, pixels decoded chunk by chunk): the answer still lists every bad file.
    images, _ = mnist_test_digits
    files = [encode(p, "PNG") for p in images[:MAX_ITEMS]]
    files[1] = files[-1] = _jpeg()[:400]
    status, error = post_files(server, "/classify_batch", "images", files)
    assert status == 400
    problems = [(problem["type"], problem["loc"]) for problem in error["detail"]]
    assert problems == [("corrupt_image", ["images", 1]), ("corrupt_image", ["images", 15])]
    files[3] = b"hello, world"  # a bad header is found before any pixel is decoded
    status, error = post_files(server, "/classify_batch", "images", files)
    problems = [(problem["type"], problem["loc"]) for problem in error["detail"]]
    assert status == 400 and problems == [("invalid_image", ["images", 3])]


BAD_REQUESTS = {
    # name: (path, body, Content-Type, expected status, expected problem type)
    "text field instead of a file": (
        "/classify",
        *multipart([("image", None, b"hello", None)]),
        400,
        "not_a_file",
    ),
    "URL instead of a file": (
        "/classify",
        *multipart([("image", None, b"http://127.0.0.1:9/x.png", None)]),
        400,
        "not_a_file",
    ),
    "file under another name": (
        "/classify",
        *multipart([("picture", "a.png", b"\x89PNG", "image/png")]),
        400,
        "missing",
    ),
    "no file": ("/classify_batch", *multipart([("note", None, b"1", None)]), 400, "missing"),
    "JSON to an upload endpoint": (
        "/classify",
        b'{"image": "x"}',
        JSON_TYPE,
        415,
        "unsupported_media_type",
    ),
    # A raw body must be an image type; the bytes decide the format.
    "raw octet-stream body": (
        "/classify",
        b"\x89PNG\r\n",
        "application/octet-stream",
        415,
        "unsupported_media_type",
    ),
    "raw image body that is not an image": (
        "/classify",
        b"\x89PNG\r\n",
        "image/png",
        400,
        "invalid_image",
    ),
    "multipart without boundary": (
        "/classify",
        b"--x--",
        "multipart/form-data",
        415,
        "unsupported_media_type",
    ),
    "malformed multipart": (
        "/classify",
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\nxx',
        "multipart/form-data; boundary=b",
        400,
        "missing",
    ),
    "empty text": ("/sentiment", b'{"text": ""}', JSON_TYPE, 400, "string_too_short"),
    "blank text": ("/sentiment", b'{"text": " \\n\\t"}', JSON_TYPE, 400, "empty_text"),
    "over-long text": (
        "/sentiment",
        json.dumps({"text": "a" * (MAX_TEXT + 1)}).encode(),
        JSON_TYPE,
        400,
        "string_too_long",
    ),
    "invalid UTF-8": ("/sentiment", b'{"text": "\xff\xfe"}', JSON_TYPE, 400, "json_invalid"),
    "invalid JSON": ("/sentiment", b'{"text": ', JSON_TYPE, 400, "json_invalid"),
    "text not a string": ("/sentiment", b'{"text": 5}', JSON_TYPE, 400, "string_type"),
    "missing text": ("/sentiment", b"{}", JSON_TYPE, 400, "missing"),
    "list instead of object": ("/sentiment", b'["a"]', JSON_TYPE, 400, "model_type"),
    "text/plain body": ("/sentiment", b"nice film", "text/plain", 415, "unsupported_media_type"),
    "form-encoded body": (
        "/sentiment",
        b"text=nice",
        "application/x-www-form-urlencoded",
        415,
        "unsupported_media_type",
    ),
    "BentoML pickle body": (
        "/sentiment",
        b"\x80\x04N.",
        "application/vnd.bentoml+pickle",
        415,
        "unsupported_media_type",
    ),
    "empty text list": ("/sentiment_batch", b'{"texts": []}', JSON_TYPE, 400, "too_short"),
    "too many texts": (
        "/sentiment_batch",
        json.dumps({"texts": ["ok"] * (MAX_ITEMS + 1)}).encode(),
        JSON_TYPE,
        400,
        "too_long",
    ),
    "one blank text in a batch": (
        "/sentiment_batch",
        b'{"texts": ["good", "  "]}',
        JSON_TYPE,
        400,
        "empty_text",
    ),
    "n = 0": ("/generate", b'{"n": 0}', JSON_TYPE, 400, "greater_than_equal"),
    "n = 65": ("/generate", b'{"n": 65}', JSON_TYPE, 400, "less_than_equal"),
    "digit = 10": ("/generate", b'{"digit": 10}', JSON_TYPE, 400, "less_than_equal"),
    "digit = -1": ("/generate", b'{"digit": -1}', JSON_TYPE, 400, "greater_than_equal"),
    "n as a string": ("/generate", b'{"n": "3"}', JSON_TYPE, 400, "int_type"),
    "n as a float": ("/generate", b'{"n": 2.5}', JSON_TYPE, 400, "int_type"),
    "seed out of range": (
        "/generate",
        b'{"seed": 99999999999999999999999}',
        JSON_TYPE,
        400,
        "less_than_equal",
    ),
    "grid not a boolean": ("/generate", b'{"grid": "yes"}', JSON_TYPE, 400, "bool_type"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests(server, case):
    path, body, content_type, expected_status, kind = BAD_REQUESTS[case]
    status, _, raw = server.request(path, data=body, headers={"Content-Type": content_type})
    assert status == expected_status, raw
    error = json.loads(raw)
    # An object (not BentoML 1.4.39's list for 4xx exceptions) naming the problem.
    assert isinstance(error, dict) and isinstance(error["error"], str) and error["error"]
    assert kind in [detail["type"] for detail in error["detail"]], error
