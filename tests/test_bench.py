"""The benchmark tooling against a tiny real HTTP server: payloads, the closed-loop
load generator, the metrics reader, the reports, the comparison sets and the
locustfile."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from bench import payloads, profiling
from bench.config import Target, load_comparison_set
from bench.loadgen import BAD_ANSWER, run_closed_loop, split_concurrency
from bench.multipart import file_parts, multipart_body
from bench.payloads import Request, Workload
from bench.report import evaluate_targets, machine_info, write_report
from bench.server import SERVER_PYTHONS, ServiceProcess, batch_stats
from tests.tool_envs import tool_python

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = payloads.default_data_dir()
needs_data = pytest.mark.skipif(
    not (DATA_DIR / payloads.MNIST_TEST_IMAGES).exists(), reason="data sets not present"
)

SERVER_DELAY_S = 0.005
LABELS = 'method_name="classify",service_name="S",worker_index="1"'
METRICS = (
    "# HELP bentoml_service_adaptive_batch_size Service adaptive batch size\n"
    "# TYPE bentoml_service_adaptive_batch_size histogram\n"
    f'bentoml_service_adaptive_batch_size_bucket{{{{le="1.0",{LABELS}}}}} 0.0\n'
    f'bentoml_service_adaptive_batch_size_bucket{{{{le="+Inf",{LABELS}}}}} {{count}}\n'
    f"bentoml_service_adaptive_batch_size_count{{{{{LABELS}}}}} {{count}}\n"
    f"bentoml_service_adaptive_batch_size_sum{{{{{LABELS}}}}} {{total}}\n"
)


class TinyServer:
    """An aiohttp app on an ephemeral port in a background thread.

    ``/ok`` answers after a short delay; ``/flaky`` answers 503 to every third
    request; ``/metrics`` serves a batch-size histogram; the v2 infer path answers a
    binary-extension request with uniform probabilities, as binary data.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.bodies: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    async def ok(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.counts["ok"] += 1
        if len(self.bodies) < 5:
            self.bodies.append(body)
        await asyncio.sleep(SERVER_DELAY_S)
        return web.json_response({"label": "7"})

    async def flaky(self, request: web.Request) -> web.Response:
        await request.read()
        self.counts["flaky"] += 1
        if self.counts["flaky"] % 3 == 0:
            return web.Response(status=503, text="overloaded")
        return web.json_response({"label": "7"})

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(text=METRICS.format(count=10.0, total=40.0))

    async def infer(self, request: web.Request) -> web.Response:
        body = await request.read()
        json_length = int(request.headers[payloads.INFERENCE_HEADER])
        [tensor] = json.loads(body[:json_length])["inputs"]
        rows = tensor["shape"][0]
        if len(body) - json_length != tensor["parameters"]["binary_data_size"]:
            return web.Response(status=400, text="size")
        data = np.full((rows, 10), 0.1, dtype="<f4").tobytes()
        output = {"name": "probabilities", "datatype": "FP32", "shape": [rows, 10],
                  "parameters": {"binary_data_size": len(data)}}  # fmt: skip
        header = json.dumps({"model_name": "mnist-cnn", "outputs": [output]}).encode()
        return web.Response(
            body=header + data,
            headers={payloads.INFERENCE_HEADER: str(len(header))},
            content_type="application/octet-stream",
        )

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.add_routes(
            [
                web.post("/ok", self.ok),
                web.post("/flaky", self.flaky),
                web.get("/metrics", self.metrics),
                web.post(payloads.V2_INFER_PATH, self.infer),
            ]
        )
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> TinyServer:
        self.thread.start()
        assert self.ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *_exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server():
    with TinyServer() as running:
        yield running


def _workload(path: str) -> Workload:
    body, content_type = multipart_body(file_parts("image", [b"\x89PNG fake"]))
    return Workload(path.strip("/"), path, (Request("POST", path, body, content_type),))


def test_split_concurrency_spreads_clients_evenly():
    assert split_concurrency(256, 6) == [43, 43, 43, 43, 42, 42]
    assert split_concurrency(1, 4) == [1]
    assert sum(split_concurrency(64, 3)) == 64


def test_closed_loop_counts_latency_and_statuses(server):
    workload = _workload("/ok")
    result = run_closed_loop(server.url, workload, 4, 1.0, warmup_s=0.3, processes=2)
    assert result.client_processes == 2
    assert result.errors == 0 and set(result.statuses) == {"200"}
    assert result.ok == result.requests > 0
    # Four closed-loop clients can never exceed 4 / delay requests per second.
    assert result.requests_per_s <= 4 / SERVER_DELAY_S
    assert result.latency_ms["p50"] >= SERVER_DELAY_S * 1000
    assert result.latency_ms["p50"] <= result.latency_ms["p95"] <= result.latency_ms["p99"]
    assert server.counts["ok"] >= result.ok  # warm-up requests reach the server too
    assert result.client_cpu_s > 0
    # The exact bytes prepared in advance are what the server receives.
    assert workload.requests[0].body in server.bodies


def test_closed_loop_reports_errors_by_status(server):
    result = run_closed_loop(server.url, _workload("/flaky"), 3, 0.8, warmup_s=0.2, processes=1)
    assert result.statuses["503"] == result.errors > 0
    # Every third request fails, so about a third of those measured did.
    assert 0.2 < result.errors / result.requests < 0.45


def test_closed_loop_records_refused_connections():
    with TinyServer() as stopped:
        url = stopped.url
    result = run_closed_loop(url, _workload("/ok"), 2, 0.3, warmup_s=0.0, processes=1)
    assert result.ok == 0 and result.errors == result.requests > 0
    assert all(key.startswith("error:") for key in result.statuses)


def test_profile_summary_attributes_time_to_the_deepest_known_frame():
    loop = "run (asyncio/events.py:80);ApiGate.__call__ (service/http.py:96)"
    collapsed = "\n".join(
        [
            f"{loop};grid_png (service/imaging.py:90);save (PIL/Image.py:2400) 30",
            f"{loop};decode_and_prepare (service/inference.py:90);load (PIL/ImageFile.py:200) 50",
            "_worker (concurrent/futures/thread.py:90) 15",
            f"{loop} 5",
            "garbage line",
        ]
    )
    summary = profiling.summarise_collapsed(collapsed)
    assert summary.samples == 100
    assert dict(summary.categories) == {
        "image decode and preprocessing": 50.0,
        "response PNG encoding": 30.0,
        profiling.WAITING_CATEGORY: 15.0,
        "request gate and dispatch (service/http.py, the route table, the tasks' answers)": 5.0,
    }
    assert dict(summary.inclusive)["service/http.py:ApiGate.__call__"] == 85.0
    assert "| response PNG encoding | 30.0 |" in profiling.markdown(summary, "t")


def test_batch_stats_mean_since_earlier_scrape():
    before = batch_stats(METRICS.format(count=10.0, total=40.0))
    after = batch_stats(METRICS.format(count=30.0, total=240.0))
    key = "bentoml_service_adaptive_batch_size:classify"
    assert after.mean_since(before) == {key: 10.0}
    assert after.mean_since(after) == {}


def test_report_files_and_targets(server, tmp_path):
    point = run_closed_loop(server.url, _workload("/ok"), 2, 0.5, warmup_s=0.1, processes=1)
    point.server = {"mean_batch_size": {"bentoml_service_adaptive_batch_size:ok": 2.5}}
    report = {
        "name": "tiny",
        "description": "test",
        "created": "now",
        "command": "pytest",
        "machine": machine_info(),
        "settings": {"duration_s": 0.5, "warmup_s": 0.1, "client_processes": 1},
        "configs": [{"name": "only", "env": {}, "points": [point.to_dict()], "error": None}],
    }
    report["targets"] = evaluate_targets(
        report,
        [
            Target("only", "ok", 2, min_requests_per_s=1, max_p99_ms=10_000),
            Target("only", "ok", 2, min_requests_per_s=1e9),
            Target("only", "ok", 64),
        ],
    )
    assert [t["met"] for t in report["targets"]] == [True, False, None]
    write_report(report, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "| only | 2 |" in markdown and "| 2.50 |" in markdown
    assert json.loads((tmp_path / "report.json").read_text())["configs"][0]["points"][0]["ok"]
    assert (tmp_path / "latency_vs_throughput.png").read_bytes().startswith(b"\x89PNG")


def test_unknown_workload_names_are_rejected():
    assert payloads.check_workload_name("classify-1024") == "classify-1024"
    for bad in ("classify-0", "classify-x", "generate", "sentiments"):
        with pytest.raises(ValueError, match="unknown workload"):
            payloads.check_workload_name(bad)


ALL_SETS = sorted(p.stem for p in (Path(__file__).parents[1] / "bench/configs").glob("*.toml"))


@pytest.mark.parametrize("name", ALL_SETS)
def test_comparison_sets_load(name):
    comparison_set = load_comparison_set(name)
    assert comparison_set.configs and comparison_set.workloads
    assert {"classify", "sentiment"} <= {plan.name for plan in comparison_set.workloads}
    for plan in comparison_set.workloads:
        assert plan.concurrency and all(c > 0 for c in plan.concurrency)


class _RecordingEnviron(dict):
    """An environment that remembers every variable name it was asked for."""

    def __init__(self, values):
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)


@pytest.mark.parametrize("name", ALL_SETS)
def test_comparison_sets_use_only_the_services_settings(name):
    from service.settings import Settings

    for config in load_comparison_set(name).configs:
        if config.server != "service":
            continue  # a peer reads its own PEER_* variables
        environ = _RecordingEnviron(config.env)
        Settings.from_env(environ)  # raises on a value the service cannot use
        assert set(config.env) <= environ.asked, f"{config.name}: unknown variables"


@needs_data
def test_payloads_are_real_test_data():
    built = payloads.build_workloads(
        DATA_DIR, ["classify", "classify-8", "sentiment", "generate-mixed"], pool_size=16
    )
    digits = payloads.read_mnist_test_digits(DATA_DIR, 16)
    body = built["classify"].requests[3].body
    png = body[body.index(b"\x89PNG") : body.rindex(b"\r\n--")]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), digits[3])
    assert built["classify-8"].requests[0].body.count(b"\x89PNG") == 8
    assert built["classify-8"].mean_items == 8
    sentences = payloads.read_sst2_test_sentences(DATA_DIR)
    assert len(sentences) == 1821
    assert json.loads(built["sentiment"].requests[0].body)["text"] == sentences[0]
    sizes = {json.loads(r.body)["n"] for r in built["generate-mixed"].requests}
    assert sizes <= set(range(1, 17)) and len(sizes) > 4


