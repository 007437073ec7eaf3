"""The dashboard and the rules in deploy/observability, against promtool and a real
Prometheus.

* ``promtool check rules`` and ``promtool test rules`` (rules.test.yaml: every alert
  fires in one case and stays quiet in another); the dashboard's JSON, every panel with
  a query; the Kubernetes component's PrometheusRule holds the same rules as rules.yaml.
* Live: ``bentoml serve`` with 2 workers and a queue of 64 items, and a Prometheus
  (prometheus.yml with the target filled in) scraping it and evaluating the rules every
  second. The rules are loaded from a copy whose ``for:`` durations are all 1 s, so that
  an alert shows within the test; the expressions and thresholds are the file's, and
  the test checks that. Traffic reaches every route (native and v2, the three models),
  with bad bodies (4xx) and a few seconds of large /generate requests that the full
  queue refuses (503). Then: every rule evaluates without an error and every recorded
  series has data; every panel's query (the dashboard's variables filled in, "All" and
  each endpoint or route alone) answers with data, so a metric or label renamed in the
  service without the dashboard following fails here; ServingShedding is pending or
  firing, and ServingServerErrors, ServingWorkerMemoryHigh and ServingNoTraffic are
  not.

Skips, saying so, without ``prometheus`` and ``promtool`` on PATH (``make prometheus``
installs Debian's). ``OBSERVABILITY_SCREENSHOT=docs/observability.png`` lengthens the
traffic and draws the main panels from the live run's Prometheus into that file.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bench.multipart import file_parts, multipart_body
from tests.conftest import REPO_ROOT, free_port

OBSERVABILITY_DIR = REPO_ROOT / "deploy" / "observability"
RULES = OBSERVABILITY_DIR / "rules.yaml"
RULE_TESTS = OBSERVABILITY_DIR / "rules.test.yaml"
DASHBOARD = OBSERVABILITY_DIR / "dashboard.json"
PROMETHEUS_CONFIG = OBSERVABILITY_DIR / "prometheus.yml"
MONITORING_DIR = REPO_ROOT / "deploy" / "kubernetes" / "components" / "monitoring"
OPERATIONS_DOC = REPO_ROOT / "docs" / "operations.md"
SCREENSHOT = os.environ.get("OBSERVABILITY_SCREENSHOT")

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not on PATH (make prometheus installs it)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus is not on PATH (make prometheus installs it)",
)

QUEUE_ITEMS = 64
SERVER_ENV = {
    "SERVING_DEVICE": "cpu",
    "SERVING_THREADS": "1",
    "SERVING_WORKERS": "2",
    # A /generate of 64 images fills a worker's queue: the overload below sheds.
    "SERVING_MAX_QUEUE_ITEMS": str(QUEUE_ITEMS),
}
ENDPOINTS = ("classify", "sentiment", "generate")
# (route, JSON body or (body, content type), expected status); every route gets a 200.
EXAMPLES = REPO_ROOT / "examples"
SEVEN, TWO = (EXAMPLES / "seven.png").read_bytes(), (EXAMPLES / "two.jpg").read_bytes()
BATCH_BODY = multipart_body(file_parts("images", [SEVEN, TWO, SEVEN], None))
TRAFFIC: list[tuple[str, Any, int]] = [
    ("/classify", (SEVEN, "image/png"), 200),
    ("/classify_batch", BATCH_BODY, 200),
    ("/sentiment", {"text": "A gripping, beautifully acted film."}, 200),
    ("/sentiment_batch", {"texts": ["Great fun from start to finish.", "Dull."]}, 200),
    ("/generate", {"n": 2, "digit": 3, "seed": 42}, 200),
    (
        "/v2/models/mnist-cnn/infer",
        {
            "inputs": [
                {"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}
            ]
        },
        200,
    ),
    (
        "/v2/models/sst2-bilstm/infer",
        {"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["Fine."]}]},
        200,
    ),
    (
        "/v2/models/digit-gan/infer",
        {
            "inputs": [{"name": "digits", "datatype": "INT64", "shape": [2], "data": [3, 5]}],
            "parameters": {"seed": 7},
        },
        200,
    ),
    # Bad requests: the client's fault.
    ("/sentiment", {"txt": "no such field"}, 400),
    ("/classify", (b"not an image", "image/png"), 400),
    ("/generate", {"n": 10_000}, 400),
    ("/v2/models/sst2-bilstm/infer", {"inputs": [{"name": "text"}]}, 400),
]
ROUTES = tuple(dict.fromkeys(route for route, _, _ in TRAFFIC))
# The overload: clients that send /generate of 64 images for a few seconds, again 0.1 s
# after each refusal. Seconds, not one burst: a counter child is created by its first
# increment, and Prometheus's rate() cannot count what happened before its first scrape.
OVERLOAD_CLIENTS, OVERLOAD_S, OVERLOAD_BODY = 32, 4.0, {"n": 64, "seed": 1}
# Each alert's state after the traffic: the ones named must be in one of these states
# ("inactive": not listed by /api/v1/alerts); the others depend on the machine's speed.
EXPECTED_ALERTS = {
    "ServingShedding": {"pending", "firing"},
    "ServingServerErrors": {"inactive"},
    "ServingWorkerMemoryHigh": {"inactive"},
    "ServingNoTraffic": {"inactive"},
}
JOB = "digit-sentiment-serving"
# What Grafana puts in place of the dashboard's variables (an "All" selection).
VARIABLES = {
    "$__rate_interval": "30s",
    "$job": JOB,
    "$endpoint": "(" + "|".join(ENDPOINTS) + ")",
    "$route": "(" + "|".join(ROUTES) + ")",
}


def run_promtool(*arguments: str) -> str:
    done = subprocess.run(
        [PROMTOOL, *arguments], cwd=OBSERVABILITY_DIR, capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(arguments)}:\n{output}"
    return output


def rule_groups(path: Path = RULES) -> list[dict[str, Any]]:
    return yaml.safe_load(path.read_text())["groups"]


def all_rules(path: Path = RULES) -> list[dict[str, Any]]:
    return [rule for group in rule_groups(path) for rule in group["rules"]]


def alerts(path: Path = RULES) -> list[dict[str, Any]]:
    return [rule for rule in all_rules(path) if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_targets() -> list[tuple[str, str]]:
    """(panel title, query) for every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel["targets"]
    ]


