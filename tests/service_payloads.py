"""What the service tests send and record: encoded digits, multipart bodies, and a
predictor wrapper that records each model call's batch size."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from bench.multipart import Part, multipart_body


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    """An image file of ``pixels`` in ``fmt`` (JPEG at quality 95)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def multipart(parts: Sequence[Part]) -> tuple[bytes, str]:
    return multipart_body(parts, boundary="test-boundary-7d4a1f")


class RecordingPredictor:
    """Wraps a real predictor and records the batch size of every call."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.batch_sizes: list[int] = []

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(inputs[0]))
        return self.predictor(*inputs)

    def describe(self) -> str:
        return self.predictor.describe()
