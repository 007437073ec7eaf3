"""One worker's service: its models loaded, their batchers, and the answer to every
API request, free of BentoML.

``ServingApp(settings, table, stored)`` builds everything a worker serves with:
for each model in the route table, its artifact (from the model store entry's
directory), its predictor on the configured device and backend, its task
(``service.tasks``) and its adaptive batcher, held in the model's ``ModelSlot``
with any canary version beside it (``service.rollouts`` loads and swaps
versions while the worker runs). The ASGI gate (``service.http.ApiGate``) then
calls ``refusal`` and ``handle`` for every API request; a request goes

    route table → the model version that answers it → decode and validate the body
    → the route's answer → that version's batcher → predictor → JSON (or PNG)

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

from models.artifacts import ArtifactError
from models.example_outputs import ExampleMismatch, check_example
from service import tracing, v2
from service.backends import (
    BackendError,
    Device,
    Placement,
    check_placement,
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
from service.metrics import RequestCounts, model_metrics
from service.model_store import load_stored_artifact, version_of
from service.request_log import CURRENT
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


class VersionRefused(Exception):
    """A model version failed one of the checks it must pass before it serves."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check
        self.message = message


class ModelSlot:
    """The versions of one model a worker serves: the serving one, and a canary with its
    share of the requests."""

    def __init__(self, serving: Task) -> None:
        self.serving = serving
        self.canary: Task | None = None
        self.canary_percent = 0.0
        self._credit = 0.0

    def pick(self) -> Task:
        """The version to answer the next request: the canary for exactly its share of
        the requests, spread evenly (every tenth at 10 %), else the serving version."""
        if self.canary is None:
            return self.serving
        self._credit += self.canary_percent
        if self._credit >= 100.0:
            self._credit -= 100.0
            return self.canary
        return self.serving

    def find(self, version: str) -> Task | None:
        """The task of this version, if the worker serves it."""
        for task in (self.serving, self.canary):
            if task is not None and task.version == version:
                return task
        return None