def fill_variables(expr: str, **chosen: str) -> str:
    """``expr`` as Grafana sends it, with "All" selected, or ``chosen`` values
    (``fill_variables(expr, **{"$endpoint": "generate"})``)."""
    values = {**VARIABLES, **chosen}
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(name, values[name])
    assert "$" not in expr.replace("${1}", ""), f"a variable is left in {expr}"
    return expr


# --- offline -------------------------------------------------------------------------


@needs_promtool
def test_promtool_checks_the_rules_and_runs_their_unit_tests():
    checked = run_promtool("check", "rules", RULES.name)
    assert f"SUCCESS: {len(all_rules())} rules found" in checked, checked
    tested = run_promtool("test", "rules", RULE_TESTS.name)
    assert "SUCCESS" in tested, tested
    config = run_promtool("check", "config", PROMETHEUS_CONFIG.name)
    assert "is valid prometheus config file" in config, config


def test_every_alert_is_tested_firing_and_quiet():
    """rules.test.yaml has, for every alert, a case where it fires and one where not."""
    fired, quiet = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {alert["alert"] for alert in alerts()}
    assert fired == names and quiet == names, (names - fired, names - quiet)


def test_every_alert_has_a_runbook_section_summary_and_description():
    headings = re.findall(r"^#+ (.+)$", OPERATIONS_DOC.read_text(), flags=re.MULTILINE)
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-") for heading in headings
    }
    for alert in alerts():
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], alert["alert"]
        path, _, anchor = annotations["runbook"].partition("#")
        assert path == "docs/operations.md", alert["alert"]
        assert anchor == alert["alert"].lower() and anchor in anchors, alert["alert"]
        assert alert["labels"]["severity"] in {"page", "warning"}


