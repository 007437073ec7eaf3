"""Each request's id, and the log lines about it.

* **Request IDs.** A request's ``X-Request-ID`` is kept when it is a sane token (1–128
  characters of letters, digits and ``._~:/+=-``), else one is made (32 hex digits).
  The gate (``service.http.ApiGate``) puts it on every answer's headers, into every
  JSON error body (``"request_id"``), and into every log line written while the
  request is served (``RequestIdFilter``, through a context variable).
* **The request log** (``SERVING_ACCESS_LOG``): one line per request, written when
  its answer has been sent: route, status, duration, and for a model's request the
  version that answered and the size of the batch it ran in.
* **JSON lines** (``SERVING_LOG_FORMAT=json``): every log line of a worker is one JSON
  object: time, level, logger, message, the request id where there is one, and the
  request log's fields. Client errors are never logged with a stack trace; only
  faults of the server are.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

log = logging.getLogger("service.requests")

REQUEST_ID_HEADER = b"x-request-id"
_SANE_ID = re.compile(rb"[A-Za-z0-9._~:/+=-]{1,128}")
# The fields a request log line carries beyond the message (``JsonFormatter``).
REQUEST_FIELDS = ("route", "method", "status", "duration_ms", "model_version", "batch_size")


class RequestContext:
    """What is known of the request being served."""

    __slots__ = ("batch_size", "id", "method", "route", "started", "status", "version")

    def __init__(self, request_id: str, route: str, method: str) -> None:
        self.id = request_id
        self.route = route
        self.method = method
        self.started = time.perf_counter()
        self.status = 0
        self.version: str | None = None  # the model version that answered
        self.batch_size: int | None = None  # items in the (last) batch its items ran in

    def log_fields(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "method": self.method,
            "status": self.status,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
            "model_version": self.version,
            "batch_size": self.batch_size,
        }


CURRENT: ContextVar[RequestContext | None] = ContextVar("serving_request", default=None)


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` if it is a sane token, else a new one."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _SANE_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return secrets.token_hex(16)


def with_request_id(send: Callable[[dict], Awaitable[None]], context: RequestContext):
    """``send`` that adds the request id to the answer's headers and to a JSON error body,
    and notes the status."""
    header = (REQUEST_ID_HEADER, context.id.encode("ascii"))
    held: dict | None = None  # an error's start, until its body can name the request

    async def send_with_id(message: dict) -> None:
        nonlocal held
        kind = message["type"]
        if kind == "http.response.start":
            context.status = message["status"]
            message["headers"] = [*message.get("headers", ()), header]
            if context.status >= 400 and _is_json(message["headers"]):
                held = message
                return
        elif kind == "http.response.body" and held is not None:
            start, held = held, None
            if not message.get("more_body", False):
                body = _naming(message.get("body", b""), context.id)
                start["headers"] = [(n, str(len(body)).encode() if n == b"content-length" else v)
                                    for n, v in start["headers"]]  # fmt: skip
                message = {**message, "body": body}
            await send(start)
        await send(message)

    return send_with_id


def _is_json(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(name == b"content-type" and value.startswith(b"application/json")
               for name, value in headers)  # fmt: skip


def _naming(body: bytes, request_id: str) -> bytes:
    """A JSON error object with ``request_id`` added; anything else unchanged."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(value, dict):
        return body
    return orjson.dumps({**value, "request_id": request_id})


def log_request(context: RequestContext) -> None:
    """The request log's line for a request whose answer has been sent."""
    fields = context.log_fields()
    log.info("%s %s %d %.1f ms", context.method, context.route, context.status,
             fields["duration_ms"], extra={**fields, ID_ATTRIBUTE: context.id})  # fmt: skip


# The record attribute that holds the request id: not ``request_id``, which BentoML's own
# log filter sets (to a number of its own) on the same records.
ID_ATTRIBUTE = "serving_request_id"


class RequestIdFilter(logging.Filter):
    """Gives every record the id of the request being served (``ID_ATTRIBUTE``), or None."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, ID_ATTRIBUTE):
            context = CURRENT.get()
            setattr(record, ID_ATTRIBUTE, context.id if context is not None else None)
        return True


class TextFormatter(logging.Formatter):
    """The handler's own format, with ``[request <id>]`` after the message where there is
    one."""

    def __init__(self, base: logging.Formatter | None) -> None:
        super().__init__()
        self.base = base or logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = self.base.format(record)
        request = getattr(record, ID_ATTRIBUTE, None)
        return f"{text} [request {request}]" if request else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, ID_ATTRIBUTE, None),
        }
        for name in REQUEST_FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


LOGGERS = ("", "bentoml", "uvicorn", "uvicorn.error", "service")


def configure(log_format: str) -> None:
    """Every handler of this worker's loggers: the request id on each line, and the
    format chosen (``text`` keeps each handler's own)."""
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
                handler.addFilter(RequestIdFilter())
            if log_format == "json":
                handler.setFormatter(JsonFormatter())
            elif not isinstance(handler.formatter, TextFormatter):
                handler.setFormatter(TextFormatter(handler.formatter))
