"""The service's HTTP path: an ASGI gate that answers the API routes itself.

BentoML's own route for an API method parses the body through its serde
layer, validates a pydantic model, calls the method and serialises the answer
through several Starlette layers; for a request whose model call takes a
fraction of a millisecond that framework work was most of the server's CPU
(``docs/benchmarks.md``). So the API routes (the route table's,
``service.routes``) are served here, in an ASGI middleware added with BentoML's
public ``add_asgi_middleware``: it sits inside
BentoML's metrics, tracing, access-log and timeout middleware (so
``/metrics`` still counts every request and slow requests still get a 504),
and everything that is not an API route (``/``, ``/docs.json``, ``/livez``,
``/readyz``, ``/metrics``, ``/schema.json``) goes on to BentoML untouched.

For an API route the gate

* answers a method other than POST with 405;
* answers a content type the route does not take (including BentoML's
  internal ``application/vnd.bentoml+pickle``), or multipart without a
  boundary, with 415;
* answers a body over the limit with 413: from ``Content-Length`` before
  reading, or while reading a chunked body;
* asks the service whether it would refuse the request anyway (its queue is
  full) and if so answers 503 before reading the body, so that refusing costs
  almost nothing and the server's time goes to the requests it serves;
* counts the request as in flight (``InFlight``) while it is received and
  served: a batcher waits for a fuller batch only while some of those have not
  reached it yet;
* hands the whole body to the service's ``handle`` and sends its ``Reply``;
* watches the connection meanwhile: a client that disconnects has its work
  cancelled (its queued items are dropped before they reach a model), and is
  logged as one INFO line, at most one per ``DisconnectLog.interval_s``.

Errors have the service's JSON shape (``service.errors``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from service import tracing
from service.errors import ClientError, error_body
from service.request_log import CURRENT, RequestContext, log_request, request_id, with_request_id

log = logging.getLogger(__name__)

JSON = "application/json"
MULTIPART = "multipart/form-data"
PNG = "image/png"
# Raw image bodies /classify takes besides multipart (the format is read from the bytes).
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp")


@dataclass(frozen=True)
class Reply:
    """A complete HTTP answer."""

    status: int
    body: bytes
    media_type: str = JSON
    headers: Mapping[str, str] | None = None

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Reply:
        with tracing.span("encode"):
            return cls(status, orjson.dumps(value))

    @classmethod
    def error(cls, error: ClientError) -> Reply:
        return cls(error.status, orjson.dumps(error.body()), headers=error.headers())


# A request still unanswered after this long starts watching its connection.
WATCH_AFTER_S = 0.05

# The answer to a client that has gone. The server drops it unsent; it still ends the
# request for the middleware around the gate: BentoML's request metrics count it under
# 499 (nginx's "client closed request") and its timeout stops waiting for an answer.
CLIENT_GONE = Reply(499, orjson.dumps(error_body("client_closed_request", "the client left")))


class _Waiting:
    """A request being served, and the watcher of its connection once there is one."""

    __slots__ = ("finished", "gone", "receive", "since", "task", "watcher")

    def __init__(self, task: asyncio.Task, receive: Any, since: float) -> None:
        self.task = task
        self.receive = receive
        self.since = since
        self.watcher: asyncio.Future | None = None
        self.gone = False
        self.finished = False

    def watch(self) -> None:
        self.watcher = asyncio.ensure_future(self.receive())
        self.watcher.add_done_callback(self._on_message)

    def _on_message(self, watcher: asyncio.Future) -> None:
        # A callback already scheduled when the work finished must not cancel the reply.
        if not self.finished and not watcher.cancelled() and watcher.exception() is None:
            self.gone = True
            self.task.cancel()

    def finish(self) -> None:
        self.finished = True
        if self.watcher is not None:
            self.watcher.cancel()


class ApiHandler(Protocol):
    async def handle(
        self, path: str, media_type: str, content_type: str, body: bytes, headers: Headers
    ) -> Reply:
        """Answer one API request; ``media_type`` is the lower-cased type of ``content_type``,
        ``headers`` the request's (ASGI: lower-case names, as bytes)."""
        ...

    def refusal(self, path: str) -> Reply | None:
        """The answer to any request for ``path`` right now if it cannot take one (503)."""
        ...


