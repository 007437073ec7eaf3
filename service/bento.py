"""The BentoML service, built from a ``Settings`` object: ``build_service(settings)``.

BentoML does what it is good at, through its public API: the worker processes
(``workers``), the model store (one ``BentoModel`` per served model, which
``bentoml build`` packs into the bento), the probes, ``/metrics``, tracing, the
request timeout, the web page (``asgi_app``), ``bentoml build`` and
``containerize``. The API routes are the route table's (``service.routes``):

* the ASGI gate (``service.http.ApiGate``, added with ``add_asgi_middleware``)
  answers them through the worker's ``ServingApp``;
* ``RoutedService`` (BentoML's ``service_class``) adds them to the documents
  BentoML serves: the OpenAPI document behind the page at ``/`` and the
  ``/schema.json`` that ``bentoml.SyncHTTPClient`` builds its methods from.

Building the service installs the framework hooks (``service.framework_hooks``)
and reads the model store's entries for the tags to serve; each worker then
loads its models once, at start-up. Nothing happens at import.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import bentoml
import yaml

from models.artifacts import ArtifactError
from models.registry import REGISTRY, ModelSpec, get_spec
from service import framework_hooks, openapi, request_log, rollouts, tracing, v2_routes
from service.api_keys import ApiKeys, RouteGuard
from service.app import ServingApp, placement
from service.backends import BackendError, check_placement, resolve_device
from service.http import ApiGate, Reply
from service.model_store import (
    check_store_entries,
    damaged_entry_line,
    load_stored_artifact,
    served_model_tags,
    version_of,
)
from service.routes import RouteTable
from service.settings import Settings
from service.tasks import task_kind
from service.webpage import PAGE_PATH, page_app
from service.worker_state import WorkerSampler

SERVICE_NAME = "digit-sentiment-serving"


def route_table(specs: list[ModelSpec], settings: Settings, admin: bool = False) -> RouteTable:
    """Every API route of the served models, from their specs: each task's own routes,
    the Open Inference Protocol's and, with ``admin``, model management's."""
    native = [route for spec in specs for route in task_kind(spec).routes(spec, settings.limits)]
    protocol = v2_routes.server_routes() + [
        route for spec in specs for route in v2_routes.model_routes(spec)
    ]
    management = rollouts.admin_routes(specs) if admin else []
    return RouteTable(native + protocol + management)


class RoutedService(bentoml.Service):
    """BentoML's service, with the route table's routes in its documents."""

    @property
    def route_table(self) -> RouteTable:
        return self.inner.route_table

    def schema(self) -> dict[str, Any]:
        schema = super().schema()
        schema["routes"] = [*schema.get("routes", []), *openapi.client_routes(self.route_table)]
        schema["paths"] = {
            **schema.get("paths", {}),
            **{p: {"mounted": False} for p in self.route_table},
        }
        return schema

    @property
    def openapi_spec(self) -> OpenApiDocument:
        document = super().openapi_spec.asdict()
        document["paths"].update(openapi.paths(self.route_table))
        document.setdefault("components", {}).setdefault("schemas", {}).update(
            openapi.components(self.route_table)
        )
        return OpenApiDocument(document)


class OpenApiDocument:
    """The OpenAPI document in the two forms BentoML reads: ``asdict()`` (``/docs.json``)
    and YAML (``apis/openapi.yaml`` in a built bento)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def asdict(self) -> dict[str, Any]:
        return self.document


