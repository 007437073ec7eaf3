"""Import model artifacts into the local BentoML model store.

    python -m training.register                 # every model in the registry
    python -m training.register --model mnist-cnn --artifacts-dir /tmp/artifacts

Each artifact directory is verified (sha256 of every file) and copied verbatim
into a BentoML model named by the registry. The version is derived from the
artifact's checksums, so registering the same content twice yields the same
tag instead of a new version per run. ``BENTOML_HOME`` chooses the store.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from pathlib import Path

import bentoml
import onnx
import onnxruntime
import torch

from models.artifacts import Artifact
from models.registry import REGISTRY, ModelSpec, artifacts_root, get_spec

log = logging.getLogger(__name__)


def content_version(artifact: Artifact) -> str:
    """A short, stable version string: a hash of the artifact's file checksums."""
    manifest = json.dumps(artifact.metadata["files"], sort_keys=True).encode()
    return hashlib.sha256(manifest).hexdigest()[:16]


def register_artifact(spec: ModelSpec, artifact_dir: Path | None = None) -> bentoml.Tag:
    """Verify one artifact and import it into the store; return its tag (idempotent)."""
    artifact = spec.load_artifact(artifact_dir)
    tag = bentoml.Tag(spec.bento_model_name, content_version(artifact))
    try:
        existing = bentoml.models.get(tag)
        log.info("%s is already in the model store", existing.tag)
        return existing.tag
    except bentoml.exceptions.NotFound:
        pass
    metrics = artifact.metadata.get("metrics", {})
    with bentoml.models.create(
        tag,
        labels={"model": spec.name, "task": spec.description, "owner": "digit-sentiment-serving"},
        metadata={
            "description": spec.description,
            "labels": list(spec.labels),
            "metrics": metrics,
            "sha256": artifact.metadata["files"],
            "onnx_inputs": list(spec.onnx.inputs),
            "onnx_outputs": list(spec.onnx.outputs),
            "framework_versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
        },
    ) as model:
        for filename in [*artifact.metadata["files"], "metadata.json"]:
            shutil.copy2(artifact.directory / filename, Path(model.path) / filename)
    log.info("registered %s", tag)
    return tag


def register_all(names: list[str] | None = None, root: Path | None = None) -> list[bentoml.Tag]:
    specs = [get_spec(name) for name in names] if names else list(REGISTRY.values())
    return [register_artifact(spec, spec.artifact_dir(root)) for spec in specs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(REGISTRY),
                        help="register only this model (repeatable); default: all")
    parser.add_argument("--artifacts-dir", type=Path, default=None,
                        help=f"root of the artifact directories (default: {artifacts_root()})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for tag in register_all(args.model, args.artifacts_dir):
        print(tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
