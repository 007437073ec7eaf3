"""``service.framework_hooks``: every replaced framework piece is in effect once the
service is built, and a start-up check refuses to start, naming the hook and
the versions, as soon as one is not (an upgrade that moved the piece)."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest

from service import framework_hooks
from service.framework_hooks import HOOKS, HookNotInEffect


@pytest.fixture(autouse=True)
def service_built(model_store):
    from service.service import ServingService  # noqa: F401  (built: the hooks installed)


def test_every_hook_is_in_effect():
    framework_hooks.check()
    assert {hook.name for hook in HOOKS} == {
        "request timeout", "request metrics", "HTTP protocol", "metrics folder",
    }  # fmt: skip


def undo_request_timeout(monkeypatch):
    from bentoml._internal.server.http import traffic

    from service.request_timeout import BENTOML_TIMEOUT_MIDDLEWARE

    monkeypatch.setattr(traffic, "TimeoutMiddleware", BENTOML_TIMEOUT_MIDDLEWARE)


def undo_request_metrics(monkeypatch):
    from bentoml._internal.server.http import instruments

    from service.traffic_metrics import BentoTrafficMetrics

    monkeypatch.setattr(instruments, "RunnerTrafficMetricsMiddleware", BentoTrafficMetrics)


def undo_http_protocol(monkeypatch):
    from uvicorn import config

    monkeypatch.setitem(
        config.HTTP_PROTOCOLS, "auto", "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol"
    )


def undo_metrics_folder(monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/home/user/bentoml/prometheus_multiproc_dir")


def moved_upstream(monkeypatch):
    """BentoML and uvicorn refactored: no framework module looks the pieces up as before."""
    monkeypatch.setattr(framework_hooks, "_source", lambda *_: "def elsewhere(): ...")


@pytest.mark.parametrize(
    ("undo", "hook"),
    [
        (undo_request_timeout, "request timeout"),
        (undo_request_metrics, "request metrics"),
        (undo_http_protocol, "HTTP protocol"),
        (undo_metrics_folder, "metrics folder"),
        (moved_upstream, "request timeout"),  # the first hook checked
    ],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_a_hook_out_of_effect_stops_the_start_with_its_name_and_versions(monkeypatch, undo, hook):
    undo(monkeypatch)
    with pytest.raises(HookNotInEffect) as refusal:
        framework_hooks.check()
    message = str(refusal.value)
    assert f"the {hook} hook is not in effect" in message
    assert f"BentoML {version('bentoml')}" in message and f"uvicorn {version('uvicorn')}" in message


def test_uvicorn_serves_with_the_guarded_protocol():
    import uvicorn

    from service.connections import GuardedHttpProtocol

    async def app(scope, receive, send): ...

    config = uvicorn.Config(app, http="auto")  # what BentoML's worker leaves it at
    config.load()
    assert config.http_protocol_class is GuardedHttpProtocol


def test_the_check_reads_framework_sources_without_importing_them(bentoml_home):
    """The deployment check runs in the ``bentoml serve`` parent: importing the worker's
    modules there to read their source cost the parent 12 MiB (47 MiB in a bare process)."""
    import subprocess
    import sys

    program = (
        "import sys, service.settings as s, service.framework_hooks as h\n"
        "h.install(s.Settings.from_env()); h.check()\n"
        "print(sorted(m for m in ('_bentoml_impl.server', '_bentoml_impl.server.app',\n"
        "    '_bentoml_impl.worker.service') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.stdout.strip() == "[]", done.stderr