def test_the_dashboard_queries_something_in_every_panel():
    board = dashboard()
    assert board["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert set(variables) == {"datasource", "job", "endpoint", "route"}
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)) >= 12
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"]
    # Cheap queries: every recorded series a panel reads is one rules.yaml records.
    recorded = {rule["record"] for rule in all_rules() if "record" in rule}
    for title, expr in panel_targets():
        for name in re.findall(r"\b[a-z_]+:[a-z_0-9]+:[a-z_0-9]+\b", expr):
            assert name in recorded, f"{title}: {name} is not recorded"


def test_the_scrape_interval_suits_the_rule_windows():
    """The rules' 1-minute rates need at least two samples a minute, with room."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == [RULES.name]
    monitor = yaml.safe_load((MONITORING_DIR / "podmonitor.yaml").read_text())
    assert [e["interval"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["15s"]


def test_the_prometheus_rule_holds_the_rules_of_rules_yaml():
    """deploy/kubernetes/components/monitoring/prometheusrule.yaml is rules.yaml for the
    Prometheus operator (``python deploy/observability/prometheusrule.py`` writes it)."""
    resource = yaml.safe_load((MONITORING_DIR / "prometheusrule.yaml").read_text())
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == rule_groups(), (
        "prometheusrule.yaml differs from rules.yaml: "
        "run python deploy/observability/prometheusrule.py"
    )


# --- live ----------------------------------------------------------------------------


class Prometheus:
    """A Prometheus server on a free port, with its data in ``directory``."""

    def __init__(self, config: Path, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "prometheus.log"
        self._log = self.log_path.open("w")
        self.started = time.time()
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def get(self, path: str, **query: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr)["result"]

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus was not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def rules_for_the_test(directory: Path) -> Path:
    """rules.yaml with every ``for:`` at 1 s, and nothing else changed."""
    text = re.sub(r"^(\s+for: )\S+$", r"\g<1>1s", RULES.read_text(), flags=re.MULTILINE)
    copy = directory / "rules.yaml"
    copy.write_text(text)
    original, changed = all_rules(), all_rules(copy)
    assert [{**r, "for": "1s"} if "for" in r else r for r in original] == changed
    return copy


def prometheus_config(target: str, rules: Path, directory: Path) -> Path:
    """prometheus.yml with the target filled in, the test's rules, 1 s intervals."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    config["rule_files"] = [str(rules)]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    job["static_configs"] = [{"targets": [target]}]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


async def send(session: aiohttp.ClientSession, url: str, body: Any) -> int:
    if isinstance(body, tuple):
        data, content_type = body
        request = session.post(url, data=data, headers={"Content-Type": content_type})
    else:
        request = session.post(url, json=body)
    async with request as response:
        await response.read()
        return response.status


async def steady_traffic(url: str, seconds: float, clients: int = 3) -> collections.Counter:
    """``clients`` closed loops over every example for ``seconds``: (route, status) → count."""
    counts: collections.Counter = collections.Counter()
    deadline = time.monotonic() + seconds

    async def client(offset: int) -> None:
        index = offset
        while time.monotonic() < deadline:
            route, body, expected = TRAFFIC[index % len(TRAFFIC)]
            status = await send(session, url + route, body)
            assert status == expected, f"{route}: {status}, expected {expected}"
            counts[route, status] += 1
            index += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(i * len(TRAFFIC) // clients) for i in range(clients)))
    return counts


async def overload(url: str) -> collections.Counter:
    """Status → count of the overload's answers."""
    counts: collections.Counter = collections.Counter()
    deadline = time.monotonic() + OVERLOAD_S

    async def client() -> None:
        while time.monotonic() < deadline:
            status = await send(session, url + "/generate", OVERLOAD_BODY)
            counts[status] += 1
            if status == 503:
                await asyncio.sleep(0.1)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client() for _ in range(OVERLOAD_CLIENTS)))
    return counts


class LiveRun:
    def __init__(
        self, prometheus: Prometheus, traffic: collections.Counter, shed: collections.Counter
    ):
        self.prometheus, self.traffic, self.shed = prometheus, traffic, shed


