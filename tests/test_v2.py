"""The Open Inference Protocol (KServe v2) over REST and gRPC, with a client nobody
here wrote.

Triton's ``tritonclient.http`` and ``tritonclient.grpc`` talk to a real ``bentoml
serve`` (gRPC on ``SERVING_GRPC_PORT``): health, server and model metadata, and
inference on all three models with binary and with JSON tensors (gRPC: raw and
typed contents). Its answers equal the service's own endpoints' on 1,000 MNIST test digits
and 500 SST-2 test sentences, and the generator's images equal ``/generate``'s
byte for byte. Every REST answer validates against the specification's messages
(``service.v2_routes.SCHEMAS``), and every malformed request gets a 400 (or 404)
with ``{"error": "..."}`` while the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from service.v2_routes import SCHEMAS
from tests.conftest import free_port
from tests.service_payloads import encode
from tests.tool_envs import tool_python

CHUNK = 100  # items per request, within the default limit of 128
GRPC_PORT = free_port()
SERVER_ENV = {"SERVING_DEVICE": "cpu", "SERVING_THREADS": "1", "SERVING_GRPC_PORT": str(GRPC_PORT)}


@pytest.fixture(scope="module")
def server(model_store, serve):
    return serve("service.service:ServingService", SERVER_ENV)


@pytest.fixture(scope="module")
def triton_grpc(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def mnist_1000(data_dir) -> tuple[np.ndarray, np.ndarray]:
    from torchvision import datasets

    test_set = datasets.MNIST(str(data_dir), train=False, download=False)
    return test_set.data[:1000].numpy(), test_set.targets[:1000].numpy()


def validate(message: object, schema: str) -> None:
    jsonschema.validate(message, SCHEMAS[schema])


def get_json(server, path: str, schema: str, status: int = 200) -> dict:
    answered, _, body = server.request(path)
    assert answered == status, (path, body)
    message = json.loads(body)
    validate(message, schema)
    return message


def test_health_and_metadata_validate_against_the_specification(server, triton, model_store):
    assert triton.is_server_live() and triton.is_server_ready()
    metadata = triton.get_server_metadata()
    assert "binary_tensor_data" in metadata["extensions"]
    validate(get_json(server, "/v2", "V2ServerMetadata"), "V2ServerMetadata")
    assert get_json(server, "/v2/health/live", "V2ServerLive")["live"] is True
    assert get_json(server, "/v2/health/ready", "V2ServerReady")["ready"] is True
    for tag in model_store.values():
        name, version = tag.split(":")
        assert triton.is_model_ready(name) and triton.is_model_ready(name, version)
        model = triton.get_model_metadata(name)
        assert model == triton.get_model_metadata(name, version)
        assert model["versions"] == [version] and model["platform"] == "onnxruntime_onnx"
        validate(get_json(server, f"/v2/models/{name}", "V2ModelMetadata"), "V2ModelMetadata")
        ready = get_json(server, f"/v2/models/{name}/versions/{version}/ready", "V2ModelReady")
        assert ready == {"name": name, "ready": True}
    classifier = triton.get_model_metadata("mnist-cnn")
    images = {"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
    assert classifier["inputs"][0] == images
    assert [o["name"] for o in classifier["outputs"]] == ["probabilities", "digit"]
    get_json(server, "/v2/models/no-such-model", "V2Error", status=404)
    get_json(server, "/v2/models/mnist-cnn/versions/0000/ready", "V2Error", status=404)


def _infer(triton, model: str, name: str, datatype: str, data: np.ndarray, binary: bool,
           outputs: tuple[str, ...], **options):  # fmt: skip
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    requested = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    return triton.infer(model, [tensor], outputs=requested, **options)


def _native_classify(server, pngs: list[bytes]) -> list[dict]:
    answers = []
    for start in range(0, len(pngs), CHUNK):
        status, chunk = server.post_files("/classify_batch", "images", pngs[start : start + CHUNK])
        assert status == 200, chunk
        answers += chunk
    return answers


def test_the_classifier_answers_as_the_native_route_on_1000_mnist_digits(
    server, triton, mnist_1000
):
    images, labels = mnist_1000
    pngs = [encode(pixels, "PNG") for pixels in images]
    native = _native_classify(server, pngs)
    native_probabilities = np.array([answer["probabilities"] for answer in native])
    for form, binary in (("image_files", True), ("pixels", False), ("image_files", False)):
        probabilities, digits = [], []
        for start in range(0, len(images), CHUNK):
            if form == "pixels":
                data, datatype = images[start : start + CHUNK], "UINT8"
            else:
                data, datatype = np.array(pngs[start : start + CHUNK], dtype=object), "BYTES"
            if form == "image_files" and not binary:
                # JSON carries strings: base64-encoded file bytes would not be the image.
                continue
            result = _infer(triton, "mnist-cnn", form, datatype, data, binary,
                            ("probabilities", "digit"))  # fmt: skip
            probabilities.append(result.as_numpy("probabilities"))
            digits.append(result.as_numpy("digit"))
        if not probabilities:
            continue
        np.testing.assert_allclose(np.concatenate(probabilities), native_probabilities, atol=1e-5)
        assert np.concatenate(digits).tolist() == [answer["digit"] for answer in native]
    assert np.mean([answer["digit"] for answer in native] == labels) > 0.98


def test_preprocessed_tensors_reach_the_model_as_they_are(server, triton, mnist_1000):
    from models.preprocessing import digit_tensor_from_image

    images, labels = mnist_1000
    rows = np.stack([digit_tensor_from_image(Image.fromarray(p)).numpy() for p in images[:64]])
    binary = _infer(triton, "mnist-cnn", "images", "FP32", rows, True, ("probabilities", "digit"))
    as_json = _infer(triton, "mnist-cnn", "images", "FP32", rows, False, ("digit",),
                     request_id="digits-64")  # fmt: skip
    assert binary.as_numpy("probabilities").shape == (64, 10)
    assert as_json.get_response()["id"] == "digits-64"
    assert as_json.as_numpy("probabilities") is None  # only the requested output
    assert as_json.as_numpy("digit").tolist() == binary.as_numpy("digit").tolist()
    assert np.mean(binary.as_numpy("digit") == labels[:64]) > 0.95


def test_sentiment_answers_as_the_native_route_on_500_sst2_sentences(server, triton, data_dir):
    from training.data import read_sst2

    texts = [row.text for row in read_sst2(data_dir, "test")[:500]]
    native = []
    for start in range(0, len(texts), CHUNK):
        chunk_texts = texts[start : start + CHUNK]
        status, chunk = server.post_json("/sentiment_batch", {"texts": chunk_texts})
        assert status == 200
        native += chunk
    for binary in (True, False):
        scores, labels = [], []
        for start in range(0, len(texts), CHUNK):
            data = np.array([t.encode() for t in texts[start : start + CHUNK]], dtype=object)
            result = _infer(triton, "sst2-bilstm", "texts", "BYTES", data, binary,
                            ("score", "label"))  # fmt: skip
            scores.append(result.as_numpy("score"))
            # tritonclient gives bytes from binary data, str from JSON
            labels += [
                label.decode() if isinstance(label, bytes) else label
                for label in result.as_numpy("label")
            ]
        np.testing.assert_allclose(np.concatenate(scores), [a["score"] for a in native], atol=1e-5)
        assert labels == [answer["label"] for answer in native]


def test_generated_images_are_byte_identical_to_generate(server, triton):
    status, native = server.post_json("/generate", {"n": 6, "seed": 2024})
    assert status == 200
    digits = np.array([image["digit"] for image in native["images"]], dtype=np.int64)
    expected = np.stack(
        [np.asarray(Image.open(io.BytesIO(base64.b64decode(i["png"])))) for i in native["images"]]
    )
    for binary in (True, False):
        result = _infer(triton, "digit-gan", "digits", "INT64", digits, binary, ("images",),
                        parameters={"seed": 2024})  # fmt: skip
        assert result.as_numpy("images").dtype == np.uint8
        assert np.array_equal(result.as_numpy("images"), expected)
        assert result.get_response()["parameters"]["seed"] == 2024


def test_json_answers_validate_against_the_specification(server):
    request = {
        "id": "r1",
        "parameters": {"unknown_parameter": 1},  # tolerated
        "inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["Fine."]}],
    }
    status, answer = server.post_json("/v2/models/sst2-bilstm/infer", request)
    assert status == 200
    validate(answer, "V2InferenceResponse")
    validate(request, "V2InferenceRequest")
    assert answer["id"] == "r1" and answer["model_name"] == "sst2-bilstm"
    assert {output["name"] for output in answer["outputs"]} == {"score", "label"}


def _binary_request(header: dict, payload: bytes, header_length: int | None = None):
    head = json.dumps(header).encode()
    length = len(head) if header_length is None else header_length
    headers = {"Inference-Header-Content-Length": str(length)}
    return head + payload, {**headers, "Content-Type": "application/octet-stream"}


FP32_ONE = np.zeros((1, 1, 28, 28), np.float32).tobytes()


def _images_header(size: int, shape=(1, 1, 28, 28), datatype="FP32") -> dict:
    tensor = {"name": "images", "shape": list(shape), "datatype": datatype,
              "parameters": {"binary_data_size": size}}  # fmt: skip
    return {"inputs": [tensor]}


MALFORMED = {
    # name: (path, body, headers, status, words the error must contain)
    "wrong datatype": (
        "/v2/models/mnist-cnn/infer",
        *_binary_request(_images_header(6272, datatype="FP64"), FP32_ONE + FP32_ONE),
        400,
        "must be FP32",
    ),
    "shape does not match the data": (
        "/v2/models/mnist-cnn/infer",
        *_binary_request(_images_header(3136, shape=(2, 1, 28, 28)), FP32_ONE),
        400, "do not make the shape"),
    "binary_data_size beyond the body": (
        "/v2/models/mnist-cnn/infer", *_binary_request(_images_header(9999), FP32_ONE),
        400, "beyond the end of the body"),
    "header length beyond the body": (
        "/v2/models/mnist-cnn/infer",
        *_binary_request(_images_header(3136), FP32_ONE, header_length=10**6),
        400, "inference-header-content-length"),
    "BYTES elements that overrun": (
        "/v2/models/sst2-bilstm/infer",
        *_binary_request({"inputs": [{"name": "texts", "shape": [1], "datatype": "BYTES",
                                      "parameters": {"binary_data_size": 8}}]},
                         struct.pack("<I", 1000) + b"abcd"),
        400, "says 1000 bytes"),
    "JSON data that does not fill the shape": (
        "/v2/models/digit-gan/infer",
        json.dumps({"inputs": [{"name": "digits", "shape": [3], "datatype": "INT64",
                                "data": [1, 2]}]}).encode(),
        {"Content-Type": "application/json"}, 400, "2 values"),
    "an input the model does not have": (
        "/v2/models/digit-gan/infer",
        json.dumps({"inputs": [{"name": "noise", "shape": [1], "datatype": "INT64",
                                "data": [1]}]}).encode(),
        {"Content-Type": "application/json"}, 400, "takes one input"),
    "too many items": (
        "/v2/models/sst2-bilstm/infer",
        json.dumps({"inputs": [{"name": "texts", "shape": [129], "datatype": "BYTES",
                                "data": ["x"] * 129}]}).encode(),
        {"Content-Type": "application/json"}, 400, "more than the 128"),
    "a digit out of range": (
        "/v2/models/digit-gan/infer",
        json.dumps({"inputs": [{"name": "digits", "shape": [1], "datatype": "INT64",
                                "data": [12]}]}).encode(),
        {"Content-Type": "application/json"}, 400, "0–9"),
    "not JSON": ("/v2/models/mnist-cnn/infer", b"{", {"Content-Type": "application/json"},
                 400, "not valid JSON"),
    "an unknown model": ("/v2/models/resnet/infer", b"{}", {}, 404, "no such model"),
    "an unknown version": ("/v2/models/mnist-cnn/versions/7/infer", b"{}", {}, 404,
                           "no such model"),
}  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_requests_get_a_clear_error(server, case):
    path, body, headers, expected, words = MALFORMED[case]
    status, _, raw = server.request(path, data=body, headers=headers)
    assert status == expected, raw
    error = json.loads(raw)
    validate(error, "V2Error")
    assert set(error) == {"error", "request_id"} and words in error["error"], error


def test_the_server_keeps_serving_after_malformed_tensors(server, triton):
    assert triton.is_server_ready()
    assert "Exception on /" not in server.log()
    result = _infer(triton, "sst2-bilstm", "texts", "BYTES",
                    np.array([b"A fine film."], dtype=object), True, ("label",))  # fmt: skip
    assert result.as_numpy("label").tolist() == [b"positive"]


# --- gRPC ------------------------------------------------------------------------------


def _infer_grpc(client, model: str, name: str, datatype: str, data: np.ndarray,
                outputs: tuple[str, ...], **options):  # fmt: skip
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    requested = [grpcclient.InferRequestedOutput(output) for output in outputs]
    return client.infer(model, [tensor], outputs=requested, **options)


def test_grpc_health_metadata_and_inference_for_every_model(
    server, triton, triton_grpc, model_store, mnist_1000, sst2_test_sentences
):
    assert triton_grpc.is_server_live() and triton_grpc.is_server_ready()
    assert "binary_tensor_data" in triton_grpc.get_server_metadata(as_json=True)["extensions"]
    for tag in model_store.values():
        name, version = tag.split(":")
        assert triton_grpc.is_model_ready(name) and triton_grpc.is_model_ready(name, version)
        metadata = triton_grpc.get_model_metadata(name, as_json=True)
        for tensor in metadata["inputs"]:  # protobuf's JSON writes int64 as strings
            tensor["shape"] = [int(dimension) for dimension in tensor["shape"]]
        assert metadata["inputs"] == triton.get_model_metadata(name)["inputs"]
    images, _ = mnist_1000
    pngs = np.array([encode(p, "PNG") for p in images[:CHUNK]], dtype=object)
    over_grpc = _infer_grpc(triton_grpc, "mnist-cnn", "image_files", "BYTES", pngs,
                            ("probabilities", "digit"), request_id="grpc-1")  # fmt: skip
    over_http = _infer(triton, "mnist-cnn", "image_files", "BYTES", pngs, True,
                       ("probabilities", "digit"))  # fmt: skip
    np.testing.assert_allclose(
        over_grpc.as_numpy("probabilities"), over_http.as_numpy("probabilities"), atol=1e-5
    )
    assert over_grpc.as_numpy("digit").tolist() == over_http.as_numpy("digit").tolist()
    assert over_grpc.get_response(as_json=True)["id"] == "grpc-1"
    texts = np.array([text.encode() for text, _ in sst2_test_sentences[:50]], dtype=object)
    scores = _infer_grpc(triton_grpc, "sst2-bilstm", "texts", "BYTES", texts, ("score",))
    expected = _infer(triton, "sst2-bilstm", "texts", "BYTES", texts, True, ("score",))
    np.testing.assert_allclose(scores.as_numpy("score"), expected.as_numpy("score"), atol=1e-6)
    assert scores.as_numpy("label") is None  # only the requested output
    digits = np.array([3, 1, 4, 1, 5], dtype=np.int64)
    generated = _infer_grpc(triton_grpc, "digit-gan", "digits", "INT64", digits, ("images",),
                            parameters={"seed": 9})  # fmt: skip
    again = _infer(triton, "digit-gan", "digits", "INT64", digits, True, ("images",),
                   parameters={"seed": 9})  # fmt: skip
    assert np.array_equal(generated.as_numpy("images"), again.as_numpy("images"))


def test_grpc_typed_contents_are_read_like_raw_ones(server, triton_grpc):
    """``contents`` instead of ``raw_input_contents``: the specification allows both."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name="digit-gan", parameters={
        "seed": pb.InferParameter(int64_param=9)})  # fmt: skip
    tensor = request.inputs.add(name="digits", datatype="INT64", shape=[2])
    tensor.contents.int64_contents.extend([7, 7])
    response = triton_grpc._client_stub.ModelInfer(request)
    [images] = response.raw_output_contents
    expected = _infer_grpc(triton_grpc, "digit-gan", "digits", "INT64",
                           np.array([7, 7], dtype=np.int64), ("images",),
                           parameters={"seed": 9})  # fmt: skip
    assert images == expected.as_numpy("images").tobytes()


