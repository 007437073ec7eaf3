"""Limits at the HTTP layer, below the ASGI app: headers, idle connections, shutdown.

uvicorn (which ``bentoml serve`` runs in every worker) reads headers of any
size and count, waits for them forever, accepts any number of connections,
and at shutdown closes idle keep-alive connections at once, so a request the
client sent at that moment meets a reset. ``GuardedHttpProtocol`` is uvicorn's
own httptools protocol with those gaps closed:

* **Header size and count.** The bytes of a request head (request line and
  headers) and the number of header fields are counted as they arrive; beyond
  ``max_header_bytes`` or ``max_headers`` the answer is 431 and the connection
  is closed, so no more of the head is read or buffered.
* **Header timeout.** From a connection's first byte (or its opening) to the
  end of a request's head: at most ``header_timeout_s`` (checked once a
  second), else 408 and close.
  A client that trickles a header byte at a time cannot hold a connection.
* **Keep-alive timeout.** An idle keep-alive connection is closed after
  ``keepalive_timeout_s`` (uvicorn's own timer, set from the settings).
* **Connections per worker.** Beyond ``max_connections`` open connections a
  new one gets a 503 with ``Connection: close`` at once.
* **Draining at shutdown.** When the worker is told to stop (SIGTERM), an idle
  connection stays open for ``drain_idle_s`` and any request that arrives on
  it is answered 503 with ``Connection: close`` instead of meeting a closed
  socket; requests in flight finish and are answered with ``Connection:
  close``; whatever is still open ``drain_s`` after the signal is closed.

Every refusal has the service's JSON error shape. ``bentoml serve`` builds
uvicorn's configuration itself, with ``http="auto"``, so
``service.framework_hooks`` names this protocol under that key before the
worker's server starts (the service module is imported first), with the
limits from the settings.
"""

from __future__ import annotations

from asyncio import TimerHandle
from http import HTTPStatus
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import error_body
from service.settings import Settings

# How long a refused connection is read (and the bytes dropped) before it is closed.
LINGER_S = 2.0


def refusal_bytes(status: int, type_: str, message: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    body = orjson.dumps(error_body(type_, message))
    phrase = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    )
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        head += "retry-after: 1\r\n"
    return head.encode("latin-1") + b"\r\n" + body


class _Open:
    """The worker's open connections (uvicorn's set, known once one has been made)."""

    def __init__(self) -> None:
        self.connections: set[Any] = set()

    def count(self) -> int:
        return len(self.connections)


OPEN = _Open()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on request heads, connections and drain.

    It adds as little as it can to every request: no timer per request (one sweep a
    second checks the head deadlines of all connections of the worker), and header
    size and count are checked once, when the head is complete.
    """

    limits = Settings.from_env({}).connections  # the declared defaults until installed

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keepalive_timeout_s
        self._head_bytes = 0  # bytes of the request head being read
        self._head_since: float | None = None  # when it began; None: no head pending
        self._refusing = False
        self._draining = False
        self._drain_timer: TimerHandle | None = None

    # --- connection ---------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        OPEN.connections = self.connections  # the server's set: the same on every connection
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "too_many_connections",
                         f"this worker has {self.limits.max_connections} connections open; "
                         "retry shortly")  # fmt: skip
            return
        self._head_since = self.loop.time()  # a connection that sends nothing times out too
        _HeadDeadlines.watch(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_since = None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return  # lingering after a refusal: dropped
        reading_head = self.cycle is None or self.cycle.response_complete
        if reading_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Still in the same head after this data: it must not grow past the limit.
        over = reading_head and self._head_bytes > self.limits.max_header_bytes
        if over and not (self._refusing or self.transport.is_closing()):
            limit = self.limits.max_header_bytes
            self._refuse(431, "headers_too_large", f"the request head is over {limit} bytes")

    # --- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_since is None:
            self._head_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self._head_since = None
        self._head_bytes = 0
        if len(self.headers) > self.limits.max_headers:
            limit = self.limits.max_headers
            self._refuse(431, "too_many_headers", f"the request has over {limit} header fields")
            return
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            # A head that arrived whole in one read; a longer one is stopped in data_received.
            limit = self.limits.max_header_bytes
            self._refuse(431, "headers_too_large", f"the request head is over {limit} bytes")
            return
        if self._draining:
            self._refuse(503, "shutting_down", "the server is shutting down; retry shortly")
            return
        super().on_headers_complete()

    # After a refusal the parser may still be in the same read: no request was started.
    def on_body(self, body: bytes) -> None:
        if not self._refusing:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refusing:
            super().on_message_complete()

    # --- shutdown -----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Drain instead of closing idle connections at once (see the module's doc)."""
        self._draining = True
        self._drain_timer = self.loop.call_later(self.limits.drain_s, self._close)
        if self.cycle is None or self.cycle.response_complete:
            self._unset_keepalive_if_required()
            # Idle: a request may be on its way; it gets a 503, not a reset.
            self.loop.call_later(self.limits.drain_idle_s, self._close_if_idle)
        else:
            self.cycle.keep_alive = False  # answered, then closed

    def _close_if_idle(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._close()

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    # --- helpers ------------------------------------------------------------------------

    def _refuse(self, status: int, type_: str, message: str) -> None:
        """Answer and close. The close lingers: what the client still sends is read and
        dropped for a moment, since closing with unread data would make the kernel
        reset the connection, and the client could lose the answer."""
        self._refusing = True
        self._head_since = None
        if self.transport.is_closing():
            return
        self.transport.write(refusal_bytes(status, type_, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self._close)

    def _check_head_deadline(self, now: float) -> None:
        since = self._head_since
        if since is not None and now - since > self.limits.header_timeout_s:
            limit = self.limits.header_timeout_s
            self._refuse(408, "request_timeout", f"the request head took longer than {limit} s")


class _HeadDeadlines:
    """One sweep a second over the worker's connections, instead of a timer per request:
    a head pending for longer than the limit is answered 408 (within a second of it)."""

    _running = False

    @classmethod
    def watch(cls, protocol: GuardedHttpProtocol) -> None:
        if not cls._running:
            cls._running = True
            protocol.loop.call_later(1.0, cls._sweep, protocol.loop, protocol.connections)

    @classmethod
    def _sweep(cls, loop: Any, connections: set) -> None:
        now = loop.time()
        for connection in list(connections):
            if isinstance(connection, GuardedHttpProtocol):
                connection._check_head_deadline(now)
        if connections:
            loop.call_later(1.0, cls._sweep, loop, connections)
        else:
            cls._running = False
