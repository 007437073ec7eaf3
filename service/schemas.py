"""Request and response schemas of the HTTP API, with the examples the OpenAPI page shows.

Input types carry their limits (from ``service.settings``) so that BentoML's
request validation rejects a wrong type, a missing field or an out-of-range
value with a 400 that names the field, before the service's code runs.
Uploaded images are identified and size-checked here, from the header only
(see ``service.imaging``); their pixels are decoded later, per request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, BeforeValidator, Field, StrictBool, StrictInt, StrictStr
from pydantic_core import PydanticCustomError
from starlette.datastructures import UploadFile

from service.imaging import SUPPORTED_TEXT, ImageError, open_image
from service.settings import current_settings

LIMITS = current_settings().limits
MAX_SEED = 2**63 - 1


def _image_from_upload(value: Any) -> Image.Image:
    """A multipart file part → an identified, size-checked (still compressed) PIL image."""
    if not isinstance(value, UploadFile):
        raise PydanticCustomError(
            "not_a_file",
            "expected an image file upload (multipart/form-data file part)",
        )
    data = value.file.read()
    try:
        return open_image(data, max_pixels=LIMITS.max_image_pixels)
    except ImageError as error:
        raise PydanticCustomError(error.type, error.message) from None


ImageUpload = Annotated[
    Image.Image,
    BeforeValidator(_image_from_upload),
    Field(description=f"A digit image: {SUPPORTED_TEXT}, any size and mode, either polarity."),
]

Text = Annotated[
    StrictStr,
    Field(
        min_length=1,
        max_length=LIMITS.max_text_chars,
        description=f"Raw English text, 1–{LIMITS.max_text_chars} characters.",
        examples=["A gripping, beautifully acted film."],
    ),
]

ImageList = Annotated[
    list[ImageUpload],
    Field(
        min_length=1,
        max_length=LIMITS.max_items_per_request,
        description=f"1–{LIMITS.max_items_per_request} digit images, one file part each.",
    ),
]

TextList = Annotated[
    list[Text],
    Field(
        min_length=1,
        max_length=LIMITS.max_items_per_request,
        description=f"1–{LIMITS.max_items_per_request} texts, classified independently.",
        examples=[["A gripping, beautifully acted film.", "Dull and far too long."]],
    ),
]

ImageCount = Annotated[
    StrictInt,
    Field(
        ge=1,
        le=LIMITS.max_generate_n,
        description=f"How many images to generate (1–{LIMITS.max_generate_n}).",
        examples=[8],
    ),
]
OptionalDigit = Annotated[
    StrictInt | None,
    Field(ge=0, le=9, description="The digit to draw (0–9); omit for random digits.", examples=[7]),
]
OptionalSeed = Annotated[
    StrictInt | None,
    Field(
        ge=0,
        le=MAX_SEED,
        description="Seed of the latent vectors; the same seed, n and digit always give "
        "byte-identical images. Omit for a random seed (returned in the answer).",
        examples=[1234],
    ),
]
GridFlag = Annotated[
    StrictBool,
    Field(
        description="Answer with one PNG grid of all images (Content-Type image/png, "
        "seed in the X-Seed header) instead of JSON.",
    ),
]


class DigitPrediction(BaseModel):
    digit: int = Field(description="The most probable digit.", examples=[7])
    confidence: float = Field(description="Its probability.", examples=[0.998])
    probabilities: list[float] = Field(
        description="Probability of each digit 0–9, summing to 1.",
        examples=[[0.0, 0.0, 0.001, 0.0, 0.0, 0.0, 0.0, 0.998, 0.0, 0.001]],
    )


class SentimentPrediction(BaseModel):
    label: Literal["negative", "positive"] = Field(examples=["positive"])
    score: float = Field(description="P(positive), in [0, 1].", examples=[0.97])


class GeneratedDigit(BaseModel):
    digit: int = Field(description="The digit this image was generated as.", examples=[7])
    png: str = Field(description="A 28×28 grayscale PNG, base64-encoded.")


class GeneratedDigits(BaseModel):
    seed: int = Field(description="The seed used; send it again to get the same images.")
    images: list[GeneratedDigit]