GRPC_MALFORMED = {
    # name: (model, input name, datatype, data, expected status, words in the message)
    "wrong datatype": ("mnist-cnn", "images", "FP64", np.zeros((1, 1, 28, 28)),
                       "INVALID_ARGUMENT", "must be FP32"),
    "wrong shape": ("mnist-cnn", "images", "FP32", np.zeros((1, 28, 28), np.float32),
                    "INVALID_ARGUMENT", "has shape"),
    "too many items": ("sst2-bilstm", "texts", "BYTES", np.array([b"x"] * 129, dtype=object),
                       "INVALID_ARGUMENT", "more than the 128"),
    "not an image": ("mnist-cnn", "image_files", "BYTES", np.array([b"hello"], dtype=object),
                     "INVALID_ARGUMENT", "not a PNG"),
    "an unknown model": ("resnet", "images", "FP32", np.zeros((1, 1, 28, 28), np.float32),
                         "NOT_FOUND", "no such model"),
}  # fmt: skip


@pytest.mark.parametrize("case", GRPC_MALFORMED)
def test_malformed_grpc_requests_get_the_matching_status(server, triton_grpc, case):
    from tritonclient.utils import InferenceServerException

    model, name, datatype, data, status, words = GRPC_MALFORMED[case]
    with pytest.raises(InferenceServerException) as raised:
        _infer_grpc(triton_grpc, model, name, datatype, data, ())
    assert raised.value.status() == f"StatusCode.{status}", raised.value
    assert words in raised.value.message(), raised.value
    assert triton_grpc.is_server_ready()


