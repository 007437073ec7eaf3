"""BentoML's request metrics on ``/metrics``, without a label lookup per request.

BentoML's ``RunnerTrafficMetricsMiddleware`` records every HTTP request in
``bentoml_service_request_total``, ``..._request_duration_seconds``,
``..._request_in_progress`` and ``..._last_request_timestamp_seconds``, each
labelled with the route, the bento's name and version, the service name and
(for the first two) the status code. It asks prometheus_client for each of
those children on every request, and every ``labels()`` call builds the label
tuple, validates it and takes a lock: under classify load at 64 clients that
middleware was 5–6 % of the worker's CPU samples (docs/benchmarks.md), and
``python -m bench.micro`` puts it at 16.4 µs a request against 7.8 µs for
this class.

``RouteTrafficMetrics`` records the same metrics, with the same names, labels
and semantics (the families are BentoML's own, created by BentoML's ``_setup``),
but finds the children of an API route once, and those of a (route, status)
pair once: a request then costs the observations themselves. Only the
service's API routes are cached, so the cache is bounded; any other path, and
websockets, take BentoML's own code.

``service.framework_hooks`` makes BentoML build this class where it would
build its own, and checks at start-up that it does; ``tests/test_service_http.py``
reads the metrics back from a running server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from timeit import default_timer
from typing import Any

from bentoml._internal.context import server_context
from bentoml._internal.server.http import instruments

BentoTrafficMetrics = instruments.RunnerTrafficMetricsMiddleware


@dataclass
class _RouteChildren:
    """The metric children of one API route, and of each status it has answered."""

    in_progress: Any
    labels: dict[str, Any]
    by_status: dict[int, tuple[Any, Any]] = field(default_factory=dict)


class RouteTrafficMetrics(BentoTrafficMetrics):
    """BentoML's traffic metrics with the children of each API route looked up once."""

    # The API routes (the route table's paths, set when the service is built): only
    # these are cached, so the cache is bounded.
    api_routes: frozenset[str] = frozenset()
    _routes: dict[str, _RouteChildren]
    _last_request: Any

    def _setup(self, *args: Any, **kwargs: Any) -> None:
        super()._setup(*args, **kwargs)  # BentoML's families, from its metrics client
        self._routes = {}
        self._last_request = self.metrics_last_request_timestamp.labels(
            service_name=server_context.bento_name,
            service_version=server_context.bento_version,
            runner_name=server_context.service_name,
        )
        # As BentoML does for its own API methods: every route starts with its 200 and
        # 500 counts at zero, so that a rate over them exists before the first request.
        for path in self.api_routes:
            for status in (200, 500):
                self._status(self._route(path), status)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not self._is_setup:
            self._setup()
        path = scope.get("path")
        if scope["type"] != "http" or path not in self.api_routes:
            await super().__call__(scope, receive, send)
            return
        route = self._routes.get(path) or self._route(path)
        self._last_request.set_to_current_time()
        start = default_timer()
        status = 0

        async def observed_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                total, duration = route.by_status.get(status) or self._status(route, status)
                total.inc()
                duration.observe(max(default_timer() - start, 0))
            await send(message)

        route.in_progress.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            route.in_progress.dec()

    def _route(self, path: str) -> _RouteChildren:
        labels = {
            "endpoint": path,
            "service_name": server_context.bento_name,
            "service_version": server_context.bento_version,
            "runner_name": server_context.service_name,
        }
        route = _RouteChildren(self.metrics_request_in_progress.labels(**labels), labels)
        self._routes[path] = route
        return route

    def _status(self, route: _RouteChildren, status: int) -> tuple[Any, Any]:
        children = (
            self.metrics_request_total.labels(**route.labels, http_response_code=status),
            self.metrics_request_duration.labels(**route.labels, http_response_code=status),
        )
        route.by_status[status] = children
        return children