def build_service(settings: Settings) -> bentoml.Service:
    """The service for these settings: its models, routes, web page and configuration."""
    tags = served_model_tags({key: model.tag for key, model in settings.models.items()})
    check_store_entries(tags.values())
    keys = ApiKeys(Path(settings.api_keys_file)) if settings.api_keys_file else None
    # Model management exists only where a key may use it.
    admin = keys is not None and keys.has_scope("admin")
    table = route_table(list(REGISTRY.values()), settings, admin)
    state = rollouts.StateStore(Path(settings.state_dir or rollouts.default_state_dir()))
    framework_hooks.install(settings, api_routes=table)
    yaml.add_representer(OpenApiDocument, _document_as_yaml)

    class ServingService:
        """Classify handwritten digits, tell the sentiment of English text and generate digits.

        PyTorch models (an MNIST CNN, an SST-2 BiLSTM and a conditional DCGAN, and
        any other model in the registry), served with adaptive batching on the GPU
        or the CPU. Bad input gets a 4xx with a JSON body
        ``{"error": "...", "detail": [{"type", "loc", "msg"}]}``.

        **[Try the models in your browser at /ui](/ui/)**: draw a digit, type a review,
        generate digits.
        """

        route_table = table

        def __init__(self) -> None:
            _configure_logging(settings.log_level)
            request_log.configure(settings.log_format)
            if settings.tracing:
                tracing.enable()
            framework_hooks.check()
            configured = {key: getattr(self, _attribute(key)) for key in tags}
            names = {key: get_spec(settings.models[key].registry_name).name for key in tags}
            stored = rollouts.startup_models(state, configured, names)
            self.app = ServingApp(settings, table, stored)
            self.app.rollouts = rollouts.Rollouts(
                self.app,
                state,
                {key: version_of(tag) for key, tag in tags.items()},
                settings.workers,
                keys.name_of if keys is not None else lambda headers: None,
            )

        @bentoml.on_deployment
        def check_configuration() -> None:
            """Before any worker starts: the framework hooks are in effect, and every
            model is in the store, verified, and can run as configured; otherwise
            ``bentoml serve`` stops here with the reason, instead of restarting workers
            that fail one after another."""
            framework_hooks.check()
            # What the operator can fix ends the start with one line, not a traceback.
            try:
                device = resolve_device(settings.device)
            except BackendError as error:
                raise SystemExit(f"cannot start: {error}: set SERVING_DEVICE=auto or cpu") from None
            for key, tag in tags.items():
                try:
                    artifact = load_stored_artifact(bentoml.models.get(tag).path)
                except ArtifactError as error:
                    raise SystemExit(damaged_entry_line(tag, str(error))) from None
                try:
                    check_placement(get_spec(settings.models[key].registry_name), artifact,
                                    placement(settings, key, device))  # fmt: skip
                except BackendError as error:
                    raise SystemExit(f"cannot start: {error}") from None

        @bentoml.on_startup
        async def start_rollouts(self) -> None:
            """Apply the rollout state (a canary it names) and watch it, and sample the
            worker's gauges, on this worker's event loop."""
            await self.app.rollouts.start()
            self.sampler = WorkerSampler(self.app.models)
            self.sampler.start()

        @bentoml.on_startup
        async def start_grpc(self) -> None:
            """The Open Inference Protocol over gRPC, on this worker's event loop (so on
            its batchers), once its models are loaded."""
            self.grpc = None
            if settings.grpc_port is not None:
                from service.v2_grpc import GrpcServer

                models = {slot.serving.spec.name: slot for slot in self.app.models.values()}
                limit = settings.limits.max_body_bytes
                self.grpc = GrpcServer(models, self.app.requests, keys, settings.grpc_port, limit)
                await self.grpc.start()

        @bentoml.on_shutdown
        async def stop_grpc(self) -> None:
            """After the HTTP server has drained: the calls in flight get as long again."""
            await self.app.rollouts.stop()
            self.sampler.stop()
            if self.grpc is not None:
                await self.grpc.stop(settings.connections.drain_s)

        def refusal(self, path: str) -> Reply | None:
            return self.app.refusal(path)

        async def handle(self, *request: Any) -> Reply:
            return await self.app.handle(*request)

    for key, tag in tags.items():
        setattr(ServingService, _attribute(key), bentoml.models.BentoModel(tag))
    service = bentoml.service(
        name=SERVICE_NAME,
        service_class=RoutedService,
        workers=settings.workers,
        traffic={"timeout": settings.request_timeout_s},
        # The gate writes the request log (service.request_log), with more to say.
        logging={"access": {"enabled": False}},
        tracing=_tracing_config(settings, table),
    )(bentoml.asgi_app(page_app(), path=PAGE_PATH)(ServingService))
    service.add_asgi_middleware(
        ApiGate,
        routes=table.gate_routes(),
        unknown=table.unknown,
        key_of=table.key_of,
        authorize=RouteGuard(keys, table) if keys is not None else None,
        max_body_bytes=settings.limits.max_body_bytes,
        handler=bentoml.get_current_service,
        request_log=settings.access_log,
    )
    return service


def _document_as_yaml(dumper: yaml.Dumper, document: OpenApiDocument) -> yaml.Node:
    return dumper.represent_dict(document.document)


def _tracing_config(settings: Settings, table: RouteTable) -> dict[str, Any]:
    """BentoML's tracing: OTLP/HTTP to the configured endpoint with tracing on; off, the
    API routes get no spans at all (BentoML would record one per request and per body
    chunk even without an exporter, about a quarter of the event loop's time)."""
    if not settings.tracing:
        return {"excluded_urls": list(table)}
    return {
        "exporter_type": "otlp",
        "excluded_urls": ["/livez", "/readyz", "/healthz", "/metrics"],  # probes, scrapes
        "sample_rate": settings.tracing_sample_rate,
        "otlp": {"protocol": "http", "endpoint": settings.tracing_endpoint},
    }


def _attribute(key: str) -> str:
    return f"{key}_model"


def _configure_logging(level: str) -> None:
    """Show this package's log in the server output.

    BentoML's logging setup leaves the root logger at WARNING and disables
    loggers that existed before it ran, which would hide the start-up summary.
    """
    logging.getLogger("service").setLevel(level)
    for name, logger in logging.root.manager.loggerDict.items():
        if (name == "service" or name.startswith("service.")) and isinstance(
            logger, logging.Logger
        ):
            logger.disabled = False
