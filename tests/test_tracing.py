"""Traces (``service.tracing``): a real ``bentoml serve`` exporting over OTLP/HTTP to a
real receiver, which decodes what arrives with the protocol's own message types."""

from __future__ import annotations

import json
import secrets
import time

import numpy as np
import pytest

from bench.multipart import file_parts
from bench.otlp_receiver import OtlpReceiver, Span
from service.bento import _tracing_config
from service.settings import Settings
from tests.service_payloads import encode, multipart

# Each request's own spans, children of the request's span.
REQUEST_SPANS = {"read body", "decode", "queue wait", "batch", "encode"}


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def server(serve, model_store, receiver):
    return serve("service.service:ServingService", {
        "SERVING_DEVICE": "cpu", "SERVING_THREADS": "1", "SERVING_TRACING": "on",
        "SERVING_TRACING_ENDPOINT": receiver.endpoint,
        # Export every 0.2 s rather than every 5 s, so that the test waits less.
        "OTEL_BSP_SCHEDULE_DELAY": "200"})  # fmt: skip


def requests() -> dict[str, tuple[str, bytes, str]]:
    png = encode(np.zeros((28, 28), np.uint8), "PNG")
    form, form_type = multipart(file_parts("images", [png, png]))
    v2 = {"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["Fine."]}]}
    return {
        "classify": ("/classify", png, "image/png"),
        "classify_batch": ("/classify_batch", form, form_type),
        "sentiment": ("/sentiment", b'{"text": "A fine film."}', "application/json"),
        "sentiment_batch": ("/sentiment_batch", b'{"texts": ["Good.", "Bad."]}',
                            "application/json"),
        "generate": ("/generate", b'{"n": 2, "digit": 3, "seed": 1}', "application/json"),
        "v2": ("/v2/models/sst2-bilstm/infer", json.dumps(v2).encode(), "application/json"),
    }  # fmt: skip


def test_each_endpoint_s_request_has_the_span_tree(server, receiver):
    sent = {}
    for name, (path, body, content_type) in requests().items():
        trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
        status, _, raw = server.request(path, data=body, headers={
            "Content-Type": content_type, "traceparent": f"00-{trace_id}-{parent}-01"})  # fmt: skip
        assert status == 200, (name, raw[:200])
        sent[name] = (trace_id, parent, path)
    spans: list[Span] = []
    for _ in range(100):
        spans = receiver.spans()
        traces = {span.trace_id for span in spans}
        if all(trace_id in traces for trace_id, _, _ in sent.values()):
            time.sleep(0.5)  # the batch spans of the same export round
            spans = receiver.spans()
            break
        time.sleep(0.1)
    by_id = {span.span_id: span for span in spans}
    for name, (trace_id, parent, path) in sent.items():
        mine = [span for span in spans if span.trace_id == trace_id]
        # The client's trace is continued: the request's span is a child of its span.
        [root] = [span for span in mine if span.parent_span_id == parent]
        assert root.name.startswith(f"POST {path}"), (name, root.name)
        children = {span.name: span for span in mine if span.parent_span_id == root.span_id}
        assert set(children) >= REQUEST_SPANS, (name, sorted(children))
        joined = children["batch"]
        assert joined.attributes["batch.size"] >= 1
        [call] = [span for span in mine if span.parent_span_id == joined.span_id]
        assert call.name == "model call" and joined.start_ns <= call.start_ns <= call.end_ns
        wait = children["queue wait"]
        assert wait.end_ns == joined.start_ns and root.start_ns <= wait.start_ns
        # The batch's own span: another trace, linked both ways, with its model call.
        [(batch_trace, batch_span)] = joined.links
        own = by_id[batch_span]
        assert own.trace_id == batch_trace != trace_id and own.name.startswith("batch ")
        assert (trace_id, root.span_id) in own.links
        assert own.attributes["batch.size"] == joined.attributes["batch.size"]
        assert any(s.parent_span_id == own.span_id and s.name == "model call" for s in spans)
        assert children["read body"].end_ns <= children["decode"].start_ns
        assert children["encode"].start_ns >= call.end_ns


def test_probes_and_scrapes_are_not_traced_and_the_settings_make_bentoml_s_config(server, receiver):
    before = len(receiver.spans())
    for path in ("/livez", "/readyz", "/metrics"):
        assert server.request(path)[0] == 200
    time.sleep(0.6)
    assert not any(span.name.startswith("GET /") for span in receiver.spans()[before:])
    collector = "http://collector:4318/v1/traces"
    settings = Settings.from_env({"SERVING_TRACING": "on", "SERVING_TRACING_SAMPLE_RATE": "0.25",
                                  "SERVING_TRACING_ENDPOINT": collector})  # fmt: skip
    config = _tracing_config(settings, {})
    assert config["sample_rate"] == 0.25 and config["exporter_type"] == "otlp"
    assert config["otlp"] == {"protocol": "http", "endpoint": collector}
