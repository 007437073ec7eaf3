"""Request bodies → validated endpoint inputs, for the service's HTTP path.

The body arrives whole and already within the size limit (``service.http``).

* ``multipart/form-data`` is split at its boundary delimiters (``bytes.split``,
  in C) into bytes per part: no temporary files, no upload objects, no
  byte-by-byte state machine. python-multipart's streaming parser, which the
  service used before, spent 22 µs on a one-image form and 13 ms on a
  1,024-image one, walking every header byte in Python; this takes 4 µs and
  1.9 ms (``python -m bench.micro``).
  A part is a file when its ``Content-Disposition`` has a ``filename``.
* A raw image body (``Content-Type: image/png``, ``image/jpeg``, ...) is one
  image, for ``/classify``.
* JSON is validated by pydantic-core directly from the bytes
  (``model_validate_json``) against models built from the same annotated types
  as the OpenAPI schema (``service.schemas``), so the limits, and the error
  types a client sees (``missing``, ``string_too_long``, ``json_invalid``...),
  are those of the documented schema.

Every problem is raised as a ``RequestError`` naming the field; nothing here
knows about the models.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image
from pydantic import BaseModel, ValidationError
from python_multipart.multipart import parse_options_header

from service.errors import Location, Problem, RequestError
from service.imaging import ImageError, open_image

ModelT = TypeVar("ModelT", bound=BaseModel)

NOT_A_FILE = "expected an image file upload (multipart/form-data file part)"


@dataclass(frozen=True)
class FormPart:
    name: str
    is_file: bool
    data: bytes


# One parameter of a header value: `; name=token` or `; name="text without \ or "`.
_SIMPLE_PARAMETER = re.compile(
    rb';[ \t]*([!#$%&\'+.^_`|~0-9A-Za-z-]+)=(?:"([^"\\]*)"|([^;" \t]*))[ \t]*'
)
_SIMPLE_VALUE = re.compile(rb"[ \t]*([^; \t]*)[ \t]*")


def header_options(value: bytes) -> dict[bytes, bytes]:
    """The parameters of a header value such as ``form-data; name="images"``, by lower-case
    name. The plain forms browsers and clients send are read by one regular expression;
    anything else (escapes, RFC 2231 ``name*=``) by python-multipart, which costs 7 µs."""
    start = _SIMPLE_VALUE.match(value)
    options: dict[bytes, bytes] = {}
    position = start.end() if start else 0
    while position < len(value):
        parameter = _SIMPLE_PARAMETER.match(value, position)
        if parameter is None:
            return parse_options_header(value)[1]
        name, quoted, plain = parameter.groups()
        options[name.lower()] = quoted if quoted is not None else plain
        position = parameter.end()
    return options


# A header line of a part: a field name (RFC 9110 token), a colon, the value.
_HEADER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*")
# The start of a header line the body ends in the middle of: still a token so far.
_HEADER_LINE_START = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*(:[^\r\n]*)?")


def parse_form(body: bytes, content_type: str, *, max_parts: int) -> list[FormPart]:
    """A ``multipart/form-data`` body (RFC 7578) → its complete parts, in order.

    A part cut off by the end of the body is not returned (the request then
    lacks that field); more than ``max_parts`` parts is refused, and so is a
    body without the boundary or with a header line that is not ``name: value``.
    """
    boundary = header_options(content_type.encode("latin-1")).get(b"boundary")
    if not boundary:
        raise RequestError.single(
            "invalid_multipart", "multipart body without a boundary", ("body",)
        )
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        after_first = len(delimiter)
    else:  # a preamble before the first delimiter is allowed, and ignored
        found = body.find(b"\r\n" + delimiter)
        if found < 0:
            raise _malformed("the boundary never occurs in the body")
        after_first = found + 2 + len(delimiter)
    # Each piece starts right after a delimiter: "--" for the closing one, else
    # (transport padding and) CRLF, the part's header lines, an empty line, its data.
    # Split at most max_parts + 1 times, so that a body of nothing but delimiters
    # costs no more than a form of max_parts parts.
    pieces = body[after_first:].split(b"\r\n" + delimiter, max_parts + 1)
    parts: list[FormPart] = []
    for index, piece in enumerate(pieces):
        if piece.startswith(b"--"):
            break  # the closing delimiter; anything after it is an epilogue
        if index >= max_parts:
            raise RequestError.single(
                "too_many_parts", f"more than {max_parts} parts in one request", ("body",)
            )
        part = _form_part(piece, ended=index < len(pieces) - 1)
        if part is not None:
            parts.append(part)
    return parts


# The head of a part as browsers, curl, requests and httpx write it: one regular
# expression reads it (1 µs); any other head takes the general path below.
_PLAIN_PART_HEAD = re.compile(
    rb'[ \t]*\r\nContent-Disposition: form-data; name="([^"\\\r\n]*)"'
    rb'(; filename="[^"\\\r\n]*")?(?:\r\nContent-Type: [^\r\n]*)?\r\n\r\n',
    re.IGNORECASE,
)


def _form_part(piece: bytes, *, ended: bool) -> FormPart | None:
    """One piece between two delimiters → its part; None for a part without a name,
    and for the last piece when the body stops before its closing delimiter."""
    plain = _PLAIN_PART_HEAD.match(piece)
    if plain is not None:
        if not ended:
            return None
        name, filename = plain.groups()
        return FormPart(name.decode("utf-8", "replace"), filename is not None, piece[plain.end() :])
    line_end = piece.find(b"\r\n")
    if line_end < 0 or piece[:line_end].strip(b" \t"):
        if ended or piece.strip(b" \t\r"):
            raise _malformed("a boundary delimiter is not followed by a line break")
        return None
    section = piece[line_end + 2 :]
    if section.startswith(b"\r\n"):  # a part without header lines
        head, data, complete = b"", section[2:], True
    else:
        head, separator, data = section.partition(b"\r\n\r\n")
        complete = bool(separator)
    lines = head.split(b"\r\n") if head else []
    # The last line of an unfinished header section may stop anywhere in it.
    finished_lines = lines if complete else lines[:-1]
    if not all(_HEADER_LINE.fullmatch(line) for line in finished_lines) or not (
        complete or not lines or _HEADER_LINE_START.fullmatch(lines[-1])
    ):
        raise _malformed("a part's header line is not 'name: value'")
    if not (complete and ended):
        return None
    disposition = b""
    for line in lines:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-disposition":
            disposition = value.strip()
    disposition_options = header_options(disposition)
    field = disposition_options.get(b"name")
    if field is None:
        return None
    return FormPart(field.decode("utf-8", "replace"), b"filename" in disposition_options, data)


def _malformed(reason: str) -> RequestError:
    return RequestError.single(
        "invalid_multipart", f"malformed multipart body: {reason}", ("body",)
    )


def form_files(
    parts: Sequence[FormPart], field: str, *, max_items: int | None = None
) -> list[tuple[bytes, Location]]:
    """The files sent under ``field``: with ``max_items``, a list of 1..max_items; without,
    exactly one (the first). Each comes with its location for error messages."""
    values = [part for part in parts if part.name == field]
    if not values:
        raise RequestError.single("missing", "Field required", (field,))
    if max_items is None:
        values = values[:1]
        locations: list[Location] = [(field,)]
    else:
        if len(values) > max_items:
            raise RequestError.single(
                "too_long",
                f"List should have at most {max_items} items after validation, not {len(values)}",
                (field,),
            )
        locations = [(field, index) for index in range(len(values))]
    problems = [
        Problem("not_a_file", NOT_A_FILE, loc)
        for part, loc in zip(values, locations, strict=True)
        if not part.is_file
    ]
    if problems:
        raise RequestError(problems)
    return [(part.data, loc) for part, loc in zip(values, locations, strict=True)]


def identify_images(
    files: Sequence[tuple[bytes, Location]], *, max_pixels: int
) -> list[Image.Image]:
    """Uploaded bytes → identified, size-checked images (pixels still compressed);
    every bad file is reported at once."""
    images, problems = [], []
    for data, loc in files:
        try:
            images.append(open_image(data, max_pixels=max_pixels))
        except ImageError as error:
            problems.append(Problem(error.type, error.message, loc))
    if problems:
        raise RequestError(problems)
    return images


def parse_json(model: type[ModelT], body: bytes) -> ModelT:
    """Validate a JSON body against ``model``; an empty body is an empty object."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as error:
        raise RequestError(
            [
                Problem(detail["type"], detail["msg"], tuple(detail["loc"]))
                for detail in error.errors(include_url=False, include_context=False)
            ]
        ) from None
