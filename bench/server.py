"""The server under test: register the models in a private BentoML store, start
``bentoml serve`` (or a peer server) with a given environment, wait until it is
ready, read its ``/metrics`` and CPU use, and stop it again.

A benchmark never touches the user's model store: each run registers the
committed artifacts into a temporary ``BENTOML_HOME`` first. A configuration
may serve the project as it was at another git revision (``revision``): that
tree is checked out into a temporary worktree and served from there, so a
before/after comparison runs in one go, on the same machine state.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
# MLServer's own environment (make mlserver-venv): its pins conflict with the service's.
MLSERVER_VENV = REPO_ROOT / os.environ.get("MLSERVER_VENV", ".venv-mlserver")
DEFAULT_SERVICE = "service.service:ServingService"
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


def register_models(env: Mapping[str, str], log_file, cwd: Path = REPO_ROOT) -> None:
    """Import the committed artifacts into the store named by ``env['BENTOML_HOME']``."""
    subprocess.run(
        [sys.executable, "-m", "training.register"],
        cwd=cwd,
        env=dict(env),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        check=True,
    )


@dataclass(frozen=True)
class BatchStats:
    """Sum and count of one batch-size histogram, per API method."""

    sums: dict[str, float]
    counts: dict[str, float]

    def mean_since(self, earlier: BatchStats) -> dict[str, float]:
        """Mean batch size of the batches formed between ``earlier`` and now."""
        means = {}
        for method, count in self.counts.items():
            batches = count - earlier.counts.get(method, 0.0)
            if batches > 0:
                items = self.sums[method] - earlier.sums.get(method, 0.0)
                means[method] = round(items / batches, 2)
        return means


def model_seconds(metrics_text: str) -> float | None:
    """Seconds spent inside model calls so far (``serving_model_seconds``, all endpoints
    and workers), or None when the server does not export it (a peer, an old revision)."""
    total = None
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "serving_model_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total = (total or 0.0) + sample.value
    return total


def batch_stats(metrics_text: str) -> BatchStats:
    """Read every ``*batch_size*`` histogram (BentoML's ``adaptive_batch_size`` and any
    the service adds) from a Prometheus text exposition, summed over workers."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.type != "histogram" or "batch_size" not in family.name:
            continue
        for sample in family.samples:
            method = sample.labels.get("method_name") or sample.labels.get("endpoint") or "-"
            key = f"{family.name}:{method}"
            if sample.name.endswith("_sum"):
                sums[key] = sums.get(key, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                counts[key] = counts.get(key, 0.0) + sample.value
    return BatchStats(sums, counts)


# How to start each kind of server on a port; ``{service}`` is the BentoML service path.
SERVER_COMMANDS = {
    "service": ["-m", "bentoml", "serve", "{service}", "--host", "127.0.0.1", "--port", "{port}"],
    "bentoml-peer": ["-m", "bentoml", "serve", "bench.peers.bentoml_peer:BatchableClassifier",
                     "--host", "127.0.0.1", "--port", "{port}"],
    "litserve-peer": ["-m", "bench.peers.litserve_peer", "--port", "{port}"],
    "mlserver-peer": ["-m", "bench.peers.mlserver_peer", "--port", "{port}"],
    "minimal-batched-peer": ["-m", "uvicorn", "bench.peers.minimal_batched:app",
                             "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning",
                             "--no-access-log"],
    "starlette-ceiling": ["-m", "uvicorn", "bench.ceiling:app", "--host", "127.0.0.1",
                          "--port", "{port}", "--log-level", "warning", "--no-access-log"],
}  # fmt: skip
READY_PATHS = {"litserve-peer": "/health", "mlserver-peer": "/v2/health/ready"}
# Servers run by another environment's Python than the benchmark's.
SERVER_PYTHONS = {"mlserver-peer": MLSERVER_VENV / "bin" / "python"}
SERVER_KINDS = tuple(SERVER_COMMANDS)


class ServiceProcess:
    """A server (by default ``bentoml serve`` of the project) in its own process group,
    with its own model store.

    Use as a context manager; the whole process tree is stopped on exit.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        service: str = DEFAULT_SERVICE,
        kind: str = "service",
        revision: str | None = None,
        port: int | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        if kind not in SERVER_COMMANDS:
            raise ValueError(f"unknown server kind {kind!r}; one of {SERVER_KINDS}")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.service = service
        self.kind = kind
        self.revision = revision
        self.ready_timeout_s = ready_timeout_s
        self.extra_env = dict(env)
        self._store: tempfile.TemporaryDirectory | None = None
        self._worktree: tempfile.TemporaryDirectory | None = None
        self._process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def store(self) -> str | None:
        """The private model store's directory (``BENTOML_HOME``), while it runs."""
        return self._store.name if self._store is not None else None

    def __enter__(self) -> ServiceProcess:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _environment(self, store: str) -> dict[str, str]:
        env = {**os.environ, **self.extra_env, "BENTOML_HOME": store}
        env.setdefault("BENTOML_DO_NOT_TRACK", "true")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _checkout(self) -> Path:
        """The tree to serve from: this checkout, or ``revision`` in a temporary worktree."""
        if self.revision is None:
            return REPO_ROOT
        self._worktree = tempfile.TemporaryDirectory(prefix="bench-revision-")
        subprocess.run(
            ["git", "worktree", "add", "--detach", self._worktree.name, self.revision],
            cwd=REPO_ROOT, check=True, capture_output=True,
        )  # fmt: skip
        return Path(self._worktree.name)

    def start(self) -> None:
        python = SERVER_PYTHONS.get(self.kind, Path(sys.executable))
        if not python.exists():
            raise FileNotFoundError(f"{python} is missing: make mlserver-venv makes it")
        self._store = tempfile.TemporaryDirectory(prefix="bench-bentoml-")
        env = self._environment(self._store.name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("w")
        tree = self._checkout()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
        if self.kind == "service":
            register_models(env, self._log_file, cwd=tree)
        command = [str(python)] + [
            part.format(service=self.service, port=self.port) for part in SERVER_COMMANDS[self.kind]
        ]
        log.info("starting %s on port %d", " ".join(command[1:]), self.port)
        self._process = subprocess.Popen(
            command,
            cwd=tree,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as one
        )
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(
                    f"the service exited with {self._process.returncode}; see {self.log_path}"
                )
            try:
                ready_path = READY_PATHS.get(self.kind, "/readyz")
                status, _ = http_get(f"{self.url}{ready_path}", timeout=2.0)
                if status == 200:
                    log.info("service ready at %s", self.url)
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"service not ready after {self.ready_timeout_s:.0f} s; see {self.log_path}"
        )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._store is not None:
            self._store.cleanup()
            self._store = None
        if self._worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", self._worktree.name],
                           cwd=REPO_ROOT, capture_output=True)  # fmt: skip
            self._worktree.cleanup()
            self._worktree = None

    def processes(self) -> list[psutil.Process]:
        """The server process and all its descendants (arbiter, API workers)."""
        if self._process is None:
            return []
        try:
            root = psutil.Process(self._process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def worker_pids(self) -> list[int]:
        """Processes that serve requests: the leaves of the tree (the arbiter only supervises)."""
        tree = self.processes()
        parents = {p.ppid() for p in tree if p.is_running()}
        return [p.pid for p in tree if p.pid not in parents]

    def cpu_seconds(self) -> float:
        """CPU time used so far by the whole server tree (user + system)."""
        total = 0.0
        for process in self.processes():
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                continue
        return total

    def batch_stats(self) -> BatchStats:
        status, text = http_get(f"{self.url}/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return batch_stats(text)
