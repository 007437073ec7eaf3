"""One worker's service: its models loaded, their batchers, and the answer to every
API request, free of BentoML.

``ServingApp(settings, table, stored)`` builds everything a worker serves with,
once: for each model in the route table, its artifact (from the model store
entry's directory), its predictor on the configured device and backend, its
task (``service.tasks``) and its adaptive batcher. The ASGI gate
(``service.http.ApiGate``) then calls ``refusal`` and ``handle`` for every API
request; a request goes

    route table → decode and validate the body → the route's answer → the model's
    batcher → predictor → JSON (or PNG)

``service.bento`` wraps this in the BentoML service; tests build it the same way
with explicit settings.
"""

from __future__ import annotations

import functools
import gc
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from models.artifacts import Artifact
from service import v2
from service.backends import (
    Device,
    Placement,
    device_name,
    load_predictor,
    resolve_device,
    torch_installed,
    use_torch_threads,
)
from service.batching import AdaptiveBatcher
from service.errors import RequestError, ServiceBusy
from service.heap_snapshots import HeapSnapshots
from service.http import IN_FLIGHT, Headers, InFlight, Reply
from service.inference import TimedPredictor
from service.memory import return_freed_memory_promptly
from service.metrics import RequestCounts, endpoint_metrics
from service.model_store import load_stored_artifact
from service.routes import Route, RouteTable
from service.settings import (
    RENAMED_MODEL_SETTINGS,
    Settings,
    model_spec,
    resolve_backend,
    resolve_precision,
)
from service.tasks import Task, task_kind
from service.v2 import V2Error

log = logging.getLogger("service")

MODEL_VERSION_HEADER = "X-Model-Version"
# The Open Inference Protocol's name for each backend (model metadata's "platform").
PLATFORMS = {"onnx": "onnxruntime_onnx", "torch": "pytorch"}


class StoredModel(Protocol):
    """A model store entry (``bentoml.models.BentoModel`` once resolved)."""

    tag: Any
    path: str


def _error_reply(route: Route, error: RequestError | ServiceBusy | V2Error) -> Reply:
    """A refusal in the route's protocol: the service's error shape, or v2's
    ``{"error": "..."}``."""
    if isinstance(error, V2Error):
        return Reply(error.status, v2.error_body(error.message))
    if route.protocol == "v2":
        return Reply(error.status, v2.error_body(error.body()["error"]), headers=error.headers())
    return Reply.error(error)


def placement(settings: Settings, key: str, device: Device) -> Placement:
    """Where and how model ``key`` runs under these settings."""
    model = settings.models[key]
    backend = resolve_backend(model, device.type, torch_installed())
    return Placement(
        backend=backend,
        device=device,
        precision=resolve_precision(model, backend, device.type),
        threads=settings.threads_per_model(key),
    )


class ServingApp:
    """The models of one worker and the answers of the API routes."""

    def __init__(
        self,
        settings: Settings,
        table: RouteTable,
        stored: Mapping[str, StoredModel],
        in_flight: InFlight = IN_FLIGHT,
    ) -> None:
        """``stored``: model key → its model store entry."""
        self.settings = settings
        self.table = table
        for old in settings.renamed_in_use:
            log.warning("%s is deprecated: use %s", old, RENAMED_MODEL_SETTINGS[old])
        self.device = resolve_device(settings.device)
        specs = {key: model_spec(key) for key in stored}
        if any(placement(settings, key, self.device).backend == "torch" for key in specs):
            use_torch_threads(settings.threads_per_model())
        metrics = endpoint_metrics(specs)
        self.requests = RequestCounts()
        artifacts = {key: load_stored_artifact(model.path) for key, model in stored.items()}
        self.tasks: dict[str, Task] = {}
        for key, spec in specs.items():
            predictor = TimedPredictor(
                load_predictor(spec, artifacts[key], placement(settings, key, self.device)),
                metrics[key].observe_model_seconds,
            )
            task = task_kind(spec)(spec, settings.limits, predictor, artifacts[key])
            task.version = str(stored[key].tag).partition(":")[2]
            task.platform = PLATFORMS[placement(settings, key, self.device).backend]
            self.tasks[key] = task
        return_freed_memory_promptly()
        batching = settings.resolve_batching(self.device.type)
        for key, task in self.tasks.items():
            size = batching[key].max_batch_size
            shares = settings.batching and task.shares_batches(self.device.type, size)
            task.batcher = AdaptiveBatcher(
                key,
                task.run_batch,
                max_batch_size=size,
                max_latency_ms=batching[key].max_latency_ms,
                max_queue_items=settings.max_queue_items,
                isolate_requests=not shares,
                arriving_requests=functools.partial(in_flight.count, table.queued_paths(key)),
                observe_batch=metrics[key].observe_batch_size,
                prepare_batch=task.prepare_batch,
            )
        self._log_summary(stored, artifacts)
        # Everything loaded so far (torch, BentoML, the models) lives as long as the
        # worker: move it out of the collector's reach, so that a full collection
        # under load walks only what requests allocate instead of pausing every
        # request for the whole heap.
        gc.freeze()
        if settings.heap_snapshot_dir:
            HeapSnapshots(
                Path(settings.heap_snapshot_dir), settings.heap_snapshot_interval_s
            ).start()

    def refusal(self, path: str) -> Reply | None:
        """A 503 for ``path`` while its model's queue has no room, before anything is read."""
        route = self.table[path]
        if route.queue is None:
            return None
        batcher = self.tasks[route.queue].batcher
        if not batcher.is_full:
            return None
        busy = ServiceBusy(f"the server is busy ({batcher.name}: the queue is full); retry shortly")
        reply = _error_reply(route, busy)
        self.requests.count(route.protocol, route.endpoint, reply.status)
        return reply

    async def handle(
        self, path: str, media_type: str, content_type: str, body: bytes, headers: Headers
    ) -> Reply:
        """Answer one request to an API route; the gate has checked method, type and size."""
        route = self.table[path]
        target = self if route.endpoint is None else self.tasks[route.endpoint]
        try:
            request = route.decode(media_type, content_type, body, headers)
            reply = await route.answer(target, request)
        except (RequestError, ServiceBusy, V2Error) as error:
            reply = _error_reply(route, error)
        self.requests.count(route.protocol, route.endpoint, reply.status)
        if route.endpoint is not None and reply.status == 200:
            # Which model version produced the answer, in every protocol's answers.
            version = {MODEL_VERSION_HEADER: target.version}
            reply = replace(reply, headers={**(reply.headers or {}), **version})
        return reply

    def _log_summary(self, stored: Mapping[str, StoredModel], artifacts: Mapping[str, Artifact]):
        """One start-up summary a production user can check the deployment against."""
        log.info("device %s (%s), %d worker(s)", self.device, device_name(self.device),
                 self.settings.workers)  # fmt: skip
        for key, task in self.tasks.items():
            metadata = artifacts[key].metadata
            metrics = {
                name: round(value, 4)
                for name, value in metadata.get("metrics", {}).items()
                if isinstance(value, float)
            }
            log.info("model %s: %s; %s; %s", key, stored[key].tag,
                     task.model.predictor.describe(), metrics)  # fmt: skip
            if metadata.get("smoke"):
                log.warning("model %s is a smoke-test artifact, not a trained release", key)
            batcher = task.batcher
            log.info("batching %s: max_batch_size=%d max_latency_ms=%g, %s", key,
                     batcher.max_batch_size, batcher.max_latency_s * 1000,
                     "per request" if batcher.isolate_requests else "across requests")  # fmt: skip
        log.info("limits: %s", self.settings.limits)
