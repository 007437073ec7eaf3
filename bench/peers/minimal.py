"""The work every classify peer does: decode an upload minimally, run the ONNX model."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from models.preprocessing import MNIST_MEAN, MNIST_STD

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_PATH = REPO_ROOT / "models" / "artifacts" / "mnist-cnn" / "model.onnx"
# The peers' batching parameters, set by the benchmark configuration.
MAX_BATCH_SIZE = int(os.environ.get("PEER_MAX_BATCH_SIZE", "64"))
MAX_LATENCY_MS = float(os.environ.get("PEER_MAX_LATENCY_MS", "2"))


def decode(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes → a normalised ``1×28×28`` float32 row (no centring, no polarity)."""
    image = Image.open(io.BytesIO(data)).convert("L").resize((28, 28))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return ((pixels - MNIST_MEAN) / MNIST_STD)[np.newaxis]


class Classifier:
    """The project's ONNX classifier on one CPU thread; rows in, digits and probabilities out."""

    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(MODEL_PATH), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, rows: np.ndarray) -> list[dict]:
        logits = self.session.run(None, {self.input_name: rows})[0]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        return [
            {"digit": int(row.argmax()), "probabilities": row.tolist()} for row in probabilities
        ]