@pytest.fixture(scope="module")
def live(model_store, serve, tmp_path_factory) -> Iterator[LiveRun]:
    if PROMETHEUS is None or PROMTOOL is None:
        pytest.skip("prometheus is not on PATH (make prometheus installs it)")
    directory = tmp_path_factory.mktemp("prometheus")
    server = serve("service.service:ServingService", SERVER_ENV)
    target = urllib.parse.urlparse(server.url).netloc
    config = prometheus_config(target, rules_for_the_test(directory), directory)
    prometheus = Prometheus(config, directory)
    try:
        prometheus.wait_ready()
        deadline = time.monotonic() + 30
        while not prometheus.query(f'up{{job="{JOB}"}} == 1'):
            assert time.monotonic() < deadline, f"no successful scrape:\n{prometheus.log()}"
            time.sleep(0.5)
        # For the picture, long enough for the 1-minute rates to fill their window.
        before_s, after_s = (75.0, 30.0) if SCREENSHOT else (6.0, 3.0)
        traffic = asyncio.run(steady_traffic(server.url, before_s))
        shed = asyncio.run(overload(server.url))
        traffic += asyncio.run(steady_traffic(server.url, after_s))
        yield LiveRun(prometheus, traffic, shed)
    finally:
        prometheus.stop()


