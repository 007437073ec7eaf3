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
  end of a request's head: at most ``header_timeout_s``, else 408 and close.
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

Every refusal has the service's JSON error shape. ``install`` makes uvicorn
use this protocol: ``bentoml serve`` builds uvicorn's configuration itself,
with ``http="auto"``, so the protocol named by that key is replaced before the
worker's server starts (the service module is imported first).
"""

from __future__ import annotations

import logging
from asyncio import TimerHandle
from http import HTTPStatus
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import error_body
from service.settings import ConnectionLimits

log = logging.getLogger(__name__)

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


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on request heads, connections and drain."""

    limits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keepalive_timeout_s
        self._head_bytes: int | None = 0  # None while a request body is being read
        self._header_count = 0
        self._head_size = 0
        self._refusing = False
        self._head_timer: TimerHandle | None = None
        self._drain_timer: TimerHandle | None = None
        self._draining = False

    # --- connection ---------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "too_many_connections",
                         f"this worker has {self.limits.max_connections} connections open; "
                         "retry shortly")  # fmt: skip
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._refusing or self.transport.is_closing():
            return
        if self._head_bytes is not None and self._head_bytes > self.limits.max_header_bytes:
            limit = self.limits.max_header_bytes
            self._refuse(431, "headers_too_large", f"the request head is over {limit} bytes")

    # --- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0
        self._head_size = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        if self._header_count <= self.limits.max_headers:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        if self._head_size > self.limits.max_header_bytes:
            # A head that arrived whole in one read; a longer one is stopped in data_received.
            limit = self.limits.max_header_bytes
            self._refuse(431, "headers_too_large", f"the request head is over {limit} bytes")
            return
        if self._header_count > self.limits.max_headers:
            limit = self.limits.max_headers
            self._refuse(431, "too_many_headers", f"the request has over {limit} header fields")
            return
        if self._draining:
            self._refuse(503, "shutting_down", "the server is shutting down; retry shortly")
            return
        self._head_bytes = None  # the body follows; its size is the gate's business
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refusing:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._head_bytes = 0  # whatever comes next is the next request's head
        if not self._refusing:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._draining and not self.transport.is_closing():
            self.transport.close()

    # --- shutdown -----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Drain instead of closing idle connections at once (see the module's doc)."""
        self._draining = True
        loop = self.loop
        self._drain_timer = loop.call_later(self.limits.drain_s, self._close)
        if self.cycle is None or self.cycle.response_complete:
            self._unset_keepalive_if_required()
            # Idle: a request may be on its way; it gets a 503, not a reset.
            loop.call_later(self.limits.drain_idle_s, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

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
        self._cancel_timers()
        if self.transport.is_closing():
            return
        self.transport.write(refusal_bytes(status, type_, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self._close)

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._head_bytes is not None and (self.cycle is None or self.cycle.response_complete):
            limit = self.limits.header_timeout_s
            self._refuse(408, "request_timeout", f"the request head took longer than {limit} s")

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None


def install(limits: ConnectionLimits) -> None:
    """Make uvicorn's ``http="auto"`` (what ``bentoml serve`` uses) this protocol."""
    from uvicorn import config

    GuardedHttpProtocol.limits = limits
    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:GuardedHttpProtocol"
