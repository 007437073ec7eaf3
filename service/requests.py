"""Request bodies → validated endpoint inputs, for the service's HTTP path.

The body arrives whole and already within the size limit (``service.http``).

* ``multipart/form-data`` is parsed in one pass by python-multipart's streaming
  parser straight into bytes per part: no temporary files, no upload objects.
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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import Location, Problem, RequestError
from service.imaging import ImageError, open_image
from service.schemas import (
    GridFlag,
    ImageCount,
    OptionalDigit,
    OptionalSeed,
    Text,
    TextList,
)

ModelT = TypeVar("ModelT", bound=BaseModel)

NOT_A_FILE = "expected an image file upload (multipart/form-data file part)"


@dataclass(frozen=True)
class FormPart:
    name: str
    is_file: bool
    data: bytes


def parse_form(body: bytes, content_type: str, *, max_parts: int) -> list[FormPart]:
    """A ``multipart/form-data`` body → its complete parts, in order.

    A part cut off by the end of the body is not returned (the request then
    lacks that field); more than ``max_parts`` parts is refused.
    """
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestError.single(
            "invalid_multipart", "multipart body without a boundary", ("body",)
        )
    parts: list[FormPart] = []
    chunks: list[bytes] = []
    headers: dict[bytes, bytes] = {}
    header_field = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        if len(parts) >= max_parts:
            raise RequestError.single(
                "too_many_parts", f"more than {max_parts} parts in one request", ("body",)
            )
        chunks.clear()
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name")
        if name is not None:
            parts.append(
                FormPart(
                    name.decode("utf-8", "replace"), b"filename" in disposition, b"".join(chunks)
                )
            )

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
    except MultipartParseError as error:
        raise RequestError.single(
            "invalid_multipart", f"malformed multipart body: {error}", ("body",)
        ) from None
    return parts


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


class SentimentInput(BaseModel):
    text: Text


class SentimentBatchInput(BaseModel):
    texts: TextList


class GenerateInput(BaseModel):
    n: ImageCount = 1
    digit: OptionalDigit = None
    seed: OptionalSeed = None
    grid: GridFlag = False


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
