"""Shared test fixtures.

* Every test session gets its own empty BentoML home (``BENTOML_HOME``), so no
  test reads or writes the user's model store.
* ``release_artifacts``: the committed artifacts in models/artifacts (or
  ``$MODEL_ARTIFACTS_DIR``); tests that need trained models skip, with the
  reason, until they exist.
* ``model_store``: those artifacts registered in the session's store.
* ``data_dir``, ``mnist_test_digits``, ``sst2_test_sentences``: real test data.
* ``serve``: start ``bentoml serve`` on a free port as a child process and
  stop it again (used by the HTTP and bento tests; one server per module).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from bench.multipart import file_parts, multipart_body

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 240.0

_SESSION_BENTOML_HOME: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    # Before anything imports bentoml: its store location is fixed on first use.
    global _SESSION_BENTOML_HOME
    _SESSION_BENTOML_HOME = tempfile.mkdtemp(prefix="test-bentoml-home-")
    os.environ["BENTOML_HOME"] = _SESSION_BENTOML_HOME
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_BENTOML_HOME:
        shutil.rmtree(_SESSION_BENTOML_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    return Path(os.environ["BENTOML_HOME"])


@pytest.fixture(scope="session")
def release_artifacts() -> Path:
    """Root of the trained artifacts; skips when a model or its ONNX export is missing."""
    from models.artifacts import METADATA_FILE, ONNX_FILE, read_json
    from models.registry import REGISTRY, artifacts_root

    root = artifacts_root()
    for spec in REGISTRY.values():
        metadata = spec.artifact_dir(root) / METADATA_FILE
        if not metadata.is_file():
            pytest.skip(f"no trained {spec.name} artifact in {root} yet")
        if ONNX_FILE not in read_json(metadata).get("files", {}):
            pytest.skip(f"{spec.name} in {root} has no {ONNX_FILE} yet (run the export)")
    return root


@pytest.fixture(scope="session")
def model_store(release_artifacts: Path, bentoml_home: Path) -> dict[str, str]:
    """The release artifacts registered in the session's model store: name → tag."""
    from training.register import register_all

    tags = register_all(root=release_artifacts)
    return {tag.name: str(tag) for tag in tags}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from training.common import default_data_dir

    path = default_data_dir()
    if not (path / "MNIST").is_dir() or not (path / "SST-2").is_dir():
        pytest.skip(f"the MNIST and SST-2 data sets are not in {path}")
    return path