class ServingApp:
    """The models of one worker and the answers of the API routes."""

    def __init__(
        self,
        settings: Settings,
        table: RouteTable,
        stored: Mapping[str, StoredModel],
        in_flight: InFlight = IN_FLIGHT,
    ) -> None:
        """``stored``: model key → the model store entry of the version to serve."""
        self.settings = settings
        self.table = table
        self.in_flight = in_flight
        for old in settings.renamed_in_use:
            log.warning("%s is deprecated: use %s", old, RENAMED_MODEL_SETTINGS[old])
        self.device = resolve_device(settings.device)
        self.placements = {key: placement(settings, key, self.device) for key in stored}
        if any(where.backend == "torch" for where in self.placements.values()):
            use_torch_threads(settings.threads_per_model())
        self.batching = settings.resolve_batching(self.device.type)
        self.requests = RequestCounts()
        for key in stored:
            for protocol in ("native", "v2"):
                self.requests.declare(protocol, key, 503)
        log.info("device %s (%s), %d worker(s)", self.device, device_name(self.device),
                 settings.workers)  # fmt: skip
        self.models = {key: ModelSlot(self.load_version(key, stored[key])) for key in stored}
        log.info("limits: %s", settings.limits)
        return_freed_memory_promptly()
        # Everything loaded so far (torch, BentoML, the models) lives as long as the
        # worker: move it out of the collector's reach, so that a full collection
        # under load walks only what requests allocate instead of pausing every
        # request for the whole heap.
        gc.freeze()
        if settings.heap_snapshot_dir:
            HeapSnapshots(
                Path(settings.heap_snapshot_dir), settings.heap_snapshot_interval_s
            ).start()

    @property
    def tasks(self) -> dict[str, Task]:
        """Model key → the task of its serving version."""
        return {key: slot.serving for key, slot in self.models.items()}

    def load_version(self, key: str, stored: StoredModel, *, check: bool = False) -> Task:
        """Model ``key``'s task for one model store entry, with its batcher, ready to serve.

        With ``check`` (a version rolled out while the worker serves) it must also pass
        the checks first, or ``VersionRefused`` names the one it failed: its checksums,
        that it loads on this worker's backend, that the spec's example input gives the
        output its artifact records, and a warm-up at batch 1 and the largest batch.
        Blocking: the rollouts run it on a thread.
        """
        spec = model_spec(key)
        version = version_of(stored.tag)
        where = self.placements[key]
        try:
            artifact = load_stored_artifact(stored.path)
        except (ArtifactError, OSError, ValueError) as error:
            raise VersionRefused("checksums", str(error)) from None
        try:
            check_placement(spec, artifact, where)
            predictor = load_predictor(spec, artifact, where)
        except (BackendError, ArtifactError, OSError, ValueError, RuntimeError) as error:
            raise VersionRefused("load", str(error)) from None
        size = self.batching[key].max_batch_size
        if check:
            try:
                check_example(spec, artifact, predictor, where.precision)
            except ExampleMismatch as error:
                raise VersionRefused("example_output", str(error)) from None
            try:
                for rows in (1, size):
                    predictor(*spec.example_inputs(artifact.config, batch_size=rows))
            except Exception as error:  # whatever the backend raises
                raise VersionRefused("warm_up", str(error)) from None
        metrics = model_metrics(key, version)
        timed = TimedPredictor(predictor, metrics.observe_model_seconds)
        task = task_kind(spec)(spec, self.settings.limits, timed, artifact)
        task.version = version
        task.platform = PLATFORMS[where.backend]
        shares = self.settings.batching and task.shares_batches(self.device.type, size)
        task.batcher = AdaptiveBatcher(
            key,
            task.run_batch,
            max_batch_size=size,
            max_latency_ms=self.batching[key].max_latency_ms,
            max_queue_items=self.settings.max_queue_items,
            isolate_requests=not shares,
            arriving_requests=functools.partial(self.in_flight.count, self.table.queued_paths(key)),
            observe_batch=metrics.observe_batch_size,
            prepare_batch=task.prepare_batch,
        )
        self._log_version(key, stored, task, artifact.metadata)
        return task

    def refusal(self, path: str) -> Reply | None:
        """Before anything is read: a 404 for a model version this worker does not serve,
        a 503 while the model's queue has no room."""
        route, version = self.table.find(path)
        if version is not None and self.models[route.endpoint].find(version) is None:
            reply = self.table.unknown(path) or Reply(404, b"{}")
            self.requests.count(route.protocol, route.endpoint, reply.status)
            return reply
        if route.queue is None:
            return None
        batcher = self.models[route.queue].serving.batcher
        if not batcher.is_full:
            return None
        busy = ServiceBusy(f"the server is busy ({batcher.name}: the queue is full); retry shortly")
        reply = _error_reply(route, busy)
        self.requests.count(route.protocol, route.endpoint, reply.status)
        return reply

    async def handle(
        self, path: str, media_type: str, content_type: str, body: bytes, headers: Headers
    ) -> Reply:
        """Answer one request to an API route; the gate has checked method, type and size.

        A model's request is answered by the version chosen here, start to end: one
        taken out of service meanwhile finishes it (``Task.requests_in_progress``)."""
        route, version = self.table.find(path)
        if route.endpoint is None:
            return await self._answer(route, self, None, body, media_type, content_type, headers)
        slot = self.models[route.endpoint]
        if version is not None:
            task = slot.find(version)
            if task is None:  # taken out of service since ``refusal`` looked
                return self.refusal(path) or Reply(404, b"{}")
        else:
            task = slot.pick() if route.queue is not None else slot.serving
        task.requests_in_progress += 1
        if (context := CURRENT.get()) is not None:
            context.version = task.version
        try:
            reply = await self._answer(route, task, task.version, body, media_type, content_type,
                                       headers)  # fmt: skip
        finally:
            task.requests_in_progress -= 1
        if reply.status == 200:
            # Which model version produced the answer, in every protocol's answers.
            version_header = {MODEL_VERSION_HEADER: task.version}
            reply = replace(reply, headers={**(reply.headers or {}), **version_header})
        return reply

    async def _answer(
        self,
        route: Route,
        target: Any,
        version: str | None,
        body: bytes,
        media_type: str,
        content_type: str,
        headers: Headers,
    ) -> Reply:
        try:
            with tracing.span("decode"):
                request = route.decode(media_type, content_type, body, headers)
            reply = await route.answer(target, request)
        except (RequestError, ServiceBusy, V2Error) as error:
            reply = _error_reply(route, error)
        self.requests.count(route.protocol, route.endpoint, reply.status, version or "")
        return reply

    def _log_version(self, key: str, stored: StoredModel, task: Task, metadata: Mapping) -> None:
        """What a production user checks the deployment against, for each version loaded."""
        metrics = {
            name: round(value, 4)
            for name, value in metadata.get("metrics", {}).items()
            if isinstance(value, float)
        }
        log.info("model %s: %s; %s; %s", key, stored.tag, task.model.predictor.describe(),
                 metrics)  # fmt: skip
        if metadata.get("smoke"):
            log.warning("model %s is a smoke-test artifact, not a trained release", key)
        batcher = task.batcher
        log.info("batching %s: max_batch_size=%d max_latency_ms=%g, %s", key,
                 batcher.max_batch_size, batcher.max_latency_s * 1000,
                 "per request" if batcher.isolate_requests else "across requests")  # fmt: skip
