"""The service's own Prometheus metrics, next to BentoML's on ``/metrics``.

* ``serving_batch_size{endpoint, version}``: items (images, texts, latent vectors) per
  model call;
* ``serving_requests_total{protocol, endpoint, version, code}``: every API request the
  service answered, by the protocol it came in by (``native`` REST, ``v2`` REST,
  ``v2-grpc``, ``admin``), the model it was for (``server`` for the protocol's own
  routes and management), the model store version that answered it (empty where
  none did) and the HTTP status or gRPC code of its answer;
* ``serving_key_requests_total{key, scope}``: with API keys on, the requests each key
  (by its name) was admitted for;
* ``serving_queued_items{endpoint}``, ``serving_open_connections``,
  ``serving_workers_ready``, ``serving_worker_resident_memory_bytes{pid}`` and
  ``serving_model_version_share{endpoint, version}``: what the workers hold now
  (``WorkerGauges``);
* ``serving_model_seconds{endpoint, version}``: wall time inside the model call itself (the
  predictor, without preprocessing or decoding), per model call. Its ``_sum``
  against the server's CPU time tells how much of a request's cost is the model
  and how much is everything around it (``bench/run.py`` reports both).

Each model version's histogram children are looked up once, when it is loaded: an
observation on the hot path is one method call, not a label lookup.

``use_instance_folder`` gives each running service its own Prometheus
multiprocess folder (see there).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MODEL_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

_FAMILIES: dict[str, Any] = {}


@dataclass(frozen=True)
class EndpointMetrics:
    """The observers of one endpoint's batcher and model."""

    observe_batch_size: Callable[[float], None]
    observe_model_seconds: Callable[[float], None]


def model_metrics(endpoint: str, version: str) -> EndpointMetrics:
    """The observers of one model version, bound to this process's histograms."""
    batch_size, model_seconds = _families()
    return EndpointMetrics(
        observe_batch_size=batch_size.labels(endpoint, version).observe,
        observe_model_seconds=model_seconds.labels(endpoint, version).observe,
    )


def _families() -> tuple[Any, Any]:
    """The histogram families, created once per process.

    prometheus_client is imported here, not at module level: BentoML points it
    at its multiprocess directory only after importing the service module.
    """
    if "batch_size" not in _FAMILIES:
        import prometheus_client

        _FAMILIES["batch_size"] = prometheus_client.Histogram(
            "serving_batch_size",
            "Items (images, texts, latent vectors) per model call",
            ["endpoint", "version"],
            buckets=BATCH_SIZE_BUCKETS,
        )
        _FAMILIES["model_seconds"] = prometheus_client.Histogram(
            "serving_model_seconds",
            "Seconds spent inside the model per call (no preprocessing or decoding)",
            ["endpoint", "version"],
            buckets=MODEL_SECONDS_BUCKETS,
        )
        _FAMILIES["requests"] = prometheus_client.Counter(
            "serving_requests",
            "API requests answered, by protocol, model, model version and status (HTTP) "
            "or code (gRPC)",
            ["protocol", "endpoint", "version", "code"],
        )
    return _FAMILIES["batch_size"], _FAMILIES["model_seconds"]


def key_requests() -> Any:
    """``serving_key_requests_total{key, scope}``: requests admitted per API key, by the
    key's name (never the key)."""
    if "key_requests" not in _FAMILIES:
        import prometheus_client

        _FAMILIES["key_requests"] = prometheus_client.Counter(
            "serving_key_requests", "Requests admitted, by API key name and scope",
            ["key", "scope"],
        )  # fmt: skip
    return _FAMILIES["key_requests"]


def key_file_read() -> Any:
    """``serving_api_keys_file_time_seconds{pid}``: the change time of the key file each
    worker has read (a gauge per process: one line per worker)."""
    if "key_file" not in _FAMILIES:
        import prometheus_client

        _FAMILIES["key_file"] = prometheus_client.Gauge(
            "serving_api_keys_file_time_seconds",
            "Change time of the API key file this worker has in force",
            multiprocess_mode="all",
        )
    return _FAMILIES["key_file"]


