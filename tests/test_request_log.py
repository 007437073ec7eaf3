"""Request IDs and the request log (``service.request_log``): the pieces, then a real
``bentoml serve`` with JSON log lines."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest

from service.request_log import (
    CURRENT,
    JsonFormatter,
    RequestContext,
    RequestIdFilter,
    request_id,
    with_request_id,
)
from tests.service_payloads import encode


def test_a_sane_client_id_is_kept_and_anything_else_replaced():
    assert request_id([(b"x-request-id", b"client-42:a/b")]) == "client-42:a/b"
    for bad in (b"", b"two words", b"x" * 129, b"\xff", b"<script>"):
        made = request_id([(b"x-request-id", bad)])
        assert len(made) == 32 and int(made, 16) >= 0, bad
    assert request_id([]) != request_id([])


def test_the_answer_carries_the_id_and_a_json_error_names_it():
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def answer(status: int, body: bytes, media: bytes) -> None:
        context = RequestContext("id-1", "/classify", "POST")
        wrapped = with_request_id(send, context)
        headers = [(b"content-type", media), (b"content-length", str(len(body)).encode())]
        await wrapped({"type": "http.response.start", "status": status, "headers": headers})
        await wrapped({"type": "http.response.body", "body": body})

    asyncio.run(answer(400, b'{"error": "bad"}', b"application/json"))
    start, body = sent
    assert (b"x-request-id", b"id-1") in start["headers"]
    assert json.loads(body["body"]) == {"error": "bad", "request_id": "id-1"}
    assert dict(start["headers"])[b"content-length"] == str(len(body["body"])).encode()
    sent.clear()
    asyncio.run(answer(200, b'{"digit": 7}', b"application/json"))  # not an error: unchanged
    assert sent[1]["body"] == b'{"digit": 7}' and (b"x-request-id", b"id-1") in sent[0]["headers"]


def test_a_json_line_names_the_request():
    record = logging.LogRecord("service", logging.INFO, __file__, 1, "served", None, None)
    token = CURRENT.set(RequestContext("id-2", "/sentiment", "POST"))
    try:
        RequestIdFilter().filter(record)
    finally:
        CURRENT.reset(token)
    record.status = 200
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "id-2" and line["status"] == 200
    assert line["level"] == "info" and line["message"] == "served" and "time" in line


@pytest.fixture(scope="module")
def server(serve, model_store):
    return serve("service.service:ServingService", {
        "SERVING_DEVICE": "cpu", "SERVING_THREADS": "1", "SERVING_WORKERS": "2",
        "SERVING_LOG_FORMAT": "json", "SERVING_ACCESS_LOG": "on"})  # fmt: skip


def log_lines(server) -> list[dict]:
    lines = []
    for text in server.log_path.read_text().splitlines():
        if text.startswith("{"):
            lines.append(json.loads(text))
    return lines


def test_request_ids_and_json_lines_over_http(server, model_store):
    png = encode(np.zeros((28, 28), np.uint8), "PNG")
    status, headers, _ = server.request("/classify", data=png, headers={
        "Content-Type": "image/png", "X-Request-ID": "client-id-42"})  # fmt: skip
    assert status == 200 and headers["x-request-id"] == "client-id-42"
    status, headers, raw = server.request("/classify", data=b"not an image", headers={
        "Content-Type": "image/png", "X-Request-ID": "bad-image-7"})  # fmt: skip
    assert status == 400 and json.loads(raw)["request_id"] == "bad-image-7"
    status, headers, raw = server.request("/sentiment", data=b"{", headers={
        "Content-Type": "application/json", "X-Request-ID": "two words"})  # fmt: skip
    made = headers["x-request-id"]
    assert status == 400 and len(made) == 32 and json.loads(raw)["request_id"] == made
    status, headers, _ = server.request("/livez")
    assert status == 200 and len(headers["x-request-id"]) == 32
    deadline_lines: list[dict] = []
    for _ in range(50):  # the request line is written once the answer is sent
        deadline_lines = log_lines(server)
        if {"client-id-42", "bad-image-7", made} <= {line.get("request_id") for line in
                                                      deadline_lines}:  # fmt: skip
            break
        asyncio.run(asyncio.sleep(0.1))
    by_id = {line.get("request_id"): line for line in deadline_lines if line.get("status")}
    served = by_id["client-id-42"]
    assert served["route"] == "/classify" and served["status"] == 200
    assert served["duration_ms"] > 0 and served["batch_size"] >= 1
    assert served["model_version"] == model_store["mnist-cnn"].partition(":")[2]
    assert served["level"] == "info" and served["time"].endswith("+00:00")
    assert by_id["bad-image-7"]["status"] == 400 and by_id[made]["status"] == 400
    # Client errors are not logged with a stack trace.
    assert "Traceback" not in server.log_path.read_text()
    assert not any("exception" in line for line in deadline_lines)
