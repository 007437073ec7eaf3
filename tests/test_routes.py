"""The route table is the one statement of the API: the gate answers exactly its
routes, and the OpenAPI document and BentoML's client schema say what the routes
really take and give. Nothing is read or installed when the service modules are
imported; building the service does that, from the settings it is given."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.multipart import file_parts, multipart_body
from service.openapi import ERROR_STATUSES, V2_ERROR_STATUSES

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def svc(in_process):
    return in_process()


@pytest.fixture(scope="module")
def documents(svc) -> tuple[dict, dict]:
    status, _, openapi = svc.request("/docs.json")
    assert status == 200
    status, _, schema = svc.request("/schema.json")
    assert status == 200
    return json.loads(openapi), json.loads(schema)


def digit_png() -> bytes:
    buffer = io.BytesIO()
    pixels = np.zeros((28, 28), np.uint8)
    pixels[6:22, 12:16] = 255  # a "1"
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def example_of(schema: dict, components: dict) -> dict:
    """A request body made of the examples the document shows for each field."""
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    return {name: field["examples"][0] for name, field in schema["properties"].items()
            if "examples" in field}  # fmt: skip


def test_every_route_is_documented_with_each_body_form_and_error(svc, documents):
    openapi, schema = documents
    table = svc.service.inner.route_table
    documented = {
        path for path, item in openapi["paths"].items() if {"get", "post"} & set(item)
    } - {"/healthz", "/livez", "/readyz", "/metrics"}  # BentoML's
    assert documented == set(table)
    for path, route in table.items():
        operation = openapi["paths"][path][route.method.lower()]
        if route.method == "POST":
            assert set(operation["requestBody"]["content"]) == set(route.media_types), path
        statuses = ERROR_STATUSES if route.protocol == "native" else V2_ERROR_STATUSES
        assert {"200", *map(str, statuses)} == set(operation["responses"]), path
        assert operation["operationId"] == route.name
    # The routes the web page uses and the raw-image form of /classify are there too.
    classify = openapi["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "image/jpeg"} <= set(classify)
    assert "/classify_input" in openapi["paths"]
    native = [r.name for r in table.values() if r.protocol == "native"]
    assert [route["name"] for route in schema["routes"]] == native


def test_each_documented_example_is_answered_as_documented(svc, documents):
    """Send each route the example its document shows; the answer matches its schema."""
    openapi, _ = documents
    components = openapi["components"]["schemas"]
    table = svc.service.inner.route_table
    for path, route in table.items():
        if route.protocol != "native":
            continue  # the Open Inference Protocol's: tests/test_v2.py
        content = openapi["paths"][path]["post"]["requestBody"]["content"]
        if "application/json" in content:
            body = example_of(content["application/json"]["schema"], components)
            status, headers, raw = svc.request(
                path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
        else:
            files = {field.name: [digit_png()] * (1 if field.max_items is None else 2)
                     for field in route.files}  # fmt: skip
            parts = [part for name, data in files.items() for part in file_parts(name, data)]
            form, form_type = multipart_body(parts)
            status, headers, raw = svc.request(path, data=form, headers={"Content-Type": form_type})
        assert status == 200, (path, raw[:200])
        answered = headers["content-type"]
        documented = openapi["paths"][path]["post"]["responses"]["200"]["content"]
        assert answered in documented, path
        if answered == "application/json":
            route.response.model_validate_json(raw)


def test_the_gate_answers_the_table_s_routes_and_nothing_else(svc):
    table = svc.service.inner.route_table
    for path, route in table.items():
        other = "POST" if route.method == "GET" else "GET"
        status, headers, raw = svc.request(path, method=other)
        assert status == 405 and headers["allow"] == route.method, path
        if route.method == "GET":
            assert svc.request(path)[0] == 200, path
            continue
        status, _, raw = svc.request(path, data=b"x", headers={"Content-Type": "text/csv"})
        assert status == 415 and json.loads(raw)["detail"][0]["type"] == "unsupported_media_type"
        assert all(media_type in json.loads(raw)["error"] for media_type in route.media_types)
    assert svc.request("/classify_everything", data=b"{}")[0] == 404


def test_importing_the_service_reads_patches_and_registers_nothing():
    """Only building the service (``ServingService`` on first access, or
    ``build_service(settings)``) reads settings and installs the framework hooks."""
    program = """
import os, sys
asked = []
class Recording(os._Environ):
    def __getitem__(self, key):
        asked.append(key); return super().__getitem__(key)
    def get(self, key, default=None):
        asked.append(key); return super().get(key, default)
    def __contains__(self, key):
        asked.append(key); return super().__contains__(key)
os.environ = Recording(os.environ._data, os.environ.encodekey, os.environ.decodekey,
                       os.environ.encodevalue, os.environ.decodevalue)
import service.service, service.bento, service.app, service.tasks, service.settings
from uvicorn.config import HTTP_PROTOCOLS
from bentoml._internal.server.http import instruments, traffic
print(json.dumps({
    "serving_settings_read": sorted({k for k in asked if k.startswith("SERVING_")}),
    "uvicorn_protocol": HTTP_PROTOCOLS["auto"],
    "timeout_middleware": traffic.TimeoutMiddleware.__module__,
    "metrics_middleware": instruments.RunnerTrafficMetricsMiddleware.__module__,
}))
"""
    done = subprocess.run([sys.executable, "-c", "import json\n" + program], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True)  # fmt: skip
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state == {
        "serving_settings_read": [],
        "uvicorn_protocol": "uvicorn.protocols.http.auto:AutoHTTPProtocol",
        "timeout_middleware": "bentoml._internal.server.http.traffic",
        "metrics_middleware": "bentoml._internal.server.http.instruments",
    }, done.stderr
