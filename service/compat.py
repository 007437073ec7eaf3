"""Workarounds for BentoML 1.4.39 behaviour that turns bad requests into 500s or log floods.

Applied once, when the service module is imported (``apply``). Each is
covered by a test in tests/test_service_http.py that fails without it.

1. Multipart parsing (``MultipartSerde.parse_request``) in 1.4.39
   * treats a text value in a file field as a URL and fetches it from the
     server (``-F image=hello`` ends in a 500, and a URL makes the server send
     a request of its own);
   * runs ``json.loads`` over every non-file field, so a file part under an
     unexpected name fails with ``UnicodeDecodeError`` → 500;
   * lets Starlette's ``HTTPException`` for a malformed multipart body escape
     as a 500.
   The replacement keeps the same mapping of form fields to the input model,
   never fetches URLs, ignores fields the endpoint does not declare, and
   reports malformed bodies and too many parts as a 400 validation error.

2. Logging: BentoML logs every request that fails input validation at ERROR
   level with a full traceback. A client sending bad input is not a server
   error, and one line per bad request is enough, at DEBUG level.
"""

from __future__ import annotations

import json
import logging
from typing import Any, get_args

from _bentoml_sdk.typing_utils import is_list_type, is_union_type
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

log = logging.getLogger(__name__)

# Form parts one request may carry; Starlette's own default is 1000 of each.
DEFAULT_MAX_PARTS = 1000
_applied = False


def apply(max_parts: int = DEFAULT_MAX_PARTS) -> None:
    """Install the workarounds (idempotent)."""
    global _applied
    if _applied:
        return
    from _bentoml_impl.serde import MultipartSerde

    MultipartSerde.parse_request = _multipart_parser(max_parts)  # type: ignore[method-assign]
    logging.getLogger("bentoml._internal.server.http_app").addFilter(_demote_client_errors)
    _applied = True


def _multipart_parser(max_parts: int) -> Any:
    async def parse_request(self: Any, request: Any, cls: Any) -> Any:
        try:
            form = await request.form(max_files=max_parts, max_fields=max_parts)
        except (HTTPException, MultiPartException) as error:
            message = getattr(error, "detail", None) or getattr(error, "message", str(error))
            raise _validation_error(
                "invalid_multipart", f"malformed multipart body: {message}"
            ) from None
        data: dict[str, Any] = {}
        for name in form:
            if name not in cls.model_fields:
                continue  # not an input of this endpoint
            if name in cls.multipart_fields:
                values = form.getlist(name)  # UploadFiles, or strings the validator rejects
                annotation = cls.model_fields[name].annotation
                if is_union_type(annotation):
                    annotation = get_args(annotation)[0]
                data[name] = values if is_list_type(annotation) else values[0]
                continue
            value = form[name]
            if isinstance(value, UploadFile):
                value = await value.read()
            try:
                data[name] = json.loads(value)
            except ValueError:  # JSONDecodeError, or UnicodeDecodeError for binary data
                data[name] = value
        return cls.model_validate(data)

    return parse_request


def _validation_error(type_: str, message: str) -> ValidationError:
    details: list[InitErrorDetails] = [
        {"type": PydanticCustomError(type_, message), "loc": ("body",), "input": None}
    ]
    return ValidationError.from_exception_data("Input", details)


def _demote_client_errors(record: logging.LogRecord) -> bool:
    """Drop BentoML's ERROR traceback for invalid input; keep a one-line DEBUG record."""
    if record.exc_info and isinstance(record.exc_info[1], ValidationError):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("invalid input: %s", str(record.exc_info[1]).replace("\n", " "))
        return False
    return True
