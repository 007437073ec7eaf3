"""The service over real HTTP: ``bentoml serve`` in a child process, one per module.

Real inputs (MNIST test digits as PNG and JPEG in both polarities, SST-2 test
sentences, raw text), concurrency and batching as seen on /metrics, every
kind of bad input, generate determinism, the BentoML system endpoints, the
OpenAPI page and the Python client. The server runs with small limits so the
limit checks stay cheap: 16 items per request, batches of at most 8 images,
a 1 MiB body.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from urllib.parse import urlparse

import aiohttp
import numpy as np
import psutil
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.multipart import Part, multipart_body

MAX_ITEMS = 16
CLASSIFY_MAX_BATCH = 8
MAX_BODY = 1024 * 1024
MAX_TEXT = 500
HEADER_TIMEOUT_S = 2
MAX_CONNECTIONS = 300  # above the 256-client test
REQUEST_TIMEOUT_S = 8  # well above any test's request, below the 60 s default
SERVER_ENV = {
    "SERVING_DEVICE": "cpu",
    "SERVING_THREADS": "1",
    "SERVING_MAX_ITEMS_PER_REQUEST": str(MAX_ITEMS),
    "SERVING_CLASSIFY_MAX_BATCH_SIZE": str(CLASSIFY_MAX_BATCH),
    "SERVING_MAX_BODY_BYTES": str(MAX_BODY),
    "SERVING_MAX_TEXT_CHARS": str(MAX_TEXT),
    "SERVING_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "SERVING_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "SERVING_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
}
RAW_SENTENCES = [
    ("What a wonderful, moving film. I loved every minute of it!", "positive"),
    ("A dull, tedious mess that goes nowhere.", "negative"),
]


@pytest.fixture(scope="module")
def server(model_store, serve):
    return serve("service.service:ServingService", SERVER_ENV)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def multipart(parts: Sequence[Part]) -> tuple[bytes, str]:
    return multipart_body(parts, boundary="test-boundary-7d4a1f")


def post_files(server, path: str, field: str, files: Sequence[bytes], content_type="image/png"):
    return server.post_files(path, field, files, content_type)


def batch_histogram(server) -> dict[str, dict[str, float]]:
    """endpoint → {bucket upper bound: cumulative count, 'count': batches, 'sum': items}."""
    _, _, raw = server.request("/metrics")
    result: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(raw.decode()):
        if family.name != "serving_batch_size":
            continue
        for sample in family.samples:
            entry = result.setdefault(sample.labels["endpoint"], {})
            if sample.name.endswith("_bucket"):
                entry[sample.labels["le"]] = entry.get(sample.labels["le"], 0.0) + sample.value
            elif sample.name.endswith("_count"):
                entry["count"] = entry.get("count", 0.0) + sample.value
            elif sample.name.endswith("_sum"):
                entry["sum"] = entry.get("sum", 0.0) + sample.value
    return result


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


# --- system endpoints and documentation ------------------------------------------------


def test_health_metrics_and_openapi(server):
    assert server.request("/livez")[0] == 200
    assert server.request("/readyz")[0] == 200
    status, _, page = server.request("/")
    assert status == 200 and b"<html" in page.lower()
    status, _, raw = server.request("/docs.json")
    spec = json.loads(raw)
    for route in ("/classify", "/classify_batch", "/sentiment", "/sentiment_batch", "/generate"):
        operation = spec["paths"][route]["post"]
        assert "curl" in operation["description"], route
    assert "multipart/form-data" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert "A gripping, beautifully acted film." in json.dumps(spec)
    status, _, raw = server.request("/metrics")
    assert status == 200
    text = raw.decode()
    assert "serving_batch_size_bucket" in text
    assert 'serving_model_seconds_sum{endpoint="classify"}' in text
    for route in ("/classify", "/sentiment", "/generate"):
        assert f'endpoint="{route}"' in text, route  # BentoML's per-endpoint request metrics


def request_counts(server, endpoint: str) -> dict[str, float]:
    """BentoML's ``bentoml_service_request_total`` for one route, by status code."""
    _, _, raw = server.request("/metrics")
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            if sample.name == "bentoml_service_request_total" and (
                sample.labels["endpoint"] == endpoint
            ):
                code = sample.labels["http_response_code"]
                counts[code] = counts.get(code, 0.0) + sample.value
    return counts