class DisconnectLog:
    """Clients that leave before their answer are traffic, not faults: one INFO line
    per ``interval_s`` at most, counting every departure since the previous line."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self._clock = clock
        self._unreported = 0
        self._last_line = -float("inf")

    def note(self, path: str, stage: str) -> None:
        self._unreported += 1
        now = self._clock()
        if now - self._last_line >= self.interval_s:
            log.info("%d client(s) disconnected before their answer (the latest on %s, %s)",
                     self._unreported, path, stage)  # fmt: skip
            self._unreported = 0
            self._last_line = now


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

Headers = Iterable[tuple[bytes, bytes]]


@dataclass(frozen=True)
class GateRoute:
    """What the gate checks of a request before its body is read."""

    method: str  # POST: a body of one of ``media_types``; GET: no body
    media_types: tuple[str, ...] = ()


class ApiGate:
    """Pure ASGI middleware; ``routes`` maps an API path to its method and the media types
    it accepts, ``handler`` returns the object that answers them (the running service
    instance); ``unknown`` may answer a path that is not a route (a protocol's 404)."""

    def __init__(
        self,
        app: Any,
        *,
        routes: Mapping[str, GateRoute],
        max_body_bytes: int,
        handler: Callable[[], ApiHandler],
        unknown: Callable[[str], Reply | None] = lambda path: None,
        key_of: Callable[[str], str | None] = lambda path: None,
        authorize: Callable[[str, Headers], Reply | None] | None = None,
        in_flight: InFlight = IN_FLIGHT,
        disconnects: DisconnectLog | None = None,
        request_log: bool = False,
    ) -> None:
        self.app = app
        # One log line per request once it is answered (``service.request_log``).
        self.request_log = request_log
        self.routes = dict(routes)
        self.unknown = unknown
        # A path that is not itself a key of ``routes`` → the key of the route that
        # answers it (a path naming a model version), or None.
        self.key_of = key_of
        # With API keys: path and headers → the refusal of a request without the right
        # key (401, 403), or None; the first thing checked, on every path it guards.
        self.authorize = authorize
        self.max_body_bytes = max_body_bytes
        self.handler = handler
        self.in_flight = in_flight
        self.disconnects = disconnects or DisconnectLog()
        self._waiting: set[_Waiting] = set()
        self._sweeping = False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Every HTTP request, the API's and BentoML's own: its id on the answer, in an
        # error body and on every log line written while it is served.
        context = RequestContext(request_id(scope["headers"]), scope["path"], scope["method"])
        token = CURRENT.set(context)
        try:
            await self._serve(scope, receive, with_request_id(send, context))
        finally:
            CURRENT.reset(token)
            if self.request_log:
                log_request(context)

    async def _serve(self, scope: dict, receive: Any, send: Any) -> None:
        if (
            self.authorize is not None
            and (refusal := self.authorize(scope["path"], scope["headers"])) is not None
        ):
            await send_reply(send, refusal)
            return
        path = key = scope["path"]
        if (route := self.routes.get(path)) is None:
            if (key := self.key_of(path)) is not None:
                route = self.routes[key]
            elif (reply := self.unknown(path)) is not None:
                await send_reply(send, reply)
                return
            else:
                await self.app(scope, receive, send)
                return
        if scope["method"] != route.method:
            await _reject(send, 405, "method_not_allowed",
                          f"{path} accepts {route.method} requests only", ("method",),
                          {"Allow": route.method})  # fmt: skip
            return
        handler = self.handler()
        if (refusal := handler.refusal(path)) is not None:
            await send_reply(send, refusal)  # the body is never read: uvicorn discards it
            return
        content_type, content_length = _body_headers(scope["headers"])
        media_type, problem = "", None
        if route.method == "POST":
            media_type, problem = _content_type_problem(content_type, route.media_types)
        if problem is not None:
            await _reject(send, 415, "unsupported_media_type", f"{path}: {problem}",
                          ("header", "content-type"))  # fmt: skip
            return
        if content_length is not None and content_length > self.max_body_bytes:
            await self._too_large(send)
            return
        self.in_flight.enter(key)
        try:
            with tracing.span("read body"):
                body = await _read_within(receive, self.max_body_bytes)
            if body is None:
                await self._too_large(send)
                return
            if isinstance(body, _Disconnected):
                self.disconnects.note(path, "while sending the body")
                reply = CLIENT_GONE
            else:
                reply = await self._answer_while_connected(
                    handler, receive, path, media_type, content_type or "", body, scope["headers"]
                )
                if reply is None:
                    self.disconnects.note(path, "while the request was served")
                    reply = CLIENT_GONE
            await send_reply(send, reply)
        finally:
            self.in_flight.leave(key)

    async def _answer_while_connected(
        self, handler: ApiHandler, receive: Any, path: str, *request: Any
    ) -> Reply | None:
        """The handler's reply, or None if the client disconnected first.

        Once the body is read, the server's ``receive`` returns only when the
        client disconnects (or the answer is complete). For a request still
        unanswered after ``WATCH_AFTER_S`` (checked by one sweep for all), a
        watcher waits for that and cancels this task, which cancels the work
        where it waits: queued items leave the batcher's queue and never reach a
        model.
        """
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        waiting = _Waiting(task, receive, loop.time())
        self._waiting.add(waiting)
        if not self._sweeping:
            self._sweeping = True
            loop.call_later(WATCH_AFTER_S, self._watch_the_slow, loop)
        try:
            return await self._answer(handler, path, *request)
        except asyncio.CancelledError:
            if not waiting.gone:
                raise  # cancelled from outside (the request timeout, shutdown)
            task.uncancel()
            return None
        finally:
            self._waiting.discard(waiting)
            waiting.finish()

    def _watch_the_slow(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching the connections of requests waiting longer than ``WATCH_AFTER_S``;
        one sweep for all of them, so that a request answered sooner costs nothing."""
        started_before = loop.time() - WATCH_AFTER_S
        for waiting in self._waiting:
            if waiting.watcher is None and waiting.since <= started_before:
                waiting.watch()
        if self._waiting:
            loop.call_later(WATCH_AFTER_S, self._watch_the_slow, loop)
        else:
            self._sweeping = False

    async def _answer(self, handler: ApiHandler, path: str, *request: Any) -> Reply:
        try:
            return await handler.handle(path, *request)
        except Exception:
            # A fault of the server, not of the request: log it, answer 500 in the
            # service's error shape, and keep serving.
            log.exception("Exception on %s", path)
            return Reply(500, orjson.dumps(error_body("internal_error", "internal server error")))

    async def _too_large(self, send: Any) -> None:
        await _reject(send, 413, "payload_too_large",
                      f"the request body is larger than the limit of {self.max_body_bytes} bytes",
                      ("body",), {"Connection": "close"})  # fmt: skip


async def send_reply(send: Callable[[dict], Awaitable[None]], reply: Reply) -> None:
    headers = [
        (b"content-type", reply.media_type.encode("latin-1")),
        (b"content-length", str(len(reply.body)).encode("latin-1")),
    ]
    if reply.headers:
        headers.extend(
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in reply.headers.items()
        )
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


def _body_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str | None, int | None]:
    content_type = None
    content_length = None
    for name, value in headers:
        if name == b"content-type":
            content_type = value.decode("latin-1")
        elif name == b"content-length":
            # The HTTP server has already rejected a malformed Content-Length.
            content_length = int(value)
    return content_type, content_length


def _content_type_problem(
    content_type: str | None, accepted: tuple[str, ...]
) -> tuple[str, str | None]:
    """(the media type, what is wrong with it or None)."""
    if content_type is None:
        # A body without a Content-Type is read as JSON, as BentoML does.
        if JSON in accepted:
            return JSON, None
        return "", f"send the files as {MULTIPART}"
    media_type, _, parameters = content_type.partition(";")
    media_type = media_type.strip().lower()
    if media_type not in accepted:
        return media_type, f"unsupported Content-Type {media_type!r}; send {' or '.join(accepted)}"
    if media_type == MULTIPART and "boundary=" not in parameters.lower():
        return media_type, f"{MULTIPART} without a boundary parameter"
    return media_type, None


class _Disconnected:
    """The client went away before its body was read."""


_DISCONNECTED = _Disconnected()


async def _read_within(receive: Any, limit: int) -> bytes | _Disconnected | None:
    """The whole body; None as soon as it exceeds ``limit`` bytes; ``_DISCONNECTED`` if the
    client went away first."""
    message = await receive()
    if message["type"] != "http.request":
        return _DISCONNECTED
    body = message.get("body", b"")
    if not message.get("more_body", False):  # the usual case: one message
        return body if len(body) <= limit else None
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return _DISCONNECTED
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _reject(
    send: Any,
    status: int,
    type_: str,
    message: str,
    loc: tuple[str, ...],
    headers: Mapping[str, str] | None = None,
) -> None:
    await send_reply(
        send, Reply(status, orjson.dumps(error_body(type_, message, loc)), headers=headers)
    )
