"""The one place that names every model: its module, config, labels, files,
ONNX signature and BentoML model name. Training, export, registration, the
service and the tests all read this; no model name or tag is typed elsewhere.

The released artifacts live in ``models/artifacts/<name>/``; set
``MODEL_ARTIFACTS_DIR`` to read and write them somewhere else.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.artifacts import Artifact, load_artifact

if TYPE_CHECKING:
    import torch
    from torch import nn

DIGIT_LABELS: tuple[str, ...] = tuple(str(d) for d in range(10))
SENTIMENT_LABELS: tuple[str, ...] = ("negative", "positive")

PACKAGE_ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"

MNIST_CLASSIFIER = "mnist-cnn"
SENTIMENT_CLASSIFIER = "sst2-bilstm"
DIGIT_GENERATOR = "digit-gan"


def artifacts_root() -> Path:
    return Path(os.environ.get("MODEL_ARTIFACTS_DIR", PACKAGE_ARTIFACTS_DIR))


@dataclass(frozen=True)
class OnnxSignature:
    """Input/output names of the exported graph and which axes stay dynamic."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ModelSpec:
    """``config`` and ``module`` name the architecture as ``module:Class``, imported on
    first use: reading specs (names, tags, files) does not import torch, so the
    serving parent process and the tools that only read metadata stay small."""

    name: str
    description: str
    config: str
    module: str
    onnx: OnnxSignature
    labels: tuple[str, ...] = ()
    extra_files: tuple[str, ...] = field(default=())

    @property
    def config_type(self) -> type:
        return _import(self.config)

    @property
    def module_type(self) -> type[nn.Module]:
        return _import(self.module)

    @property
    def bento_model_name(self) -> str:
        """The BentoML model store name; the version is derived from the artifact's content."""
        return self.name

    def bento_tag(self, metadata: Mapping[str, Any]) -> str:
        """The store tag of an artifact, from its metadata.json: ``name:content-version``."""
        return f"{self.bento_model_name}:{store_version(metadata)}"

    def artifact_dir(self, root: Path | None = None) -> Path:
        return (root or artifacts_root()) / self.name

    def config_from_dict(self, values: Mapping[str, Any]) -> Any:
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return self.config_type(**converted)

    def build(self, config: Any) -> nn.Module:
        if isinstance(config, Mapping):
            config = self.config_from_dict(config)
        return self.module_type(config)

    def load_artifact(self, directory: Path | None = None, *, verify: bool = True) -> Artifact:
        return load_artifact(directory or self.artifact_dir(), verify=verify)

    def load_module(self, artifact: Artifact, device: str | torch.device = "cpu") -> nn.Module:
        """Rebuild the module from the artifact's config and weights, in eval mode."""
        module = self.build(artifact.config)
        module.load_state_dict(artifact.state_dict(map_location="cpu"))
        return module.to(device).eval()


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name=MNIST_CLASSIFIER,
            description="MNIST digit classifier (two-convolution CNN)",
            config="models.digits:DigitClassifierConfig",
            module="models.digits:DigitClassifier",
            labels=DIGIT_LABELS,
            onnx=OnnxSignature(
                inputs=("images",),
                outputs=("logits",),
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            ),
        ),
        ModelSpec(
            name=SENTIMENT_CLASSIFIER,
            description="SST-2 sentiment classifier (BiLSTM, max-pooled)",
            config="models.sentiment:SentimentClassifierConfig",
            module="models.sentiment:SentimentClassifier",
            labels=SENTIMENT_LABELS,
            extra_files=("vocab.json",),
            onnx=OnnxSignature(
                inputs=("token_ids", "lengths"),
                outputs=("logits",),
                dynamic_axes={
                    "token_ids": {0: "batch", 1: "sequence"},
                    "lengths": {0: "batch"},
                    "logits": {0: "batch"},
                },
            ),
        ),
        ModelSpec(
            name=DIGIT_GENERATOR,
            description="Conditional DCGAN generator of 28×28 digits",
            config="models.gan:GeneratorConfig",
            module="models.gan:Generator",
            labels=DIGIT_LABELS,
            onnx=OnnxSignature(
                inputs=("latent", "labels"),
                outputs=("images",),
                dynamic_axes={
                    "latent": {0: "batch"},
                    "labels": {0: "batch"},
                    "images": {0: "batch"},
                },
            ),
        ),
    )
}


def store_version(metadata: Mapping[str, Any]) -> str:
    """A short, stable model store version: a hash of the artifact's file checksums.

    Registering the same content twice gives the same version, and the service
    can pin the exact version it expects from the artifact's metadata.json alone.
    """
    manifest = json.dumps(metadata["files"], sort_keys=True).encode()
    return hashlib.sha256(manifest).hexdigest()[:16]


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}") from None