@pytest.fixture(scope="session")
def mnist_test_digits(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first 200 MNIST test images (uint8, white on black) and their labels."""
    from torchvision import datasets

    test_set = datasets.MNIST(str(data_dir), train=False, download=False)
    return test_set.data[:200].numpy(), test_set.targets[:200].numpy()


@pytest.fixture(scope="session")
def sst2_test_sentences(data_dir: Path) -> list[tuple[str, int]]:
    """The first 200 SST-2 test sentences with their labels (1 = positive)."""
    from training.data import read_sst2

    return [(row.text, row.label) for row in read_sst2(data_dir, "test")[:200]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class HttpCalls:
    """JSON and file uploads on top of a ``request(path, data=, headers=) → (status,
    headers, body)``, for a served process and an in-process service alike."""

    def post_json(self, path: str, payload: object, timeout: float = 60.0) -> tuple[int, object]:
        """POST a JSON body; (status, decoded JSON body or raw bytes)."""
        status, _, body = self.request(
            path,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            timeout=timeout,
        )
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def post_files(
        self,
        path: str,
        field: str,
        files: Sequence[bytes],
        content_type: str | None = "application/octet-stream",
    ) -> tuple[int, object]:
        """POST files as multipart/form-data parts named ``field``; (status, decoded JSON)."""
        body, form_type = multipart_body(file_parts(field, files, content_type))
        header = {"Content-Type": form_type}
        status, _, raw = self.request(path, data=body, headers=header)
        return status, json.loads(raw)


class InProcessService(HttpCalls):
    """The service built from explicit settings (``service.bento.build_service``) and
    called in process through httpx's ASGI transport: every layer of a worker's app
    (BentoML's middleware, the gate, the route table, the batchers, the models)
    without a process or a socket. Its event loop runs in a background thread, so
    that tests stay synchronous and a service lives across tests."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        import httpx

        from service.bento import build_service
        from service.settings import Settings

        self.settings = Settings.from_env(environ)
        self.service = build_service(self.settings)
        self.app = self.service.to_asgi(is_main=True)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.call(self._lifespan.__aenter__())  # BentoML creates the service instance
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://in-process"
        )

    @property
    def instance(self):
        """The worker's ``ServingApp`` (models, tasks, batchers)."""
        import bentoml

        return bentoml.get_current_service().app

    def call(self, coroutine, timeout: float = 300.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def request(
        self,
        path: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        method: str | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, dict[str, str], bytes]:
        method = method or ("GET" if data is None else "POST")
        response = self.call(
            self.client.request(method, path, content=data, headers=headers), timeout
        )
        return response.status_code, dict(response.headers), response.content

    def request_all(self, requests: Sequence[tuple[str, bytes, str]]) -> list[tuple[int, bytes]]:
        """Send every (path, body, content type) at once; (status, body) each, in order."""

        async def send(path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
            response = await self.client.post(
                path, content=body, headers={"Content-Type": content_type}
            )
            return response.status_code, response.content

        async def everything():
            return await asyncio.gather(*(send(*request) for request in requests))

        return self.call(everything())

    def stop(self) -> None:
        self.call(self.client.aclose())
        self.call(self._lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)


@pytest.fixture(autouse=True, scope="module")
def fresh_bentoml_metrics() -> Iterator[None]:
    """Out of ``bentoml serve`` BentoML's request metrics live in prometheus_client's
    default registry, and each app it builds registers them again on its first
    request: after each module they are forgotten, so that the next module may build
    its own in-process service."""
    yield
    from prometheus_client import REGISTRY

    for name, collector in list(REGISTRY._names_to_collectors.items()):
        if name.startswith("bentoml_") and collector in REGISTRY._collector_to_names:
            REGISTRY.unregister(collector)


# Settings of the services tests build: the CPU, one thread per model (the test machine's
# other core runs the test itself).
TEST_SERVICE_ENV = {"SERVING_DEVICE": "cpu", "SERVING_THREADS": "1"}


@pytest.fixture(scope="module")
def in_process(model_store: dict[str, str]) -> Iterator[Callable[..., InProcessService]]:
    """Build a service in process: ``in_process(env) → InProcessService`` (settings from
    ``env`` alone, not from this process's environment); stopped after the module."""
    started: list[InProcessService] = []

    def start(env: Mapping[str, str] | None = None) -> InProcessService:
        service = InProcessService({**TEST_SERVICE_ENV, **(env or {})})
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


class ServedProcess(HttpCalls):
    """``bentoml serve <target>`` in its own process group, stopped as one."""

    def __init__(self, target: str, env: Mapping[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "bentoml", "serve", target,
                   "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited early:\n{self.log()}")
            with contextlib.suppress(OSError):
                if self.request("/readyz", timeout=2)[0] == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"the server was not ready after {timeout:.0f} s:\n{self.log()}")

    def request(
        self,
        path: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        method: str | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request: (status, headers, body); a 4xx/5xx is returned, not raised."""
        request = urllib.request.Request(
            self.url + path, data=data, headers=dict(headers or {}), method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-20_000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServedProcess]]:
    """Start a served process: ``serve(target, env) → ServedProcess`` (ready to answer)."""
    started: list[ServedProcess] = []

    def start(target: str, env: Mapping[str, str] | None = None) -> ServedProcess:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        served = ServedProcess(target, dict(env or {}), log_path)
        started.append(served)
        try:
            served.wait_ready()
        except Exception:
            served.stop()
            raise
        return served

    yield start
    for served in started:
        served.stop()