@dataclass(frozen=True)
class WorkerGauges:
    """What a worker holds now, sampled by ``service.worker_state``; summed over the
    running workers (``livesum``) unless the pid is kept."""

    queued_items: Any  # {endpoint}
    open_connections: Any
    ready: Any
    memory: Any  # {pid}
    version_share: Any  # {endpoint, version}: the share of requests it gets, 0 retired


def worker_gauges() -> WorkerGauges:
    if "worker" not in _FAMILIES:
        from prometheus_client import Gauge

        _FAMILIES["worker"] = WorkerGauges(
            queued_items=Gauge("serving_queued_items", "Items waiting in the model's batcher "
                               "queues", ["endpoint"], multiprocess_mode="livesum"),
            open_connections=Gauge("serving_open_connections", "Open HTTP connections",
                                   multiprocess_mode="livesum"),
            ready=Gauge("serving_workers_ready", "Workers whose models are loaded",
                        multiprocess_mode="livesum"),
            memory=Gauge("serving_worker_resident_memory_bytes", "Resident memory of each "
                         "worker process", multiprocess_mode="all"),
            version_share=Gauge("serving_model_version_share", "Share of the model's "
                                "requests each version gets (1 serving alone, 0.1 a 10 % "
                                "canary, 0 out of service)", ["endpoint", "version"],
                                multiprocess_mode="livemax"),
        )  # fmt: skip
    return _FAMILIES["worker"]


class RequestCounts:
    """``serving_requests_total``, with each (protocol, endpoint, version, code) child
    looked up once: counting a request is one increment."""

    def __init__(self) -> None:
        _families()
        self._family = _FAMILIES["requests"]
        self._children: dict[tuple[str, str, str, str], Any] = {}

    def count(
        self, protocol: str, endpoint: str | None, code: int | str, version: str = ""
    ) -> None:
        key = (protocol, endpoint or "server", version, str(code))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._family.labels(*key)
        child.inc()

    def declare(self, protocol: str, endpoint: str, code: int) -> None:
        """Start a series at 0 before its first request: a rate over it then counts that
        first request too (the shedding alert's 503s, which come in bursts)."""
        key = (protocol, endpoint, "", str(code))
        if key not in self._children:
            self._children[key] = self._family.labels(*key)


def forget_dead_workers(folder: str | os.PathLike | None) -> None:
    """Drop the gauges of worker processes that no longer run (a killed worker that
    BentoML replaced): their "live" sums and per-process lines would otherwise stay.
    Counters are kept: what a dead worker counted still happened."""
    if not folder:
        return
    from prometheus_client import multiprocess

    for path in Path(folder).glob("gauge_*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit() and not process_exists(int(pid)):
            if path.name.startswith("gauge_live"):
                multiprocess.mark_process_dead(int(pid), str(folder))
            else:
                path.unlink(missing_ok=True)


def use_instance_folder() -> Path | None:
    """Point this ``bentoml serve`` at a Prometheus multiprocess folder of its own.

    BentoML keeps one folder per ``BENTOML_HOME`` and empties it whenever a
    server starts, so a second service started on the same host deleted the
    first one's metric files, and the first one's ``/metrics`` then reported the
    other's counters. Each server process now gets ``BENTOML_HOME/prometheus/<pid>``
    (its workers inherit it through ``PROMETHEUS_MULTIPROC_DIR``), and the
    folders of servers that are no longer running are removed.

    Called when the service module is imported, which ``bentoml serve`` does
    before it prepares the folder; in a worker, which already has its folder,
    and in any other process that imports the service, it changes nothing.
    """
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return None
    # BentoML's container is the one place that says where the server's folder is.
    from bentoml._internal.configuration.containers import BentoMLContainer

    root = Path(BentoMLContainer.bentoml_home.get()) / "prometheus"
    for stale in root.glob("*"):
        if stale.name.isdigit() and not process_exists(int(stale.name)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = root / str(os.getpid())
    BentoMLContainer.prometheus_multiproc_dir.set(str(folder))
    return folder


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