def test_request_metrics_count_every_answer_by_route_and_status(server):
    """service.traffic_metrics records BentoML's request metrics itself: same names,
    labels and counts as BentoML's middleware, with the children looked up once."""
    before = request_counts(server, "/sentiment")
    for _ in range(3):
        assert server.post_json("/sentiment", {"text": "A fine film."})[0] == 200
    assert server.post_json("/sentiment", {"text": ""})[0] == 400
    after = request_counts(server, "/sentiment")
    assert delta(after, before, "200") == 3 and delta(after, before, "400") == 1
    _, _, raw = server.request("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    durations = [
        s for s in families["bentoml_service_request_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels["endpoint"] == "/sentiment"
        and s.labels["http_response_code"] == "200"
    ]  # fmt: skip
    assert sum(s.value for s in durations) >= 3
    in_progress = [
        s.value for s in families["bentoml_service_request_in_progress"].samples
        if s.labels["endpoint"] == "/sentiment"
    ]  # fmt: skip
    assert in_progress and sum(in_progress) == 0  # nothing is left counted as running
    assert "bentoml_service_last_request_timestamp_seconds" in families


def test_the_web_page_is_served_and_linked_from_the_openapi_page(server):
    status, headers, _ = server.request("/ui")  # urllib follows the redirect to /ui/
    assert status == 200 and headers["content-type"].startswith("text/html")
    status, _, page = server.request("/ui/")
    for asset in re.findall(rb'(?:src|href)="([a-z]+\.(?:js|css))"', page):
        assert server.request("/ui/" + asset.decode())[0] == 200, asset
    assert server.request("/ui/missing.js")[0] == 404
    spec = json.loads(server.request("/docs.json")[2])
    assert "](/ui/)" in spec["paths"]["/classify"]["post"]["description"]


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


def test_a_second_service_on_the_host_leaves_the_first_ones_metrics_alone(
    server, serve, mnist_test_digits
):
    images, _ = mnist_test_digits
    assert post_files(server, "/classify", "image", [encode(images[0], "PNG")])[0] == 200
    counted = batch_histogram(server)["classify"]["sum"]
    other = serve("service.service:ServingService", SERVER_ENV)  # same BENTOML_HOME
    try:
        assert batch_histogram(other).get("classify", {}).get("sum", 0.0) == 0.0
        assert batch_histogram(server)["classify"]["sum"] == counted
    finally:
        other.stop()


# --- start-up ----------------------------------------------------------------------------


def test_a_damaged_store_entry_stops_the_start_with_one_line(model_store, bentoml_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(bentoml_home / "models", home / "models")
    name, version = model_store["mnist-cnn"].split(":")
    (home / "models" / name / version / "model.yaml").write_text("name: [unclosed\n  bad: : :\n")
    env = {**os.environ, "BENTOML_HOME": str(home), **SERVER_ENV}
    command = [sys.executable, "-m", "bentoml", "serve", "service.service:ServingService",
               "--port", "1"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"model store entry mnist-cnn:{version} is damaged: ")
    assert "model.yaml" in last and "Traceback" not in result.stderr


# --- limits at the HTTP layer ---------------------------------------------------------


def _raw_exchange(server, head: bytes, *, trickle_s: float | None = None) -> bytes:
    """Send ``head`` on a fresh connection (one byte per ``trickle_s`` if given) and
    return everything the server sends before it closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        try:
            if trickle_s is None:
                connection.sendall(head)
            else:
                for byte in head:
                    connection.sendall(bytes([byte]))
                    time.sleep(trickle_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed early, as it should
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        return received


def _status_and_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize(
    ("headers", "kind"),
    [
        ([("X-Big", "x" * 40_000)], "headers_too_large"),
        ([("X-Big", "x" * 16 * 2**20)], "headers_too_large"),  # not read to the end
        ([(f"X-{i}", "1") for i in range(150)], "too_many_headers"),
    ],
    ids=["40 KiB", "16 MiB", "150 fields"],
)
def test_request_heads_over_the_limits_get_431(server, headers, kind):
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    head = f"POST /sentiment HTTP/1.1\r\nHost: test\r\n{lines}\r\n".encode()
    status, error = _status_and_error(_raw_exchange(server, head))
    assert status == 431 and error["detail"][0]["type"] == kind
    assert server.post_json("/sentiment", {"text": "fine"})[0] == 200


def test_a_head_that_trickles_in_gets_408_and_the_connection_closes(server):
    head = b"POST /sentiment HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"x" * 100
    started = time.monotonic()
    response = _raw_exchange(server, head, trickle_s=0.1)  # 10 s for the whole head
    status, error = _status_and_error(response)
    assert status == 408 and error["detail"][0]["type"] == "request_timeout"
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 5


def test_a_body_that_never_arrives_gets_504_after_the_request_timeout(server):
    head = (
        b"POST /sentiment HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\nConnection: close\r\n\r\n"
    )
    started = time.monotonic()
    status, error = _status_and_error(_raw_exchange(server, head + b'{"text": "the rest'))
    waited = time.monotonic() - started
    assert status == 504 and error["detail"][0]["type"] == "timeout", error
    assert REQUEST_TIMEOUT_S <= waited < REQUEST_TIMEOUT_S + 5
    assert server.post_json("/sentiment", {"text": "fine"})[0] == 200


def test_connections_beyond_the_cap_get_503_and_the_server_keeps_serving(server):
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        status, error = _status_and_error(_raw_exchange(server, b""))
        assert status == 503 and error["detail"][0]["type"] == "too_many_connections"
    finally:
        for connection in idle:
            connection.close()
    time.sleep(0.2)
    assert server.post_json("/sentiment", {"text": "fine"})[0] == 200


def test_clients_that_leave_mid_upload_cost_one_log_line_not_tracebacks(server):
    before = len(server.log())
    head = (
        b"POST /classify_batch HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    )
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", server.port)) as connection:
            connection.sendall(head + b"--b\r\n" + b"x" * 1000)
    time.sleep(0.5)
    assert server.post_json("/sentiment", {"text": "fine"})[0] == 200
    logged = server.log()[before:]
    assert "Traceback" not in logged and "ClientDisconnect" not in logged
    assert 1 <= logged.count("disconnected before their answer") <= 2


def test_shutdown_drains_kept_alive_connections_without_resets(model_store, serve):
    """Clients keep sending on their connections through SIGTERM: each request is
    served, or answered 503 with Connection: close; none meets a reset."""
    drained = serve("service.service:ServingService", {**SERVER_ENV, "SERVING_DRAIN_IDLE_S": "2"})
    outcomes: Counter[str] = Counter()
    body = json.dumps({"text": "a fine film"}).encode()
    stop = threading.Event()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", drained.port, timeout=30)
        while not stop.is_set():
            try:
                connection.request("POST", "/sentiment", body, {"Content-Type": JSON_TYPE})
                response = connection.getresponse()
                response.read()
            except ConnectionResetError:
                outcomes["reset"] += 1
                return
            except (http.client.RemoteDisconnected, ConnectionRefusedError, OSError) as error:
                outcomes[type(error).__name__] += 1
                return
            outcomes[str(response.status)] += 1
            if response.getheader("connection") == "close":
                outcomes["told to close"] += 1
                return

    idle = http.client.HTTPConnection("127.0.0.1", drained.port, timeout=30)
    idle.request("POST", "/sentiment", body, {"Content-Type": JSON_TYPE})
    first = idle.getresponse()
    first.read()
    assert first.status == 200  # the connection is kept alive, then left idle
    clients = [threading.Thread(target=client) for _ in range(16)]
    for thread in clients:
        thread.start()
    time.sleep(1.0)
    drained.process.send_signal(signal.SIGTERM)  # the server process, as an orchestrator does
    time.sleep(0.5)
    # A request on the idle connection after the signal: a clean 503, not a reset.
    idle.request("POST", "/sentiment", body, {"Content-Type": JSON_TYPE})
    late = idle.getresponse()
    assert late.status == 503 and late.getheader("connection") == "close"
    assert json.loads(late.read())["detail"][0]["type"] == "shutting_down"
    for thread in clients:
        thread.join(timeout=30)
    stop.set()
    drained.process.wait(timeout=60)
    # Busy connections: the request in flight is answered, with Connection: close.
    assert outcomes["reset"] == 0, outcomes
    assert outcomes["told to close"] == 16, outcomes  # every client was told, none cut off
    assert outcomes["200"] > 0, outcomes


# --- right answers ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("invert", [False, True], ids=["light-on-dark", "dark-on-light"])
def test_classify_mnist_digits(server, mnist_test_digits, fmt, invert):
    images, labels = mnist_test_digits
    correct = 0
    for pixels, label in zip(images[:20], labels[:20], strict=True):
        data = encode(255 - pixels if invert else pixels, fmt)
        status, answer = post_files(server, "/classify", "image", [data])
        assert status == 200, answer
        assert set(answer) == {"digit", "confidence", "probabilities"}
        assert answer["confidence"] == max(answer["probabilities"])
        correct += answer["digit"] == label
    assert correct >= 19


def test_classify_batch_keeps_the_order(server, mnist_test_digits):
    images, labels = mnist_test_digits
    files = [encode(p, "PNG") for p in images[20:32]]
    status, answers = post_files(server, "/classify_batch", "images", files)
    assert status == 200
    singles = [post_files(server, "/classify", "image", [f])[1] for f in files]
    assert [a["digit"] for a in answers] == [s["digit"] for s in singles]
    np.testing.assert_allclose(
        [a["probabilities"] for a in answers], [s["probabilities"] for s in singles], atol=1e-5
    )
    assert np.mean([a["digit"] for a in answers] == labels[20:32]) >= 0.9


def test_sentiment_on_sst2_and_raw_text(server, sst2_test_sentences):
    sentences = sst2_test_sentences[:40]
    correct = 0
    for text, label in sentences:
        status, answer = server.post_json("/sentiment", {"text": text})
        assert status == 200 and set(answer) == {"label", "score"}
        correct += (answer["label"] == "positive") == (label == 1)
    assert correct / len(sentences) >= 0.8
    for text, label in RAW_SENTENCES:
        assert server.post_json("/sentiment", {"text": text})[1]["label"] == label
    status, batch = server.post_json("/sentiment_batch", {"texts": [t for t, _ in RAW_SENTENCES]})
    assert status == 200 and [a["label"] for a in batch] == [label for _, label in RAW_SENTENCES]


def test_generate_json_grid_and_determinism(server):
    status, first = server.post_json("/generate", {"n": 4, "digit": 7, "seed": 99})
    assert status == 200 and first["seed"] == 99
    assert [image["digit"] for image in first["images"]] == [7] * 4
    png = Image.open(io.BytesIO(base64.b64decode(first["images"][0]["png"])))
    assert png.format == "PNG" and png.size == (28, 28)
    assert server.post_json("/generate", {"n": 4, "digit": 7, "seed": 99})[1] == first

    status, drawn = server.post_json("/generate", {"n": 3})
    assert status == 200 and isinstance(drawn["seed"], int)
    assert server.post_json("/generate", {"n": 3, "seed": drawn["seed"]})[1] == drawn

    request = json.dumps({"n": 16, "seed": 5, "grid": True}).encode()
    headers = {"Content-Type": "application/json"}
    status, response_headers, grid = server.request("/generate", data=request, headers=headers)
    assert status == 200 and response_headers["content-type"] == "image/png"
    assert response_headers["x-seed"] == "5"
    assert Image.open(io.BytesIO(grid)).size == (4 * 28 + 5 * 2,) * 2
    assert server.request("/generate", data=request, headers=headers)[2] == grid


def test_the_python_client(server, tmp_path, mnist_test_digits):
    import bentoml

    images, labels = mnist_test_digits
    path = tmp_path / "digit.png"
    path.write_bytes(encode(images[0], "PNG"))
    with bentoml.SyncHTTPClient(server.url) as client:
        assert client.classify(image=path)["digit"] == labels[0]
        assert len(client.classify_batch(images=[path, path])) == 2
        assert client.sentiment(text=RAW_SENTENCES[0][0])["label"] == "positive"
        assert client.generate(n=2, digit=1, seed=3)["seed"] == 3


# --- concurrency ------------------------------------------------------------------------


async def _post_concurrently(url: str, requests: Sequence[tuple[str, bytes, str]], clients: int):
    """Send every (path, body, content type) with ``clients`` connections; (status, body) each."""
    results: list = [None] * len(requests)
    queue = list(enumerate(requests))
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client():
            while queue:
                index, (path, body, content_type) = queue.pop()
                headers = {"Content-Type": content_type}
                async with session.post(url + path, data=body, headers=headers) as response:
                    results[index] = (response.status, await response.read())

        await asyncio.gather(*[client() for _ in range(clients)])
    return results


def test_64_concurrent_requests_are_batched_and_each_answer_is_right(server, mnist_test_digits):
    images, _ = mnist_test_digits
    files = [encode(p, "PNG") for p in images[:64]]
    expected = [post_files(server, "/classify", "image", [f])[1]["digit"] for f in files]
    requests = [("/classify", *multipart([("image", "d.png", f, "image/png")])) for f in files]
    before = batch_histogram(server).get("classify", {})
    results = asyncio.run(_post_concurrently(server.url, requests, clients=64))
    after = batch_histogram(server)["classify"]
    assert [status for status, _ in results] == [200] * 64
    assert [json.loads(body)["digit"] for _, body in results] == expected
    batches = delta(after, before, "count")
    assert delta(after, before, "sum") == 64
    assert batches < 64  # some model calls served more than one request
    assert delta(after, before, "1.0") < batches


def test_256_concurrent_clients_all_succeed(server, mnist_test_digits, sst2_test_sentences):
    """A naive BentoML batching setup answers many of these with 503 (#3200, #4265)."""
    images, _ = mnist_test_digits
    requests = []
    for i in range(256):
        requests.append(
            ("/classify", *multipart([("image", "d.png", encode(images[i % 200], "PNG"), None)]))
        )
        text = sst2_test_sentences[i % 200][0]
        requests.append(("/sentiment", json.dumps({"text": text}).encode(), "application/json"))
        requests.append(("/generate", json.dumps({"n": 1, "seed": i}).encode(), "application/json"))
    results = asyncio.run(_post_concurrently(server.url, requests, clients=256))
    statuses = [status for status, _ in results]
    assert statuses.count(200) == len(requests), {s: statuses.count(s) for s in set(statuses)}


def test_generate_bytes_do_not_depend_on_concurrent_requests(server):
    target = json.dumps({"n": 5, "seed": 31337}).encode()
    alone = server.request("/generate", data=target, headers={"Content-Type": "application/json"})
    others = [json.dumps({"n": n, "seed": s}).encode() for n, s in [(3, 1), (8, 2), (1, 3)] * 4]
    requests = [("/generate", body, "application/json") for body in [*others, target, *others]]
    results = asyncio.run(_post_concurrently(server.url, requests, clients=len(requests)))
    assert results[len(others)] == (200, alone[2])


def test_an_oversized_request_is_split_below_the_maximum_batch(server, mnist_test_digits):
    images, _ = mnist_test_digits
    before = batch_histogram(server).get("classify", {})
    files = [encode(p, "PNG") for p in images[:MAX_ITEMS]]
    status, answers = post_files(server, "/classify_batch", "images", files)
    after = batch_histogram(server)["classify"]
    assert status == 200 and len(answers) == MAX_ITEMS
    assert delta(after, before, "sum") == MAX_ITEMS
    # Every model call held at most CLASSIFY_MAX_BATCH images.
    assert delta(after, before, str(float(CLASSIFY_MAX_BATCH))) == delta(after, before, "count")
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


JSON_TYPE = "application/json"
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


def _one_bit_png(side: int) -> bytes:
    """A blank 1-bit PNG: about 2 KB on the wire for 4096², 16 MB once decoded."""
    buffer = io.BytesIO()
    Image.new("1", (side, side), 1).save(buffer, format="PNG")
    return buffer.getvalue()


def _worker(server) -> psutil.Process:
    [worker] = [
        child
        for child in psutil.Process(server.process.pid).children(recursive=True)
        if "worker" in " ".join(child.cmdline())
    ]
    return worker


def _peak_rss_while(process: psutil.Process, action) -> tuple[object, int]:
    """Run ``action``; (its result, the highest RSS of ``process`` meanwhile, sampled)."""
    peak, done = [process.memory_info().rss], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak.append(process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = action()
    finally:
        done.set()
        sampler.join()
    return result, max(peak)


def test_decoded_pixels_are_bounded_per_request_and_per_worker(server):
    """The amplification request: many tiny PNGs that each decode to 16 MB."""
    huge = _one_bit_png(4096)
    worker = _worker(server)
    at_rest = worker.memory_info().rss
    # Over the request's budget (4 × 4096² decoded pixels): refused from the headers.
    (status, error), peak = _peak_rss_while(
        worker, lambda: post_files(server, "/classify_batch", "images", [huge] * MAX_ITEMS)
    )
    assert status == 400
    assert [p["loc"] for p in error["detail"]] == [["images", i] for i in range(4, MAX_ITEMS)]
    assert {p["type"] for p in error["detail"]} == {"images_too_large"}
    assert peak - at_rest < 8 * 2**20  # nothing was decoded
    # Within it: decoded under the worker's budget, one large image at a time here.
    (status, answers), peak = _peak_rss_while(
        worker, lambda: post_files(server, "/classify_batch", "images", [huge] * 4)
    )
    assert status == 200 and len(answers) == 4
    assert peak - at_rest < 64 * 2**20  # one image at a time: about 34 MiB measured
    time.sleep(0.5)
    assert worker.memory_info().rss - at_rest < 16 * 2**20  # and it is given back


def test_a_valid_image_with_a_misleading_part_type_is_classified(server, mnist_test_digits):
    images, _ = mnist_test_digits
    png = encode(images[0], "PNG")
    expected = post_files(server, "/classify", "image", [png])[1]
    for content_type in ("image/jpg", "image/svg+xml", "application/octet-stream", None):
        status, answer = post_files(server, "/classify", "image", [png], content_type=content_type)
        assert status == 200 and answer == expected, content_type


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


def test_wrong_method_and_oversized_bodies(server):
    status, _, raw = server.request("/classify", method="GET")
    assert status == 405 and json.loads(raw)["detail"][0]["type"] == "method_not_allowed"
    big = bytes(MAX_BODY + 1)
    body, header = multipart([("image", "big.png", big, "image/png")])
    address = urlparse(server.url)
    # A declared Content-Length over the limit is refused before the body is read:
    # send only the headers and the first bytes (the server closes the connection).
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    connection.putrequest("POST", "/classify")
    connection.putheader("Content-Type", header)
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body[:65536])
    response = connection.getresponse()
    error = json.loads(response.read())
    assert response.status == 413 and error["detail"][0]["type"] == "payload_too_large"
    connection.close()
    # The same without Content-Length (chunked): the limit still holds.
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    connection.request(
        "POST", "/classify", body=chunks, headers={"Content-Type": header}, encode_chunked=True
    )
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]
    connection.close()


def test_the_server_keeps_serving_after_bad_input(server, mnist_test_digits):
    images, labels = mnist_test_digits
    assert server.request("/livez")[0] == 200
    status, answer = post_files(server, "/classify", "image", [encode(images[5], "PNG")])
    assert status == 200 and answer["digit"] == labels[5]
    # BentoML logs "Exception on <path>" for every answer it turned into a 500.
    assert "Exception on /" not in server.log()
