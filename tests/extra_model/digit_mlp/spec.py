"""The model's one declaration, found through ``MODEL_SPECS=digit_mlp.spec``."""

from __future__ import annotations

from models.registry import (
    DIGIT_LABELS,
    ModelSpec,
    OnnxSignature,
    Verification,
    digit_image_examples,
)

SPECS = [
    ModelSpec(
        name="digit-mlp",
        description="MNIST digit classifier (one hidden layer)",
        config="digit_mlp.model:DigitMLPConfig",
        module="digit_mlp.model:DigitMLP",
        labels=DIGIT_LABELS,
        endpoint="classify_mlp",
        task="digit-classification",
        training="digit_mlp.train",
        example=digit_image_examples,
        verification=Verification(
            data="training.evaluation:mnist_test_split", split="MNIST test split"
        ),
        onnx=OnnxSignature(
            inputs=("images",),
            outputs=("logits",),
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        ),
    )
]
