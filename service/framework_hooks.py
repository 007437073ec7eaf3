"""The framework internals this service replaces, in one place, each checked at start-up.

BentoML and uvicorn offer no public extension point for these four, so the
service puts its own piece where the framework looks one up:

* ``request timeout``: BentoML's ``TimeoutMiddleware`` keeps a timer per request
  for the whole timeout; ``service.request_timeout.RequestTimeout`` does not.
* ``request metrics``: BentoML's ``RunnerTrafficMetricsMiddleware`` looks up its
  metric children on every request; ``service.traffic_metrics.RouteTrafficMetrics``
  records the same metrics with the children found once.
* ``HTTP protocol``: uvicorn's ``http="auto"`` protocol, which ``bentoml serve``
  uses, becomes ``service.connections.GuardedHttpProtocol`` (limits on heads,
  connections and drain).
* ``metrics folder``: BentoML's Prometheus multiprocess folder becomes one per
  running server (``service.metrics.use_instance_folder``).

Each replacement works only while the framework still looks the piece up
where it did when this was written, and an upgrade that moves it would turn
the replacement off without a word. So ``install`` puts them in place and
``check``, called by every worker as it starts, refuses to start with a
``HookNotInEffect`` that names the hook and the installed versions when one is
no longer in effect. BentoML and uvicorn are pinned in ``pyproject.toml``;
``tests/test_framework_hooks.py`` undoes each hook and expects the refusal.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from service.connections import GuardedHttpProtocol
from service.metrics import use_instance_folder
from service.request_timeout import RequestTimeout
from service.settings import Settings
from service.traffic_metrics import RouteTrafficMetrics

PROTOCOL_PATH = f"{GuardedHttpProtocol.__module__}:{GuardedHttpProtocol.__name__}"


class HookNotInEffect(RuntimeError):
    """A framework no longer looks a replaced piece up where the service puts it."""


@dataclass(frozen=True)
class Hook:
    name: str
    replaces: str  # where the framework looks the piece up
    install: Callable[[], None]
    in_effect: Callable[[], bool]


def _bentoml_traffic():
    from bentoml._internal.server.http import traffic

    return traffic


def _bentoml_instruments():
    from bentoml._internal.server.http import instruments

    return instruments


def _uvicorn_protocols() -> dict:
    from uvicorn import config

    return config.HTTP_PROTOCOLS


def _source(module_name: str) -> str:
    """A module's source text, read from its file without importing it or its package:
    the check runs in the ``bentoml serve`` parent too, which should not load the
    worker's modules ("" when the file is not there)."""
    top, *rest = module_name.split(".")
    spec = importlib.util.find_spec(top)  # finds a top-level package without importing it
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = Path(spec.submodule_search_locations[0], *rest).with_suffix(".py")
    return path.read_text() if path.is_file() else ""


def _install_request_timeout() -> None:
    _bentoml_traffic().TimeoutMiddleware = RequestTimeout


def _request_timeout_in_effect() -> bool:
    builds_from_module = "from .http.traffic import TimeoutMiddleware" in _source(
        "bentoml._internal.server.base_app"
    )
    return builds_from_module and _bentoml_traffic().TimeoutMiddleware is RequestTimeout


def _install_request_metrics() -> None:
    _bentoml_instruments().RunnerTrafficMetricsMiddleware = RouteTrafficMetrics


def _request_metrics_in_effect() -> bool:
    factory = _source("_bentoml_impl.server.app")
    builds_from_module = (
        "from bentoml._internal.server.http.instruments import" in factory
        and "RunnerTrafficMetricsMiddleware," in factory
    )
    return (
        builds_from_module
        and _bentoml_instruments().RunnerTrafficMetricsMiddleware is RouteTrafficMetrics
    )


def _install_http_protocol() -> None:
    _uvicorn_protocols()["auto"] = PROTOCOL_PATH


def _http_protocol_in_effect() -> bool:
    # BentoML's worker must leave uvicorn's ``http`` at its default, "auto".
    call = re.search(r"uvicorn\.Config\((.*?)\n\s*\)", _source("_bentoml_impl.worker.service"),
                     re.S)  # fmt: skip
    leaves_http_alone = call is not None and "http=" not in call.group(1)
    return leaves_http_alone and _uvicorn_protocols().get("auto") == PROTOCOL_PATH


def _metrics_folder_in_effect() -> bool:
    # A worker of ``bentoml serve`` inherits the folder; anywhere else there is none.
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder is None:
        return True
    path = Path(folder)
    return path.parent.name == "prometheus" and path.name.isdigit()


HOOKS = (
    Hook("request timeout", "bentoml._internal.server.http.traffic.TimeoutMiddleware",
         _install_request_timeout, _request_timeout_in_effect),
    Hook("request metrics",
         "bentoml._internal.server.http.instruments.RunnerTrafficMetricsMiddleware",
         _install_request_metrics, _request_metrics_in_effect),
    Hook("HTTP protocol", 'uvicorn.config.HTTP_PROTOCOLS["auto"]',
         _install_http_protocol, _http_protocol_in_effect),
    Hook("metrics folder", "BentoMLContainer.prometheus_multiproc_dir",
         use_instance_folder, _metrics_folder_in_effect),
)  # fmt: skip


def install(settings: Settings, api_routes: Iterable[str] = ()) -> None:
    """Put every replacement in place, configured for these settings and API routes:
    before ``bentoml serve`` prepares its metrics folder and before a worker builds its
    app and its HTTP server."""
    GuardedHttpProtocol.limits = settings.connections
    RouteTrafficMetrics.api_routes = frozenset(api_routes)
    for hook in HOOKS:
        hook.install()


def check() -> None:
    """Raise ``HookNotInEffect`` naming the first hook the frameworks no longer honour."""
    for hook in HOOKS:
        if not hook.in_effect():
            raise HookNotInEffect(
                f"the {hook.name} hook is not in effect: {hook.replaces} is no longer where "
                f"BentoML {version('bentoml')} / uvicorn {version('uvicorn')} look it up; "
                "install the versions pinned in pyproject.toml"
            )
