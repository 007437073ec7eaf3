"""API keys (``service.api_keys``): the key file, the verdicts, and the service with keys
on: in process (every protocol's routes, probes open), and a real ``bentoml serve``
with 2 workers whose key file is edited while it runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api_keys import (
    RELOAD_S,
    ApiKeys,
    KeyFileError,
    digest,
    new_key_line,
    parse_keys,
)
from tests.conftest import REPO_ROOT, free_port
from tests.service_payloads import encode

CLIENT_KEY, OPS_KEY, METRICS_KEY = "client-secret-1", "ops-secret-2", "metrics-secret-3"


def key_file(path: Path, *lines: str) -> Path:
    path.write_text("# name scopes key\n" + "\n".join(lines) + "\n")
    return path


def hashed(key: str) -> str:
    return "sha256:" + digest(key).hex()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- the key file and the verdicts ------------------------------------------------------


def test_the_key_file_holds_names_scopes_and_hashes():
    keys = parse_keys(f"ci infer {hashed(CLIENT_KEY)}  # the CI\nops infer,admin,metrics {OPS_KEY}")
    assert [(k.name, sorted(k.scopes)) for k in keys] == [
        ("ci", ["infer"]),
        ("ops", ["admin", "infer", "metrics"]),
    ]
    assert keys[0].digest == digest(CLIENT_KEY) and keys[1].digest == digest(OPS_KEY)
    for bad, words in (
        ("ci infer", "expected 'name scopes key'"),
        ("ci everything x", "unknown scope everything"),
        ("ci infer sha256:abcd", "64 hex digits"),
        ("ci infer a\nci admin b", "used twice"),
    ):
        with pytest.raises(KeyFileError, match=words):
            parse_keys(bad)


def test_verdicts_and_a_file_that_changes(tmp_path):
    now = [0.0]
    path = key_file(tmp_path / "keys", f"ci infer {hashed(CLIENT_KEY)}")
    keys = ApiKeys(path, clock=lambda: now[0])
    assert keys.verdict(None, "infer").status == 401
    assert keys.verdict(b"Basic abc", "infer").status == 401
    assert keys.verdict(b"Bearer nope", "infer").status == 401
    assert keys.verdict(f"Bearer {CLIENT_KEY}".encode(), "admin").status == 403
    admitted = keys.verdict(f"bearer  {CLIENT_KEY} ".encode(), "infer")
    assert admitted.status is None and admitted.key_name == "ci"
    assert CLIENT_KEY not in repr(admitted) and hashed(CLIENT_KEY) not in repr(admitted)
    key_file(path, f"ops infer,metrics {hashed(OPS_KEY)}")
    now[0] += RELOAD_S / 2  # not looked at yet
    assert keys.verdict(f"Bearer {CLIENT_KEY}".encode(), "infer").status is None
    now[0] += RELOAD_S
    assert keys.verdict(f"Bearer {CLIENT_KEY}".encode(), "infer").status == 401
    assert keys.verdict(f"Bearer {OPS_KEY}".encode(), "metrics").status is None
    path.write_text("a broken line\n")
    now[0] += RELOAD_S
    assert keys.verdict(f"Bearer {OPS_KEY}".encode(), "infer").status is None  # kept
    with pytest.raises(KeyFileError):
        ApiKeys(tmp_path / "missing")


def test_a_new_key_line_admits_its_key_and_holds_only_its_hash(tmp_path):
    key, line = new_key_line("robot", ["infer"])
    assert key not in line
    keys = ApiKeys(key_file(tmp_path / "keys", line))
    assert keys.verdict(f"Bearer {key}".encode(), "infer").key_name == "robot"
    done = subprocess.run([sys.executable, "-m", "service.api_keys", "new", "bot", "infer"],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=True)  # fmt: skip
    printed_key = done.stdout.split("it is not stored anywhere): ")[1].split()[0]
    printed_line = done.stdout.strip().splitlines()[-1].split(": ", 1)[1]
    [entry] = parse_keys(printed_line)
    assert entry.digest == digest(printed_key) and printed_key not in printed_line


# --- the service with keys on, in process --------------------------------------------------


@pytest.fixture(scope="module")
def svc(in_process, tmp_path_factory):
    path = key_file(tmp_path_factory.mktemp("keys") / "api-keys",
                    f"client infer {hashed(CLIENT_KEY)}",
                    f"metrics-reader metrics {hashed(METRICS_KEY)}")  # fmt: skip
    port = free_port()
    service = in_process({"SERVING_API_KEYS_FILE": str(path), "SERVING_GRPC_PORT": str(port)})
    service.grpc_port = port
    return service


def test_every_prediction_route_needs_an_infer_key(svc):
    png = encode(np.zeros((28, 28), np.uint8), "PNG")
    v2_body = json.dumps({"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1],
                                      "data": ["Fine."]}]}).encode()  # fmt: skip
    calls = [
        ("/classify", png, "image/png"),
        ("/sentiment", b'{"text": "Fine."}', "application/json"),
        ("/v2/models/sst2-bilstm/infer", v2_body, "application/json"),
    ]
    for path, body, content_type in calls:
        plain = {"Content-Type": content_type}
        status, headers, raw = svc.request(path, data=body, headers=plain)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer"), path
        assert json.loads(raw)["detail"][0]["type"] == "unauthorized"
        wrong = svc.request(path, data=body, headers=plain | bearer("not-a-key"))
        assert wrong[0] == 401, path
        forbidden = svc.request(path, data=body, headers=plain | bearer(METRICS_KEY))
        assert forbidden[0] == 403 and b"metrics-reader" in forbidden[2], path
        assert svc.request(path, data=body, headers=plain | bearer(CLIENT_KEY))[0] == 200, path
    # GET routes of the protocol need the key too; probes, documents and the page do not.
    assert svc.request("/v2/models/mnist-cnn")[0] == 401
    assert svc.request("/v2/models/mnist-cnn", headers=bearer(CLIENT_KEY))[0] == 200
    for open_path in ("/livez", "/readyz", "/v2/health/ready", "/v2/health/live", "/docs.json",
                      "/ui/"):  # fmt: skip
        assert svc.request(open_path)[0] == 200, open_path
    for raw in (svc.request("/classify", data=png, headers={"Content-Type": "image/png"})[2],):
        assert CLIENT_KEY.encode() not in raw and METRICS_KEY.encode() not in raw


def test_grpc_needs_an_infer_key(svc):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{svc.grpc_port}")
    texts = grpcclient.InferInput("texts", [1], "BYTES")
    texts.set_data_from_numpy(np.array([b"Fine."], dtype=object))
    try:
        assert client.is_server_live()  # a probe
        # gRPC metadata keys are lower case.
        metrics_only = {"authorization": f"Bearer {METRICS_KEY}"}
        for headers, code in ((None, "UNAUTHENTICATED"), (metrics_only, "PERMISSION_DENIED")):
            with pytest.raises(InferenceServerException) as refused:
                client.infer("sst2-bilstm", [texts], headers=headers)
            assert refused.value.status() == f"StatusCode.{code}"
        headers = {"authorization": f"Bearer {CLIENT_KEY}"}
        answer = client.infer("sst2-bilstm", [texts], headers=headers)
        assert answer.as_numpy("label").tolist() == [b"positive"]
    finally:
        client.close()


# --- 2 workers, the key file edited while they serve --------------------------------------


def key_counts(server) -> dict[tuple[str, str], float]:
    status, _, raw = server.request("/metrics", headers=bearer(METRICS_KEY))
    assert status == 200
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            if sample.name == "serving_key_requests_total":
                key = (sample.labels["key"], sample.labels["scope"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def file_times(server) -> dict[str, float]:
    """Worker process → the change time of the key file it has in force."""
    raw = server.request("/metrics", headers=bearer(METRICS_KEY))[2].decode()
    return {
        sample.labels["pid"]: sample.value
        for family in text_string_to_metric_families(raw)
        for sample in family.samples
        if sample.name == "serving_api_keys_file_time_seconds"
    }


def test_two_workers_take_an_edited_key_file_within_the_stated_time(model_store, serve, tmp_path):
    path = key_file(tmp_path / "api-keys", f"client infer {hashed(CLIENT_KEY)}",
                    f"metrics-reader metrics {hashed(METRICS_KEY)}")  # fmt: skip
    server = serve("service.service:ServingService", {
        "SERVING_DEVICE": "cpu", "SERVING_THREADS": "1", "SERVING_WORKERS": "2",
        "SERVING_API_KEYS_FILE": str(path)})  # fmt: skip
    body, json_type = b'{"text": "A fine film."}', {"Content-Type": "application/json"}

    def statuses(key: str, count: int = 24) -> set[int]:
        # A new connection per request: the two workers both answer some of them.
        return {server.request("/sentiment", data=body, headers=json_type | bearer(key))[0]
                for _ in range(count)}  # fmt: skip

    assert statuses(CLIENT_KEY) == {200} and statuses("rotated-key") == {401}
    assert server.request("/metrics")[0] == 401
    assert server.request("/metrics", headers=bearer(CLIENT_KEY))[0] == 403
    assert key_counts(server)[("client", "infer")] >= 24
    assert server.request("/livez")[0] == 200 and server.request("/readyz")[0] == 200
    # Rotate: the old key goes, a new one comes.
    key_file(path, f"client infer {hashed('rotated-key')}",
             f"metrics-reader metrics {hashed(METRICS_KEY)}")  # fmt: skip
    edited = time.monotonic()
    time.sleep(RELOAD_S + 0.2)
    assert statuses(CLIENT_KEY) == {401} and statuses("rotated-key") == {200}
    assert time.monotonic() - edited < RELOAD_S + 30
    # Each worker reports the key file it has in force: both read the edited one.
    stamps = file_times(server)
    assert len(stamps) == 2 and set(stamps.values()) == {path.stat().st_mtime_ns / 1e9}
    assert CLIENT_KEY not in server.log() and hashed(CLIENT_KEY) not in server.log()
