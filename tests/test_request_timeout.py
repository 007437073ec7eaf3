"""``service.request_timeout.RequestTimeout``: BentoML's request timeout, kept as it
behaves (a 504 when no response has started in time), with no timer left behind.
The memory side is in ``tests/test_memory.py``; a real server answers a 504 in
``tests/test_service_http.py``."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.request_timeout import RequestTimeout

HTTP_SCOPE = {"type": "http", "method": "POST", "path": "/classify", "headers": []}


async def no_body() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


def serve(app, timeout: float, scope: dict | None = None) -> list[dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(RequestTimeout(app, timeout=timeout)(dict(scope or HTTP_SCOPE), no_body, send))
    return sent


def test_a_response_not_started_in_time_is_cancelled_and_answered_504():
    cancelled = []

    async def slow(scope, receive, send):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    start, body = serve(slow, timeout=0.05)
    assert start["status"] == 504
    error = json.loads(body["body"])
    assert error["detail"][0]["type"] == "timeout"
    assert "SERVING_REQUEST_TIMEOUT_S" in error["error"]
    assert cancelled == [True]


def test_a_started_response_may_take_longer_than_the_timeout():
    async def streaming(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.2)  # four times the timeout
        await send({"type": "http.response.body", "body": b"done"})

    start, body = serve(streaming, timeout=0.05)
    assert (start["status"], body["body"]) == (200, b"done")


def test_a_timeout_error_of_the_app_is_not_a_504():
    async def failing(scope, receive, send):
        raise TimeoutError("the app's own")

    with pytest.raises(TimeoutError, match="the app's own"):
        serve(failing, timeout=5.0)


def test_lifespan_messages_pass_through_untimed():
    seen = []

    async def app(scope, receive, send):
        await asyncio.sleep(0.1)
        seen.append(scope["type"])

    assert serve(app, timeout=0.01, scope={"type": "lifespan"}) == []
    assert seen == ["lifespan"]
