"""Client errors and their JSON bodies.

Every 4xx the service sends has the same shape as BentoML's own answer to a
request that fails schema validation, so a client parses one format::

    {"error": "images[1]: not a PNG, JPEG, GIF, BMP or WebP image",
     "detail": [{"type": "invalid_image", "loc": ["images", 1], "msg": "..."}]}

``error`` is one human-readable line naming the problem; ``detail`` lists each
problem with a machine-readable ``type`` and the location of the bad value.
The service returns these as responses rather than raising BentoML exceptions,
because BentoML 1.4.39 serialises a 4xx ``BentoMLException`` as a JSON list
(``[{"error": ...}]``) instead of an object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus

from starlette.responses import JSONResponse

Location = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    type: str
    msg: str
    loc: Location = ()

    def as_dict(self) -> dict:
        return {"type": self.type, "loc": list(self.loc), "msg": self.msg}

    def line(self) -> str:
        where = _format_location(self.loc)
        return f"{where}: {self.msg}" if where else self.msg


class RequestError(Exception):
    """A request the service refuses, with the HTTP status to answer."""

    status: int = HTTPStatus.BAD_REQUEST

    def __init__(self, problems: Problem | Sequence[Problem], *, status: int | None = None):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        if status is not None:
            self.status = status
        super().__init__(self.summary())

    @classmethod
    def single(cls, type_: str, msg: str, loc: Location = (), **kwargs) -> RequestError:
        return cls(Problem(type_, msg, loc), **kwargs)

    def summary(self) -> str:
        first = self.problems[0].line()
        more = len(self.problems) - 1
        return f"{first} (and {more} more problem{'s' if more > 1 else ''})" if more else first

    def body(self) -> dict:
        return {"error": self.summary(), "detail": [p.as_dict() for p in self.problems]}

    def headers(self) -> dict[str, str]:
        return {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


@dataclass
class ServiceBusy(Exception):
    """Too much work is queued; the client should retry after a moment."""

    message: str
    retry_after_s: int = 1
    status: int = field(default=HTTPStatus.SERVICE_UNAVAILABLE, init=False)

    def body(self) -> dict:
        return error_body("overloaded", self.message)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


ClientError = RequestError | ServiceBusy


def error_body(type_: str, msg: str, loc: Location = ()) -> dict:
    """The JSON body of a single-problem error (used where no exception is raised)."""
    return RequestError.single(type_, msg, loc).body()


def _format_location(loc: Location) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