def test_requests_are_counted_by_protocol(server, triton, triton_grpc):
    from prometheus_client.parser import text_string_to_metric_families

    _infer(triton, "sst2-bilstm", "texts", "BYTES", np.array([b"Good."], dtype=object), True, ())
    _infer_grpc(triton_grpc, "sst2-bilstm", "texts", "BYTES", np.array([b"Bad."], dtype=object), ())
    server.post_json("/sentiment", {"text": "Fine."})
    counts = {}
    for family in text_string_to_metric_families(server.request("/metrics")[2].decode()):
        if family.name == "serving_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    labels = sample.labels
                    key = (labels["protocol"], labels["endpoint"], labels["code"])
                    counts[key] = counts.get(key, 0) + sample.value
    assert counts[("v2", "sentiment", "200")] >= 1
    assert counts[("v2-grpc", "sentiment", "OK")] >= 1
    assert counts[("native", "sentiment", "200")] >= 1
    assert counts[("v2-grpc", "classify", "INVALID_ARGUMENT")] >= 1  # the malformed cases
    assert counts[("v2", "server", "200")] >= 1  # /v2, health


# --- KServe's SDK --------------------------------------------------------------------------


def test_kserve_rest_and_grpc_clients_get_the_same_answers(server, triton):
    """KServe's ``InferenceRESTClient`` (protocol v2) and ``InferenceGRPCClient``, in their
    own environment, one request per model (tests/clients/kserve_calls.py)."""
    python = tool_python("KSERVE_VENV", ".venv-kserve", "kserve-venv")
    script = Path(__file__).with_name("clients") / "kserve_calls.py"
    done = subprocess.run([str(python), str(script), server.url, f"127.0.0.1:{GRPC_PORT}"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout)
    for protocol in ("rest", "grpc"):
        classified = answers[protocol]["mnist-cnn"]
        assert classified["model_name"] == "mnist-cnn" and classified["id"] == "k1"
        assert classified["outputs"]["digit"] == [1]
        assert answers[protocol]["sst2-bilstm"]["outputs"]["label"] == ["positive", "negative"]
        expected = _infer(triton, "digit-gan", "digits", "INT64",
                          np.array([4, 2], dtype=np.int64), True, ("images",),
                          parameters={"seed": 11}).as_numpy("images")  # fmt: skip
        generated = np.array(answers[protocol]["digit-gan"]["outputs"]["images"], dtype=np.uint8)
        assert np.array_equal(generated.reshape(expected.shape), expected)
    assert answers["rest"]["sst2-bilstm"] == answers["grpc"]["sst2-bilstm"] | {"id": "k2"}


def test_grpc_stops_with_the_http_server(server, triton_grpc):
    """SIGTERM: the HTTP server drains, then each worker's gRPC server stops (the last test
    of this module: it stops the module's server)."""
    import socket

    assert triton_grpc.is_server_live()
    server.stop()
    log = server.log_path.read_text()
    assert server.process.returncode == 0, log[-3000:]
    assert "Completed async cleanup hook: stop_grpc" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", GRPC_PORT), timeout=2):
        pass
