"""Model versions rolled out while the service runs (``service.rollouts``).

The pieces alone (the canary's share, the state's precedence, the version paths),
then a real ``bentoml serve`` with 2 workers and API keys: keys on every route, a
swap under load, a canary, two versions that must be refused, a restart and a
rollback. The second version comes from a smoke training run
(``training.pipeline --quick``), so no second release is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.multipart import file_parts, multipart_body
from bench.rollout import drive, post_json, smoke_version, swap_summary
from models.artifacts import refresh_checksums
from models.registry import get_spec
from service.api_keys import OPEN_PATHS, digest
from service.app import ModelSlot
from service.openapi import ADMIN_ERROR_STATUSES
from service.rollouts import StateStore, wanted
from service.routes import versioned_key
from tests.conftest import REPO_ROOT
from tests.service_payloads import encode

MODEL = "mnist-cnn"
ADMIN_KEY, CLIENT_KEY, METRICS_KEY = "admin-secret-1", "client-secret-2", "metrics-secret-3"
KEY_FILE = f"""# name scopes key
ops admin sha256:{digest(ADMIN_KEY).hex()}
client infer sha256:{digest(CLIENT_KEY).hex()}
scraper metrics sha256:{digest(METRICS_KEY).hex()}
"""


def bearer(key: str, content_type: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    return headers | ({"Content-Type": content_type} if content_type else {})


# --- the pieces ---------------------------------------------------------------------------


class _Version:
    def __init__(self, version: str) -> None:
        self.version = version


def test_a_canary_gets_exactly_its_share_spread_evenly():
    slot = ModelSlot(_Version("old"))
    assert {slot.pick().version for _ in range(10)} == {"old"}
    slot.canary, slot.canary_percent = _Version("new"), 10.0
    picks = [slot.pick().version for _ in range(1000)]
    assert picks.count("new") == 100
    assert all(picks[i : i + 10].count("new") == 1 for i in range(0, 1000, 10))
    slot.canary_percent = 2.5
    assert [slot.pick().version for _ in range(400)].count("new") == 10
    assert slot.find("new") is slot.canary and slot.find("other") is None


def test_the_state_overrides_the_configured_version_it_was_made_over(tmp_path):
    store = StateStore(tmp_path)
    assert store.read() == (0, {}) and wanted(None, "a") == wanted({}, "a")
    entry = {"version": "b", "over": "a", "previous": ["a"], "canary": {"version": "c",
             "percent": 10}}  # fmt: skip
    assert store.update(lambda models: models.update({MODEL: entry})) == 1
    generation, models = store.read()
    assert generation == 1 and wanted(models[MODEL], "a").version == "b"
    assert wanted(models[MODEL], "a").canary == "c" and wanted(models[MODEL], "a").percent == 10
    # A new release configured since: the rollout no longer applies.
    assert wanted(models[MODEL], "z").version == "z" and wanted(models[MODEL], "z").canary is None
    store.report(os.getpid(), {"pid": os.getpid(), "generation": 1})
    store.report(2**22 + 1, {"pid": 2**22 + 1, "generation": 1})  # no such process
    assert [report["pid"] for report in store.reports()] == [os.getpid()]


def test_a_path_naming_a_version_finds_its_route():
    assert versioned_key("/v2/models/mnist-cnn/versions/abc/infer") == (
        "/v2/models/mnist-cnn/versions/{version}/infer", "abc")  # fmt: skip
    assert versioned_key("/v2/models/mnist-cnn/versions/abc") == (
        "/v2/models/mnist-cnn/versions/{version}", "abc")  # fmt: skip
    for other in ("/v2/models/mnist-cnn/infer", "/v2/models/x/versions//infer", "/classify"):
        assert versioned_key(other) == (None, None)


# --- in process: the documents, hostile bodies, and no admin key ---------------------------


@pytest.fixture(scope="module")
def managed(in_process, tmp_path_factory):
    """A service whose key file has an admin key, in process."""
    place = tmp_path_factory.mktemp("managed")
    (place / "api-keys").write_text(KEY_FILE)
    return in_process({"SERVING_API_KEYS_FILE": str(place / "api-keys"),
                       "SERVING_STATE_DIR": str(place / "state")})  # fmt: skip


def test_management_routes_are_documented(managed):
    _, _, raw = managed.request("/docs.json")
    paths = json.loads(raw)["paths"]
    activate = paths[f"/admin/models/{MODEL}/activate"]["post"]
    assert activate["tags"] == ["Model management"]
    assert set(activate["responses"]) == {"200", *map(str, ADMIN_ERROR_STATUSES)}
    assert "canary_percent" in json.dumps(json.loads(raw)["components"]["schemas"]["Activation"])
    versioned = paths["/v2/models/mnist-cnn/versions/{version}/infer"]["post"]
    assert versioned["parameters"][0]["name"] == "version"


def test_without_an_admin_key_there_are_no_management_routes(model_store, tmp_path):
    """Keys without an admin one, or none at all (``make serve``; over HTTP in
    tests/test_service_http.py): the table has no management route."""
    from service.bento import build_service
    from service.settings import Settings

    (tmp_path / "keys").write_text(f"client infer sha256:{digest(CLIENT_KEY).hex()}\n")
    for env in ({"SERVING_API_KEYS_FILE": str(tmp_path / "keys")}, {}):
        table = build_service(Settings.from_env(env)).inner.route_table
        assert "/classify" in table and not any(path.startswith("/admin") for path in table)


HOSTILE_BODIES = [
    b"", b"{", b"[]", b"null", b'"x"', b"{}", b'{"version": 7}', b'{"version": ""}',
    b'{"version": "../../../etc/passwd"}', b'{"version": "/abs/path"}', b'{"version": "A"}',
    b'{"version": "abc."}', b'{"version": "%00"}', b'{"version": "\\u0000"}',
    b'{"version": "' + b"a" * 10_000 + b'"}', b'{"version": "abc", "extra": 1}',
    b'{"version": "abc", "canary_percent": 0}', b'{"version": "abc", "canary_percent": 100}',
    b'{"version": "abc", "canary_percent": NaN}', b'{"version": "abc", "canary_percent": "10"}',
    b'{"version": "abc", "canary_percent": 1e999}', "{\"version\": \"é\"}".encode(),
    b'{"version": ["a"]}', b'{"version": {"$gt": ""}}', b"\xff\xfe",
]  # fmt: skip


def test_hostile_management_calls_get_a_clear_4xx(managed):
    headers = bearer(ADMIN_KEY, "application/json")
    for body in HOSTILE_BODIES:
        for operation in ("activate", "promote", "rollback", "abort", "reset"):
            path = f"/admin/models/{MODEL}/{operation}"
            status, _, raw = managed.request(path, data=body, headers=headers)
            if operation == "reset" and body in (b"", b"{}"):  # a valid call: nothing to reset
                assert status == 200 and json.loads(raw)["source"] == "configuration"
                continue
            assert 400 <= status < 500 and "error" in json.loads(raw), (body, path, status)
    for path in ("/admin/models/no-such-model/activate", "/admin/models/../x/activate",
                 "/admin/models/mnist-cnn/%2e%2e"):  # fmt: skip
        assert managed.request(path, data=b"{}", headers=headers)[0] in (401, 404), path
    status, _, raw = managed.request("/admin/models", headers=bearer(ADMIN_KEY))
    assert status == 200 and json.loads(raw)["models"][0]["serving"]
    png = encode(np.zeros((28, 28), np.uint8), "PNG")
    assert managed.request("/classify", data=png, headers=bearer(CLIENT_KEY, "image/png"))[0] == 200


# --- 2 workers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def versions(model_store, data_dir, tmp_path_factory) -> dict[str, str]:
    """The released version, a smoke one, and two that must be refused: one whose graph
    was damaged in the store after it was registered, and one whose graph is not its
    weights' (the smoke artifact with the release's graph, its checksums made anew)."""
    import bentoml

    from training.register import register_artifact

    place = tmp_path_factory.mktemp("rollout-versions")
    smoke = smoke_version(os.environ["BENTOML_HOME"], data_dir, place / "smoke")
    spec, smoke_dir = get_spec(MODEL), place / "smoke" / MODEL
    wrong = place / "wrong" / MODEL
    shutil.copytree(smoke_dir, wrong)
    shutil.copy2(spec.artifact_dir() / "model.onnx", wrong / "model.onnx")
    refresh_checksums(wrong)
    corrupt = place / "corrupt" / MODEL
    shutil.copytree(smoke_dir, corrupt)
    with (corrupt / "report.png").open("ab") as report:
        report.write(b"\0")  # another content, so another version
    refresh_checksums(corrupt)
    corrupt_tag = register_artifact(spec, corrupt)
    graph = Path(bentoml.models.get(corrupt_tag).path) / "model.onnx"
    damaged = bytearray(graph.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    graph.write_bytes(damaged)
    return {
        "released": model_store[MODEL].partition(":")[2],
        "smoke": smoke,
        "smoke_dir": str(place / "smoke"),
        "wrong_output": register_artifact(spec, wrong).version,
        "corrupt": corrupt_tag.version,
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> dict[str, str]:
    """The settings of the 2-worker service: keys on, its own state directory."""
    place = tmp_path_factory.mktemp("rollout-service")
    (place / "api-keys").write_text(KEY_FILE)
    return {
        "SERVING_DEVICE": "cpu",
        "SERVING_THREADS": "1",
        "SERVING_WORKERS": "2",
        "SERVING_API_KEYS_FILE": str(place / "api-keys"),
        "SERVING_STATE_DIR": str(place / "state"),
    }


@pytest.fixture(scope="module")
def server(serve, versions, deployment):
    return serve("service.service:ServingService", deployment)


@pytest.fixture(scope="module")
def digit(mnist_test_digits) -> bytes:
    images, _ = mnist_test_digits
    return encode(images[0], "PNG")


# What each version answered for ``digit`` when it served alone: version → JSON answer.
ALONE: dict[str, dict] = {}


def classify(server, png: bytes) -> tuple[int, str | None, dict]:
    status, headers, raw = server.request("/classify", data=png,
                                          headers=bearer(CLIENT_KEY, "image/png"))  # fmt: skip
    version = {name.lower(): value for name, value in headers.items()}.get("x-model-version")
    answer = json.loads(raw)
    if status == 200:  # the version in the header and in the JSON
        assert answer["model_version"] == version
    return status, version, answer


def admin(server, path: str, body: dict | None = None) -> tuple[int, dict]:
    if body is None and not path.endswith("/models"):
        body = {}
    data = None if body is None else json.dumps(body).encode()
    status, _, raw = server.request(path, data=data,
                                    headers=bearer(ADMIN_KEY, "application/json"))  # fmt: skip
    return status, json.loads(raw)


def status_of(server) -> dict:
    status, answer = admin(server, "/admin/models")
    assert status == 200
    return next(model for model in answer["models"] if model["name"] == MODEL)


def test_keys_guard_every_route_in_both_workers(server, versions, model_store):
    status, _, raw = server.request("/docs.json")
    assert status == 200
    paths = json.loads(raw)["paths"]
    assert "/admin/models" in paths and f"/admin/models/{MODEL}/activate" in paths
    components = json.loads(raw)["components"]["schemas"]
    right = {"admin": ADMIN_KEY, "infer": CLIENT_KEY, "metrics": METRICS_KEY}
    wrong = {"admin": CLIENT_KEY, "infer": METRICS_KEY, "metrics": ADMIN_KEY}
    answered = set()
    for path, item in paths.items():
        model = path.split("/")[3] if path.startswith("/v2/models/") else ""
        concrete = path.replace("{version}", model_store.get(model, ":").partition(":")[2])
        for method in {"get", "post"} & set(item):
            data = b"{}" if method == "post" else None

            def call(headers: dict[str, str], path: str = concrete, data=data) -> int:
                return server.request(path, data=data, headers=headers)[0]

            if path in OPEN_PATHS:
                assert call({}) == 200, path
                continue
            scope = ("admin" if path.startswith("/admin") else
                     "metrics" if path == "/metrics" else "infer")  # fmt: skip
            assert call({}) == 401 and call(bearer("not-a-key")) == 401, path
            assert call(bearer(wrong[scope])) == 403, path
            if method == "get":
                assert call(bearer(right[scope])) == 200, path
                answered.add(path)
            elif scope == "infer":  # a prediction: its documented body, answered
                body, content_type = valid_body(path, item["post"], components)
                status, _, answer = server.request(
                    concrete, data=body, headers=bearer(right[scope], content_type)
                )
                assert status == 200, (path, answer[:200])
                answered.add(path)
            else:  # management: past the guard; tests below drive each call to a 200
                status = call(bearer(right[scope], "application/json"))
                assert status not in (401, 403) and status < 500, path
    prefixes = ("/v2/models/", "/classify", "/sentiment", "/generate")
    assert {path for path in paths if path.startswith(prefixes)} <= answered


V2_INPUTS = {
    "mnist-cnn": {"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784},
    "sst2-bilstm": {"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["Fine."]},
    "digit-gan": {"name": "digits", "datatype": "INT64", "shape": [1], "data": [3]},
}


def valid_body(path: str, operation: dict, components: dict) -> tuple[bytes, str]:
    """A request the route answers with a 200: a v2 tensor, the documented JSON example,
    or digit images in every file field."""
    if path.startswith("/v2/models/"):
        inputs = [V2_INPUTS[path.split("/")[3]]]
        return json.dumps({"inputs": inputs}).encode(), "application/json"
    content = operation["requestBody"]["content"]
    if "application/json" in content:
        schema = content["application/json"]["schema"]
        schema = components[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema
        example = {name: field["examples"][0] for name, field in schema["properties"].items()
                   if "examples" in field}  # fmt: skip
        return json.dumps(example).encode(), "application/json"
    png = encode(np.zeros((28, 28), np.uint8), "PNG")
    fields = content["multipart/form-data"]["schema"]["properties"]
    parts = [part for name in fields for part in file_parts(name, [png])]
    return multipart_body(parts)


def test_a_swap_under_load_drops_nothing(server, versions, digit, mnist_test_digits):
    status, version, answer = classify(server, digit)
    assert status == 200 and version == versions["released"]
    ALONE[version] = answer
    images, _ = mnist_test_digits
    bodies = [encode(image, "PNG") for image in images[:256]]
    activation = f"{server.url}/admin/models/{MODEL}/activate"

    async def activate() -> tuple[int, object]:
        return await post_json(activation, {"version": versions["smoke"]},
                               bearer(ADMIN_KEY))  # fmt: skip

    load = drive(f"{server.url}/classify", bodies, bearer(CLIENT_KEY, "image/png"), 64, 20.0,
                 [(10.0, activate)])  # fmt: skip
    answers, [(began, done, (status, answer))] = asyncio.run(load)
    assert status == 200, answer
    summary = swap_summary(answers, began, done, versions["released"], versions["smoke"])
    print("swap under 64 clients:", json.dumps(summary))
    assert summary["errors"] == 0 and summary["without_version"] == 0, summary
    assert summary["old_version_after_swap"] == 0 and summary["new_version_after_swap"] > 0
    assert summary["answers_before"] > 0
    # The answer says that every worker serves the new version, and who changed it.
    assert answer["serving"] == versions["smoke"] and answer["previous"] == [versions["released"]]
    assert [w["serving"] for w in answer["workers"]] == [versions["smoke"]] * 2
    assert answer["changed_by"] == "ops" and answer["source"] == "rollout"
    status, version, alone = classify(server, digit)
    assert status == 200 and version == versions["smoke"]
    ALONE[version] = alone


def test_a_canary_gets_its_share_and_each_version_answers_as_it_does_alone(server, versions,
                                                                            digit):  # fmt: skip
    assert set(ALONE) == {versions["released"], versions["smoke"]}
    # The export pipeline's last step, as a canary: the released version back at 10 %.
    command = [sys.executable, "-m", "training.register", "--model", MODEL, "--no-pin",
               "--activate", server.url, "--canary", "10"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SERVING_API_KEY": ADMIN_KEY})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"canary {versions['released']} at 10 %" in done.stdout
    load = drive(f"{server.url}/classify", [digit], bearer(CLIENT_KEY, "image/png"), 16, 300.0,
                 max_requests=5000, keep_bodies=True)  # fmt: skip
    answers, _ = asyncio.run(load)
    assert len(answers) == 5000 and {a.status for a in answers} == {200}
    share = sum(a.version == versions["released"] for a in answers) / len(answers)
    print(f"canary share: {share:.4f} of {len(answers)}")
    assert 0.08 <= share <= 0.12
    for answer in answers:
        got, alone = json.loads(answer.body), ALONE[answer.version]
        assert got["digit"] == alone["digit"] and got["model_version"] == answer.version
        assert np.allclose(got["probabilities"], alone["probabilities"], atol=1e-5)
    status, model = admin(server, f"/admin/models/{MODEL}/abort")
    assert status == 200 and model["canary"] is None and model["serving"] == versions["smoke"]
    assert {classify(server, digit)[1] for _ in range(20)} == {versions["smoke"]}


def test_bad_versions_are_refused_while_the_serving_one_serves(server, versions, digit):
    refusals = {}
    activation = f"{server.url}/admin/models/{MODEL}/activate"

    def attempt(kind: str):
        async def call() -> tuple[int, object]:
            refusals[kind] = await post_json(activation, {"version": versions[kind]},
                                             bearer(ADMIN_KEY))  # fmt: skip
            return refusals[kind]

        return call

    load = drive(f"{server.url}/classify", [digit], bearer(CLIENT_KEY, "image/png"), 8, 8.0,
                 [(1.0, attempt("corrupt")), (3.0, attempt("wrong_output"))])  # fmt: skip
    answers, _ = asyncio.run(load)
    assert {a.status for a in answers} == {200} and {a.version for a in answers} == {
        versions["smoke"]
    }
    for kind, check in (("corrupt", "checksums"), ("wrong_output", "example_output")):
        status, error = refusals[kind]
        assert status == 422 and error["detail"][0]["type"] == check, error
        assert check in error["error"] and versions[kind] in error["error"]
    status, error = admin(server, f"/admin/models/{MODEL}/activate", {"version": "0" * 16})
    assert status == 404 and error["detail"][0]["type"] == "store"
    status, error = admin(server, f"/admin/models/{MODEL}/activate", {"version": "../../x"})
    assert status == 400
    assert admin(server, f"/admin/models/{MODEL}/promote")[0] == 409  # no canary
    model = status_of(server)
    assert model["serving"] == versions["smoke"] and {w["error"] for w in model["workers"]} == {
        None
    }


def test_a_restart_keeps_the_version_and_a_rollback_returns_the_one_before(
    server, serve, versions, deployment, digit
):
    server.stop()
    again = serve("service.service:ServingService", deployment)
    model = status_of(again)
    assert model["serving"] == versions["smoke"] and model["source"] == "rollout"
    assert {classify(again, digit)[1] for _ in range(20)} == {versions["smoke"]}
    status, model = admin(again, f"/admin/models/{MODEL}/rollback")
    assert status == 200 and model["serving"] == versions["released"] and model["previous"] == []
    assert {classify(again, digit)[1] for _ in range(20)} == {versions["released"]}
    assert admin(again, f"/admin/models/{MODEL}/rollback")[0] == 409  # nothing before
    # A canary promoted, then the configured version back.
    body = {"version": versions["smoke"], "canary_percent": 50}
    assert admin(again, f"/admin/models/{MODEL}/activate", body)[0] == 200
    assert {classify(again, digit)[1] for _ in range(20)} == {versions["released"],
                                                              versions["smoke"]}  # fmt: skip
    status, model = admin(again, f"/admin/models/{MODEL}/promote")
    assert status == 200 and model["serving"] == versions["smoke"] and model["canary"] is None
    status, model = admin(again, f"/admin/models/{MODEL}/reset")
    assert status == 200 and model["serving"] == versions["released"]
    assert model["source"] == "configuration"
    assert {classify(again, digit)[1] for _ in range(20)} == {versions["released"]}
    assert ADMIN_KEY not in again.log() and digest(ADMIN_KEY).hex() not in again.log()
