"""Request and response schemas of the HTTP API, with the examples the OpenAPI page shows.

The same pydantic models validate a JSON body (``service.requests.parse_json``)
and document it (``service.openapi``), so the limits and the error types a
client sees (``missing``, ``string_too_long``, ``json_invalid``...) are those of
the documented schema. Limits come from the settings and label names from the
model's spec, so each schema is built by a function, once per service.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr, create_model

from service.settings import Limits

MAX_SEED = 2**63 - 1
EXAMPLE_TEXTS = ["A gripping, beautifully acted film.", "Dull and far too long."]

# The model store version that answered: in every single answer's JSON (a list answer
# has no room for it; every answer carries it in the X-Model-Version header).
ModelVersion = Annotated[
    str | None,
    Field(description="The model store version that produced the answer (single answers; "
          "every answer also has it in X-Model-Version).", examples=["98ebb8703c5b9e8e"]),
]  # fmt: skip


class DigitPrediction(BaseModel):
    digit: int = Field(description="The most probable digit.", examples=[7])
    confidence: float = Field(description="Its probability.", examples=[0.998])
    probabilities: list[float] = Field(
        description="Probability of each digit 0–9, summing to 1.",
        examples=[[0.0, 0.0, 0.001, 0.0, 0.0, 0.0, 0.0, 0.998, 0.0, 0.001]],
    )
    model_version: ModelVersion = None


class GeneratedDigit(BaseModel):
    digit: int = Field(description="The digit this image was generated as.", examples=[7])
    png: str = Field(description="A 28×28 grayscale PNG, base64-encoded.")


class GeneratedDigits(BaseModel):
    seed: int = Field(description="The seed used; send it again to get the same images.")
    images: list[GeneratedDigit]
    model_version: ModelVersion = None


def _model_name(endpoint: str, suffix: str) -> str:
    return "".join(part.capitalize() for part in endpoint.split("_")) + suffix


def text_inputs(endpoint: str, limits: Limits) -> tuple[type[BaseModel], type[BaseModel]]:
    """The bodies of ``/<endpoint>`` (one text) and ``/<endpoint>_batch`` (a list)."""
    text = Annotated[
        StrictStr,
        Field(
            min_length=1,
            max_length=limits.max_text_chars,
            description=f"Raw English text, 1–{limits.max_text_chars} characters.",
            examples=EXAMPLE_TEXTS[:1],
        ),
    ]
    texts = Annotated[
        list[text],
        Field(
            min_length=1,
            max_length=limits.max_items_per_request,
            description=f"1–{limits.max_items_per_request} texts, classified independently.",
            examples=[EXAMPLE_TEXTS],
        ),
    ]
    single = create_model(_model_name(endpoint, "Input"), text=(text, ...))
    batch = create_model(_model_name(endpoint, "BatchInput"), texts=(texts, ...))
    return single, batch


def text_prediction(endpoint: str, labels: tuple[str, ...]) -> type[BaseModel]:
    """The answer for one text: its label and the probability of the last label."""
    return create_model(
        _model_name(endpoint, "Prediction"),
        label=(Literal[labels], Field(examples=[labels[-1]])),  # type: ignore[valid-type]
        score=(
            float,
            Field(description=f"P({labels[-1]}), in [0, 1].", examples=[0.97]),
        ),
        model_version=(ModelVersion, None),
    )


def generate_input(endpoint: str, limits: Limits, classes: int) -> type[BaseModel]:
    """The body of a generation request: how many images, of which digit, from which seed."""
    count = Annotated[
        StrictInt,
        Field(
            ge=1,
            le=limits.max_generate_n,
            description=f"How many images to generate (1–{limits.max_generate_n}).",
            examples=[8],
        ),
    ]
    digit = Annotated[
        StrictInt | None,
        Field(
            ge=0,
            le=classes - 1,
            description=f"The digit to draw (0–{classes - 1}); omit for random digits.",
            examples=[7],
        ),
    ]
    seed = Annotated[
        StrictInt | None,
        Field(
            ge=0,
            le=MAX_SEED,
            description="Seed of the latent vectors; the same seed, n and digit always give "
            "byte-identical images. Omit for a random seed (returned in the answer).",
            examples=[1234],
        ),
    ]
    grid = Annotated[
        StrictBool,
        Field(
            description="Answer with one PNG grid of all images (Content-Type image/png, "
            "seed in the X-Seed header) instead of JSON.",
        ),
    ]
    return create_model(
        _model_name(endpoint, "Input"),
        n=(count, 1),
        digit=(digit, None),
        seed=(seed, None),
        grid=(grid, False),
    )