def test_locustfile_parses_and_lists_its_users():
    listed = subprocess.run(
        [
            str(Path(sys.executable).with_name("locust")),
            "-f",
            str(REPO_ROOT / "bench" / "locustfile.py"),
            "--list",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    for user in ("ClassifyUser", "ClassifyBatchUser", "SentimentUser", "GenerateUser", "MixedUser"):
        assert user in listed


def test_the_peer_set_names_servers_revisions_and_relative_targets():
    from bench.config import load_comparison_set
    from bench.report import evaluate_targets

    peers = load_comparison_set("peers")
    servers = {config.name: config.server for config in peers.configs}
    assert servers["service"] == "service" and servers["litserve"] == "litserve-peer"
    assert peers.config("service-before").revision
    assert "classify" not in peers.config("litserve").skip

    def point(config, requests_per_s, p99, cpu_percent=None, model_s=None):
        server = {"cpu_core_percent": cpu_percent, "model_s": model_s} if cpu_percent else {}
        return {"config": config, "workload": "classify", "concurrency": 64,
                "requests_per_s": requests_per_s, "requests": int(requests_per_s * 6),
                "duration_s": 6.0, "errors": 0, "latency_ms": {"p50": 1.0, "p99": p99},
                "server": server}  # fmt: skip

    report = {
        "configs": [
            # 1,000 req/s at 100 % of a core: 1.0 ms per request, 0.2 ms of it in the model.
            {"name": "service", "points": [point("service", 1000.0, 50.0, 100.0, 1.2)]},
            {"name": "service-1-thread",
             "points": [point("service-1-thread", 1000.0, 50.0, 100.0, 1.2)]},
            {"name": "litserve", "points": [point("litserve", 390.0, 60.0)]},
        ]
    }  # fmt: skip
    targets = [t for t in peers.targets if t.workload == "classify" and t.concurrency == 64]
    # The CPU outside the model is judged where the model's wall time is its CPU time.
    [outside] = [t for t in targets if t.max_outside_model_ms is not None]
    [relative] = [t for t in targets if t.relative_to == "litserve"]
    assert outside.config == "service-1-thread" and relative.config == "service"
    [outside_result, relative_result] = evaluate_targets(report, [outside, relative])
    assert relative_result["measured"]["ratio"] == pytest.approx(1000 / 390)
    assert relative_result["met"] is True  # 2.56× LitServe with a lower p99
    assert outside_result["measured"]["outside_model_ms"] == pytest.approx(0.8)
    assert outside_result["met"] is False  # 0.8 ms outside the model is over the 0.35 ms bound
    # Against the minimal batched server: throughput ratio and p99 ratio, both bounded.
    report["configs"].append(
        {"name": "minimal-batched", "points": [point("minimal-batched", 1000.0, 40.0)]}
    )
    [minimal] = [t for t in targets if t.relative_to == "minimal-batched"]
    assert (minimal.min_ratio, minimal.max_p99_ratio) == (0.95, 1.25)
    assert evaluate_targets(report, [minimal])[0]["met"] is True  # p99 50 ≤ 1.25 × 40
    report["configs"][-1]["points"][0]["latency_ms"]["p99"] = 39.0
    assert evaluate_targets(report, [minimal])[0]["met"] is False  # 50 > 1.25 × 39


def test_the_minimal_batched_peer_batches_and_answers_right(mnist_test_digits):
    """The yardstick serves the classify job: right digits, rows of concurrent requests
    in shared model calls."""
    import asyncio
    import io

    import httpx
    from PIL import Image

    from bench.multipart import file_parts, multipart_body
    from bench.peers import minimal_batched

    calls: list[int] = []
    model = minimal_batched.batcher.model
    minimal_batched.batcher.model = lambda rows: calls.append(len(rows)) or model(rows)
    images, labels = mnist_test_digits

    async def classify_all() -> list[int]:
        transport = httpx.ASGITransport(app=minimal_batched.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://peer") as client:

            async def one(pixels) -> int:
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                body, content_type = multipart_body(file_parts("image", [buffer.getvalue()]))
                response = await client.post(
                    "/classify", content=body, headers={"Content-Type": content_type}
                )
                return response.json()["digit"]

            return await asyncio.gather(*(one(pixels) for pixels in images[:64]))

    try:
        digits = asyncio.run(classify_all())
    finally:
        minimal_batched.batcher.model = model
        minimal_batched.batcher.consumer = None
    assert sum(d == label for d, label in zip(digits, labels[:64], strict=True)) >= 62
    assert sum(calls) == 64 and max(calls) > 1


def test_against_a_revision_adds_the_service_configs_there_and_compares_them():
    from bench.config import load_comparison_set
    from bench.run import against_revision

    peers = load_comparison_set("peers")
    extended = against_revision(peers, "abc123")
    added = {c.name: c for c in extended.configs if c.name.endswith("@abc123")}
    # Every configuration of the service as it is, and no peer and no earlier revision.
    assert set(added) == {"service@abc123", "service-1-thread@abc123"}
    assert added["service-1-thread@abc123"].env == peers.config("service-1-thread").env
    assert all(c.revision == "abc123" for c in added.values())
    new = extended.comparisons[len(peers.comparisons) :]
    assert {(c.baseline, c.variant) for c in new} == {
        ("service@abc123", "service"),
        ("service-1-thread@abc123", "service-1-thread"),
    }


def test_the_soak_counts_answers_by_status_from_bentomls_counter():
    from bench.soak import answered

    family = "bentoml_service_request_total"
    labels = 'service_name="s",service_version="v",runner_name="r"'
    counts = [("/classify", "200", 90.0), ("/classify", "503", 4.0), ("/sentiment", "200", 6.0)]
    text = f"# HELP {family} Total number of HTTP requests\n# TYPE {family} counter\n" + "".join(
        f'{family}{{endpoint="{route}",http_response_code="{code}",{labels}}} {value}\n'
        for route, code, value in counts
    )
    assert answered(text) == (100, 4)


@needs_data
def test_the_mixed_workload_sends_each_endpoint_the_same_share():
    [mixed] = payloads.build_workloads(DATA_DIR, ["mixed"], pool_size=16).values()
    paths = Counter(request.path for request in mixed.requests)
    assert paths == {"/classify": 16, "/sentiment": 16, "/generate": 16}
    assert {r.items for r in mixed.requests if r.path == "/generate"} == {4}


@needs_data
def test_a_short_soak_against_the_real_service(model_store, tmp_path):
    """Every part of ``make bench-soak`` on a real ``bentoml serve``, for seconds."""
    from bench import soak

    status = soak.main(["--phase", "mixed", "--minutes", "0.3", "--warmup-minutes", "0.1",
                        "--interval", "3", "--concurrency", "8", "--client-processes", "1",
                        "--output-dir", str(tmp_path)])  # fmt: skip
    report = json.loads((tmp_path / "soak.json").read_text())
    [phase] = report["phases"]
    samples = phase["samples"]
    assert len(samples) >= 5
    assert [s["requests"] for s in samples] == sorted(s["requests"] for s in samples)
    assert samples[-1]["requests"] > 100 and samples[-1]["errors"] == 0
    assert all(s["worker_rss_mib"] > 50 and s["parent_rss_mib"] > 20 for s in samples)
    summary = phase["summary"]
    assert summary["errors"] == 0 and summary["requests_after_warmup"] > 0
    assert status == (0 if summary["meets_target"] else 1)
    assert phase["load"]["statuses"] and set(phase["load"]["statuses"]) == {"200"}
    assert (tmp_path / "rss_vs_requests.png").stat().st_size > 10_000
    assert "| mixed |" in (tmp_path / "soak.md").read_text()
    # Redrawn from the report, as docs/benchmarks.md's before-and-after plot is.
    redrawn = tmp_path / "redrawn"
    assert soak.main(["--replot", str(tmp_path / "soak.json"), "--output-dir", str(redrawn)]) == 0
    assert (redrawn / "rss_vs_requests.png").is_file()


def v2_answer(outputs: dict[str, np.ndarray], binary: set[str]) -> tuple[dict[str, str], bytes]:
    """A v2 inference answer: the ``binary`` outputs as raw bytes after the JSON."""
    entries, tensors = [], []
    for name, values in outputs.items():
        datatype = {"float32": "FP32", "int64": "INT64"}[values.dtype.name]
        entry = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if name in binary:
            tensors.append(values.astype(values.dtype.newbyteorder("<")).tobytes())
            entry["parameters"] = {"binary_data_size": len(tensors[-1])}
        else:
            entry["data"] = values.ravel().tolist()
        entries.append(entry)
    header = json.dumps({"model_name": "mnist-cnn", "outputs": entries}).encode()
    headers = {"inference-header-content-length": str(len(header))} if binary else {}
    return headers, header + b"".join(tensors)


def test_v2_answers_are_read_from_json_and_binary_tensors():
    probabilities = np.random.default_rng(0).dirichlet(np.ones(10), 3).astype(np.float32)
    outputs = {"probabilities": probabilities, "digit": probabilities.argmax(axis=1)}
    for binary in ({"probabilities"}, {"probabilities", "digit"}, set()):
        headers, body = v2_answer(outputs, binary)
        read = payloads.parse_v2_answer(headers, body)
        assert np.array_equal(read["probabilities"], probabilities)
        assert read["digit"].tolist() == outputs["digit"].tolist()
        assert payloads.is_v2_classification(headers, body)
    headers, body = v2_answer(outputs, {"probabilities"})
    assert not payloads.is_v2_classification(headers, body[:-4])  # a tensor cut short
    assert not payloads.is_v2_classification(headers, body + b"\0")  # bytes after the last
    assert not payloads.is_v2_classification({}, b'{"error": "unknown model"}')
    assert not payloads.is_v2_classification({}, b"Not Found")
    _, body = v2_answer({"probabilities": probabilities[:, :9]}, set())
    assert not payloads.is_v2_classification({}, body)  # not ten digits


@needs_data
def test_the_v2_binary_workload_sends_real_digits_as_tritonclient_does():
    from service.inference import DigitClassification

    [workload] = payloads.build_workloads(DATA_DIR, ["v2-binary"], pool_size=8).values()
    assert workload.endpoint == "/v2/models/mnist-cnn/infer" and len(workload.requests) == 8
    digits = payloads.read_mnist_test_digits(DATA_DIR, 8)
    # The service's /classify preprocessing: MNIST style, normalised, one channel.
    rows = DigitClassification.prepare_images([Image.fromarray(d) for d in digits])
    for request, row in zip(workload.requests, rows, strict=True):
        assert (request.method, request.path, request.items) == ("POST", workload.endpoint, 1)
        assert request.content_type == "application/octet-stream"
        [(name, length)] = request.headers
        assert name == "Inference-Header-Content-Length"
        header, data = request.body[: int(length)], request.body[int(length) :]
        assert json.loads(header) == {
            "inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32",
                        "parameters": {"binary_data_size": 3136}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }  # fmt: skip
        assert np.array_equal(np.frombuffer(data, "<f4").reshape(1, 28, 28), row)
        assert request.check is payloads.is_v2_classification
    # White ink on black, as MNIST: the background is the normalised zero.
    assert rows[:, :, 0, 0] == pytest.approx((0 - 0.1307) / 0.3081)


def test_closed_loop_sends_request_headers_and_rejects_answers_its_check_refuses(server):
    request = payloads.v2_binary_request(np.zeros((2, 1, 28, 28), dtype=np.float32))
    workload = Workload("v2-binary", request.path, (request,))
    result = run_closed_loop(server.url, workload, 2, 0.4, warmup_s=0.1, processes=1)
    # Without its header the tiny server could not split the body: every answer is 200.
    assert result.errors == 0 and result.ok > 0 and set(result.statuses) == {"200"}
    assert result.items_per_s == pytest.approx(2 * result.requests_per_s)
    # A 200 whose body is no v2 answer is an error.
    plain = _workload("/ok").requests[0]
    checked = Request(plain.method, "/ok", plain.body, plain.content_type,
                      check=payloads.is_v2_classification)  # fmt: skip
    result = run_closed_loop(server.url, Workload("ok", "/ok", (checked,)), 2, 0.3,
                             warmup_s=0.1, processes=1)  # fmt: skip
    assert result.ok == 0 and result.statuses == {BAD_ANSWER: result.requests}


def post(url: str, request: Request, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    sent = urllib.request.Request(
        url + request.path,
        data=request.body,
        headers={"Content-Type": request.content_type, **dict(request.headers)},
        method=request.method,
    )
    try:
        with urllib.request.urlopen(sent, timeout=timeout) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@needs_data
def test_the_mlserver_peer_answers_v2_binary_as_onnx_runtime_does(tmp_path):
    """MLServer in its own environment, started as the benchmark starts it, answers the
    v2-binary workload (64 clients at once, so in shared batches) with ONNX Runtime's
    probabilities; its binary-tensor front also gives JSON outputs and refuses bad bodies."""
    import onnxruntime as ort

    # Its own environment: make test names it, and then it must be there.
    python = tool_python("MLSERVER_VENV", ".venv-mlserver", "mlserver-venv")
    assert python == SERVER_PYTHONS["mlserver-peer"]
    [workload] = payloads.build_workloads(DATA_DIR, ["v2-binary"], pool_size=64).values()
    rows = np.concatenate(
        [np.frombuffer(r.body, "<f4", offset=len(r.body) - 3136) for r in workload.requests]
    ).reshape(64, 1, 28, 28)
    model = REPO_ROOT / "models" / "artifacts" / "mnist-cnn" / "model.onnx"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": rows})[0]
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    env = {"PEER_MAX_BATCH_SIZE": "64", "PEER_MAX_LATENCY_MS": "2"}
    with ServiceProcess(env, tmp_path / "mlserver.log", kind="mlserver-peer") as peer:
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(lambda r: post(peer.url, r), workload.requests))
        for (status, headers, body), want in zip(answers, expected, strict=True):
            assert status == 200, body
            assert headers["content-type"] == "application/octet-stream"
            assert payloads.is_v2_classification(headers, body)
            got = payloads.parse_v2_answer(headers, body)["probabilities"]
            np.testing.assert_allclose(got, want[np.newaxis], atol=1e-5)
        # Two rows; digit as JSON beside the binary probabilities; then every output as
        # JSON, the request's binary_data_output refused by the output's own flag.
        pair = payloads.v2_binary_request(rows[:2])
        header_length = int(pair.headers[0][1])
        header = json.loads(pair.body[:header_length])
        for outputs, parameters, binary in [
            ([{"name": "probabilities", "parameters": {"binary_data": True}},
              {"name": "digit"}], {}, True),
            ([{"name": "digit", "parameters": {"binary_data": False}}],
             {"binary_data_output": True}, False),
        ]:  # fmt: skip
            encoded = json.dumps({**header, "outputs": outputs, "parameters": parameters}).encode()
            request = Request("POST", pair.path, encoded + pair.body[header_length:],
                              pair.content_type, headers=(("Inference-Header-Content-Length",
                                                          str(len(encoded))),))  # fmt: skip
            status, headers, body = post(peer.url, request)
            assert status == 200, body
            assert ("inference-header-content-length" in headers) is binary
            read = payloads.parse_v2_answer(headers, body)
            assert read["digit"].tolist() == expected[:2].argmax(axis=1).tolist()
            assert read["digit"].dtype == np.int64 and read["digit"].shape == (2,)
            if binary:
                np.testing.assert_allclose(read["probabilities"], expected[:2], atol=1e-5)
        # A body shorter than its header says: a 400 from the front, not a crash.
        short = Request(pair.method, pair.path, pair.body[:-4], pair.content_type,
                        headers=pair.headers)  # fmt: skip
        status, _, body = post(peer.url, short)
        assert status == 400 and b"binary" in body
        status, _, _ = post(peer.url, workload.requests[0])
        assert status == 200  # still serving


@needs_data
def test_the_v2_grpc_workload_sends_the_same_digits_as_model_infer_calls():
    from tritonclient.grpc import service_pb2 as pb

    workloads = payloads.build_workloads(DATA_DIR, ["v2-binary", "v2-grpc"], pool_size=4)
    for rest, grpc_request in zip(workloads["v2-binary"].requests,
                                  workloads["v2-grpc"].requests, strict=True):  # fmt: skip
        assert (grpc_request.method, grpc_request.path) == ("GRPC", payloads.GRPC_MODEL_INFER)
        message = pb.ModelInferRequest.FromString(grpc_request.body)
        assert message.model_name == "mnist-cnn" and [o.name for o in message.outputs] == [
            "probabilities"
        ]
        assert (message.inputs[0].name, message.inputs[0].datatype) == ("images", "FP32")
        assert list(message.inputs[0].shape) == [1, 1, 28, 28]
        assert rest.body.endswith(message.raw_input_contents[0])  # the same digit
    answer = pb.ModelInferResponse(model_name="mnist-cnn")
    answer.outputs.add(name="probabilities", datatype="FP32", shape=[1, 10])
    answer.raw_output_contents.append(np.zeros(10, "<f4").tobytes())
    assert payloads.is_v2_grpc_classification({}, answer.SerializeToString())
    assert not payloads.is_v2_grpc_classification({}, b"\xff not a message")
    answer.raw_output_contents[0] = b"short"
    assert not payloads.is_v2_grpc_classification({}, answer.SerializeToString())


def test_the_peer_set_runs_v2_binary_on_the_service_and_mlserver_only():
    peers = load_comparison_set("peers")
    mlserver = peers.config("mlserver")
    assert mlserver.server == "mlserver-peer"
    assert (
        mlserver.env["PEER_MAX_BATCH_SIZE"] == "64" and mlserver.env["PEER_MAX_LATENCY_MS"] == "2"
    )
    runs = {
        config.name: [plan.name for plan in peers.workloads if plan.name not in config.skip]
        for config in peers.configs
    }
    assert runs["mlserver"] == ["v2-binary"] and "v2-binary" in runs["service"]
    assert {name for name, workloads in runs.items() if "v2-binary" in workloads} == {
        "service",
        "mlserver",
    }
    targets = [t for t in peers.targets if t.relative_to == "mlserver"]
    assert [(t.config, t.workload, t.concurrency) for t in targets] == [
        ("service", "v2-binary", 64),
        ("service", "v2-binary", 256),
    ]
    assert all(t.min_ratio == 2.0 and t.lower_p99 for t in targets)

    def point(config, requests_per_s, p99):
        return {"config": config, "workload": "v2-binary", "concurrency": 64,
                "requests_per_s": requests_per_s, "requests": int(requests_per_s * 6),
                "duration_s": 6.0, "errors": 0, "latency_ms": {"p50": 1.0, "p99": p99},
                "server": {}}  # fmt: skip

    def met(service_rate, service_p99):
        report = {"configs": [
            {"name": "service", "points": [point("service", service_rate, service_p99)]},
            {"name": "mlserver", "points": [point("mlserver", 800.0, 170.0)]},
        ]}  # fmt: skip
        return evaluate_targets(report, targets[:1])[0]["met"]

    assert met(1700.0, 60.0) is True
    assert met(1500.0, 60.0) is False  # under twice MLServer's rate
    assert met(1700.0, 180.0) is False  # a higher p99
