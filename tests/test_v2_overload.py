"""Load shedding is the same behind every door: with a model's queue full, the native
route and the Open Inference Protocol's REST route answer 503 before reading the body,
and gRPC answers UNAVAILABLE; the service answers again as soon as there is room.

The service is built in process (``conftest.InProcessService``) with gRPC on a free
port, which it starts on its own event loop as a worker does."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.batching import QueueFull
from tests.conftest import free_port


@pytest.fixture(scope="module")
def svc(in_process):
    port = free_port()
    service = in_process({"SERVING_GRPC_PORT": str(port)})
    service.grpc_port = port
    return service


def test_a_full_queue_is_refused_over_rest_in_each_protocol(svc):
    batcher = svc.instance.tasks["sentiment"].batcher
    request = {"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["Fine."]}]}
    limit = batcher.max_queue_items
    batcher.max_queue_items = 0  # as if 4,096 items were waiting
    try:
        status, headers, raw = svc.request(
            "/v2/models/sst2-bilstm/infer",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert status == 503 and headers["retry-after"] == "1"
        error = json.loads(raw)
        assert set(error) == {"error", "request_id"} and "busy" in error["error"]
        status, native = svc.post_json("/sentiment", {"text": "Fine."})
        assert status == 503 and native["detail"][0]["type"] == "overloaded"
    finally:
        batcher.max_queue_items = limit
    assert svc.post_json("/v2/models/sst2-bilstm/infer", request)[0] == 200


def test_a_full_queue_is_unavailable_over_grpc(svc, monkeypatch):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    batcher = svc.instance.tasks["sentiment"].batcher

    async def full(items):
        raise QueueFull("sentiment: 4096 items are already waiting (limit 4096)")

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{svc.grpc_port}")
    texts = grpcclient.InferInput("texts", [1], "BYTES")
    texts.set_data_from_numpy(np.array([b"Fine."], dtype=object))
    try:
        with monkeypatch.context() as patch:
            patch.setattr(batcher, "submit", full)
            with pytest.raises(InferenceServerException) as refused:
                client.infer("sst2-bilstm", [texts])
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert "busy" in refused.value.message()
        assert client.infer("sst2-bilstm", [texts]).as_numpy("label").tolist() == [b"positive"]
    finally:
        client.close()
