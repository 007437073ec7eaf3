"""The request timeout (``SERVING_REQUEST_TIMEOUT_S``), without a timer kept per request.

BentoML answers a request that has not started its response within
``traffic.timeout`` with a 504, in its ``TimeoutMiddleware``. That middleware
schedules one timer per request with ``loop.call_later`` and never cancels
it: the timer, and the future it holds, live for the whole timeout after the
request was answered. At 2,000 requests/s and the 60 s default that is about
120,000 dead timers in every worker, which ``tracemalloc`` snapshots of a
worker under load name as the one growing site, and which took the worker's
resident memory from 268 MiB to 374 MiB in its first minute of load
(``docs/operations.md``, "Memory per worker").

``RequestTimeout`` keeps BentoML's behaviour (the same setting; a response
not started in time is cancelled and answered 504, now in the service's error
shape; once a response has started it may take as long as it needs) with an
``asyncio.timeout`` whose timer is cancelled as soon as the response starts,
and it needs no extra task or future per request.

BentoML offers no public way to replace its middleware, and ``traffic.timeout``
must be positive, so ``service.framework_hooks`` puts this class where BentoML
looks its own up, and checks at start-up that it is used.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from bentoml._internal.server.http import traffic

from service.errors import error_body

TIMED_OUT_STATUS = 504
# The class this one replaces (kept for the test that watches for BentoML's fix).
BENTOML_TIMEOUT_MIDDLEWARE = traffic.TimeoutMiddleware


class RequestTimeout:
    """ASGI middleware: a request whose response has not started after ``timeout``
    seconds is cancelled and answered 504."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = False
        deadline = asyncio.timeout(self.timeout)

        async def send_and_stop_the_clock(message: dict) -> None:
            nonlocal started
            if not started:
                started = True
                deadline.reschedule(None)  # cancels the timer: nothing outlives the request
            await send(message)

        try:
            async with deadline:
                await self.app(scope, receive, send_and_stop_the_clock)
        except TimeoutError:
            if not deadline.expired() or started or scope["type"] != "http":
                raise  # the app's own TimeoutError, or too late for another answer
            await _send_timed_out(send, self.timeout)


async def _send_timed_out(send: Any, timeout: float) -> None:
    message = f"the request was not answered within {timeout:g} seconds (SERVING_REQUEST_TIMEOUT_S)"
    body = orjson.dumps(error_body("timeout", message))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": TIMED_OUT_STATUS, "headers": headers})
    await send({"type": "http.response.body", "body": body})