def eventually(check, timeout: float = 30.0) -> Any:
    """``check()``'s value once it raises no AssertionError (rules need a few evaluations)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def label_values(result: list[dict[str, Any]], label: str) -> set[str]:
    return {series["metric"].get(label) for series in result} - {None}


@needs_prometheus
def test_the_traffic_reached_every_route_and_the_overload_was_shed(live):
    for route, _, status in TRAFFIC:
        assert live.traffic[route, status] > 0, (route, status)
    assert live.shed[503] >= 50 and live.shed[200] > 0, live.shed
    print(f"traffic: {sum(live.traffic.values())} requests, overload: {dict(live.shed)}")
    assert set(live.shed) <= {200, 503}, live.shed


@needs_prometheus
def test_the_overload_sets_off_the_shedding_alert_and_no_fault_alert(live):
    def states() -> dict[str, set[str]]:
        found: dict[str, set[str]] = collections.defaultdict(set)
        for alert in live.prometheus.get("/api/v1/alerts")["alerts"]:
            found[alert["labels"]["alertname"]].add(alert["state"])
            if alert["labels"]["alertname"] == "ServingShedding":
                assert alert["labels"]["endpoint"] == "generate", alert
        for name, allowed in EXPECTED_ALERTS.items():
            assert (found.get(name) or {"inactive"}) <= allowed, (name, found.get(name))
        return found

    found = eventually(states)
    print("alerts:", {name: sorted(state) for name, state in found.items()})
    # The alert expressions themselves, as written in rules.yaml.
    for alert in alerts():
        result = live.prometheus.query(alert["expr"])
        if alert["alert"] == "ServingShedding":
            assert label_values(result, "endpoint") == {"generate"}, result
        if "inactive" in EXPECTED_ALERTS.get(alert["alert"], ()):
            assert result == [], (alert["alert"], result)
    if SCREENSHOT:
        draw_panels(live.prometheus, Path(SCREENSHOT))


@needs_prometheus
def test_every_rule_evaluates_and_every_recorded_series_has_data(live):
    def check() -> None:
        groups = live.prometheus.get("/api/v1/rules")["groups"]
        evaluated = {rule["name"]: rule for group in groups for rule in group["rules"]}
        assert len(evaluated) == len(all_rules())
        for name, rule in evaluated.items():
            assert rule["health"] == "ok", (name, rule.get("lastError"))
        for rule in all_rules():
            if "record" in rule:
                assert live.prometheus.query(rule["record"]), f"no data for {rule['record']}"

    eventually(check)


@needs_prometheus
def test_every_panel_answers_for_every_endpoint_and_route(live):
    failures: list[str] = []

    def check() -> None:
        failures.clear()
        for title, expr in panel_targets():
            # "All", then each endpoint or route alone, as a viewer may pick it.
            choices = [{}]
            choices += [{"$endpoint": name} for name in ENDPOINTS if "$endpoint" in expr]
            choices += [{"$route": route} for route in ROUTES if "$route" in expr]
            for choice in choices:
                if not live.prometheus.query(fill_variables(expr, **choice)):
                    failures.append(f"{title}: no data for {choice or 'all'}: {expr}")
        assert not failures, "\n".join(failures)

    eventually(check)
    query = live.prometheus.query
    # What the workers report: two ready, each with its memory; each model serving alone.
    assert [float(s["value"][1]) for s in query(f'serving_workers_ready{{job="{JOB}"}}')] == [2.0]
    assert len(query(f'serving_worker_resident_memory_bytes{{job="{JOB}"}}')) >= 2
    shares = query(f'serving_model_version_share{{job="{JOB}"}} > 0')
    assert sorted(s["metric"]["endpoint"] for s in shares) == sorted(ENDPOINTS)
    assert {float(s["value"][1]) for s in shares} == {1.0}
    # The dashboard's variables list what the panels were asked for.
    for variable in dashboard()["templating"]["list"][1:]:
        selector, label = re.fullmatch(
            r"label_values\((.*), (\w+)\)", variable["definition"]
        ).groups()
        values = set(
            live.prometheus.get(
                f"/api/v1/label/{label}/values", **{"match[]": fill_variables(selector)}
            )
        )
        if "regex" in variable:
            pattern = re.compile(variable["regex"].strip("/"))
            values = {value for value in values if pattern.fullmatch(value)}
            assert not values & {"/metrics", "/readyz", "/livez"}, values
        wanted = {"job": {JOB}, "endpoint": set(ENDPOINTS), "route": set(ROUTES)}[variable["name"]]
        assert wanted <= values, (variable["name"], wanted - values)


# --- the picture ---------------------------------------------------------------------

PICTURE_PANELS = (
    "Requests per second, by endpoint and protocol",
    "Errors per second, by route and status class",
    "Latency of answered requests (p50, p90, p99), by route",
    "Shed (503) per second, by endpoint",
    "Items queued and requests in flight",
    "Worker memory (resident)",
)


def draw_panels(prometheus: Prometheus, path: Path) -> None:
    """The main panels over the live run, drawn from Prometheus's range queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {panel["title"]: panel for panel in dashboard()["panels"]}
    end = time.time()
    figure, axes = plt.subplots(3, 2, figsize=(13, 10), dpi=80, sharex=True)
    for axis, title in zip(axes.flat, PICTURE_PANELS, strict=True):
        panel = panels[title]
        for target in panel["targets"]:
            expr = fill_variables(target["expr"])
            if "p50" in expr or "p90" in expr:
                continue  # the p99 alone keeps the picture readable
            data = prometheus.get("/api/v1/query_range", query=expr, start=str(prometheus.started),
                                  end=str(end), step="1")["result"]  # fmt: skip
            for series in data:
                labels = series["metric"]
                label = re.sub(r"\{\{(\w+)\}\}", lambda m, labels=labels: labels.get(m[1], ""),
                               target["legendFormat"])  # fmt: skip
                values = [(float(t) - prometheus.started, float(v)) for t, v in series["values"]]
                if panel["fieldConfig"]["defaults"].get("unit") == "bytes":
                    values = [(t, v / 2**20) for t, v in values]
                if max((v for _, v in values), default=0) == 0 and "xx" in label:
                    continue  # routes that had no error of that class
                axis.plot(*zip(*values, strict=True), label=label, linewidth=1.2)
        unit = {"reqps": "requests/s", "s": "seconds", "bytes": "MiB", "short": ""}[
            panel["fieldConfig"]["defaults"]["unit"]
        ]
        axis.set_title(title, fontsize=10)
        axis.set_ylabel(unit, fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6, ncol=2, loc="upper left")
    for axis in axes[-1]:
        axis.set_xlabel("seconds since Prometheus started", fontsize=9)
    figure.suptitle("digit-sentiment-serving: steady traffic on every route, then "
                    f"{OVERLOAD_CLIENTS} clients sending /generate n=64 for {OVERLOAD_S:.0f} s "
                    f"at a queue of {QUEUE_ITEMS} items", fontsize=11)  # fmt: skip
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
