"""The service under test: register the models in a private BentoML store, start
``bentoml serve`` with a given environment, wait for ``/readyz``, read its
``/metrics`` and CPU use, and stop it again.

A benchmark never touches the user's model store: each run registers the
committed artifacts into a temporary ``BENTOML_HOME`` first.
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


def register_models(env: Mapping[str, str], log_file) -> None:
    """Import the committed artifacts into the store named by ``env['BENTOML_HOME']``."""
    subprocess.run(
        [sys.executable, "-m", "training.register"],
        cwd=REPO_ROOT,
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


class ServiceProcess:
    """``bentoml serve`` in its own process group, with its own model store.

    Use as a context manager; the whole process tree is stopped on exit.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        service: str = DEFAULT_SERVICE,
        port: int | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.service = service
        self.ready_timeout_s = ready_timeout_s
        self.extra_env = dict(env)
        self._store: tempfile.TemporaryDirectory | None = None
        self._process: subprocess.Popen | None = None
        self._log_file = None

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

    def start(self) -> None:
        self._store = tempfile.TemporaryDirectory(prefix="bench-bentoml-")
        env = self._environment(self._store.name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("w")
        register_models(env, self._log_file)
        command = [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            self.service,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        log.info("starting %s on port %d", self.service, self.port)
        self._process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
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
                status, _ = http_get(f"{self.url}/readyz", timeout=2.0)
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
