"""The ASGI gate in front of the API routes: method, content type, body size, arrivals.

BentoML parses a request body before the service's code runs, and some bad
requests reach it in ways that end as a 500 or an odd body (a JSON list, plain
text). The gate answers those first, with the service's JSON error shape:

* a method other than POST on an API route → 405;
* a content type the route does not take (including BentoML's internal
  ``application/vnd.bentoml+pickle``) or multipart without a boundary → 415;
* a body larger than the limit → 413, from ``Content-Length`` before reading,
  or while buffering a chunked body.

It also counts the requests in progress per route (``InFlight``); a batcher
waits for a fuller batch only while some of them have not reached it yet.
The per-request cost is a header scan and two dictionary updates.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.responses import JSONResponse

from service.errors import error_body

JSON = "application/json"
MULTIPART = "multipart/form-data"


class InFlight:
    """Requests currently inside the server, per route path (one per worker process)."""

    def __init__(self) -> None:
        self._counts: collections.Counter[str] = collections.Counter()

    def enter(self, path: str) -> None:
        self._counts[path] += 1

    def leave(self, path: str) -> None:
        self._counts[path] -= 1

    def count(self, paths: Iterable[str]) -> int:
        return sum(self._counts[path] for path in paths)


IN_FLIGHT = InFlight()


class RequestGate:
    """Pure ASGI middleware; ``routes`` maps an API path to the media type it accepts."""

    def __init__(
        self,
        app: Any,
        *,
        routes: Mapping[str, str],
        max_body_bytes: int,
        in_flight: InFlight = IN_FLIGHT,
    ) -> None:
        self.app = app
        self.routes = dict(routes)
        self.max_body_bytes = max_body_bytes
        self.in_flight = in_flight

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (accepted := self.routes.get(scope["path"])) is None:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if scope["method"] != "POST":
            await _reject(
                scope, receive, send, 405, "method_not_allowed",
                f"{path} accepts POST requests only", ("method",), {"Allow": "POST"},
            )  # fmt: skip
            return
        content_type, content_length, chunked = _body_headers(scope["headers"])
        problem = _content_type_problem(content_type, accepted)
        if problem is not None:
            await _reject(scope, receive, send, 415, "unsupported_media_type",
                          f"{path}: {problem}", ("header", "content-type"))  # fmt: skip
            return
        if content_length is not None and content_length > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        if content_length is None and chunked:
            # No length up front: read the body here, within the limit, then replay it.
            body = await _read_within(receive, self.max_body_bytes)
            if body is None:
                await self._too_large(scope, receive, send)
                return
            receive = _replay(body, receive)
        self.in_flight.enter(path)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.leave(path)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        await _reject(scope, receive, send, 413, "payload_too_large",
                      f"the request body is larger than the limit of {self.max_body_bytes} bytes",
                      ("body",), {"Connection": "close"})  # fmt: skip


def _body_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str | None, int | None, bool]:
    content_type = None
    content_length = None
    chunked = False
    for name, value in headers:
        if name == b"content-type":
            content_type = value.decode("latin-1")
        elif name == b"content-length":
            # The HTTP server has already rejected a malformed Content-Length.
            content_length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    return content_type, content_length, chunked


def _content_type_problem(content_type: str | None, accepted: str) -> str | None:
    if content_type is None:
        # BentoML reads a body without a Content-Type as JSON.
        return None if accepted == JSON else f"send the files as {MULTIPART}"
    media_type, _, parameters = content_type.partition(";")
    media_type = media_type.strip().lower()
    if media_type != accepted:
        return f"unsupported Content-Type {media_type!r}; send {accepted}"
    if accepted == MULTIPART and "boundary=" not in parameters.lower():
        return f"{MULTIPART} without a boundary parameter"
    return None


async def _read_within(receive: Any, limit: int) -> bytes | None:
    """The whole body, or None as soon as it exceeds ``limit`` bytes."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b""  # the client went away; the app sees an empty body and fails cleanly
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    delivered = False

    async def replay() -> dict:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _reject(
    scope: dict,
    receive: Any,
    send: Any,
    status: int,
    type_: str,
    message: str,
    loc: tuple[str, ...],
    headers: Mapping[str, str] | None = None,
) -> None:
    response = JSONResponse(error_body(type_, message, loc), status_code=status, headers=headers)
    await response(scope, receive, send)
