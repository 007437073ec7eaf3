"""The service over real HTTP: ``bentoml serve`` in a child process, one per module.

What needs a process and a socket: the BentoML system endpoints and ``/metrics``
(Prometheus' multiprocess folder), the OpenAPI page and the Python client over
HTTP, concurrency and batching as seen on ``/metrics``, the limits of the HTTP
layer (heads, connections, bodies over the limit, clients that leave), the
request timeout, start-up failures, the worker's memory and a graceful drain.
Request bodies, good and bad, are checked in process (``test_service_requests``,
``test_service_inprocess``). The server runs with small limits so the limit
checks stay cheap: 16 items per request, batches of at most 8 images, a 1 MiB
body.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from urllib.parse import urlparse

import aiohttp
import numpy as np
import psutil
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT
from tests.service_payloads import encode, multipart

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
JSON_TYPE = "application/json"
RAW_SENTENCES = [
    ("What a wonderful, moving film. I loved every minute of it!", "positive"),
    ("A dull, tedious mess that goes nowhere.", "negative"),
]


@pytest.fixture(scope="module")
def server(model_store, serve):
    return serve("service.service:ServingService", SERVER_ENV)


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
    assert server.request("/admin/models")[0] == 404  # no admin key, no management routes
    status, _, page = server.request("/")
    assert status == 200 and b"<html" in page.lower()
    status, _, raw = server.request("/docs.json")
    spec = json.loads(raw)
    for route in ("/classify", "/classify_batch", "/sentiment", "/sentiment_batch", "/generate"):
        operation = spec["paths"][route]["post"]
        assert "curl" in operation["description"], route
    assert "multipart/form-data" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert "A gripping, beautifully acted film." in json.dumps(spec)
    png = encode(np.zeros((28, 28), np.uint8), "PNG")
    assert server.request("/classify", data=png, headers={"Content-Type": "image/png"})[0] == 200
    status, _, raw = server.request("/metrics")
    assert status == 200
    text = raw.decode()
    assert "serving_batch_size_bucket" in text
    pinned = json.loads((REPO_ROOT / "models" / "served_models.json").read_text())
    version = pinned["mnist-cnn"].partition(":")[2]
    # The service's own metrics carry the model version that answered.
    assert f'serving_model_seconds_sum{{endpoint="classify",version="{version}"}}' in text
    answered = {
        (sample.labels["endpoint"], sample.labels["version"], sample.labels["code"])
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "serving_requests_total"
    }
    assert ("classify", version, "200") in answered
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
