"""Which model store entries the service loads, and reading them back as artifacts.

``python -m training.register`` imports each artifact directory verbatim into
the BentoML model store under ``<registry name>:<content version>``. The
service pins the same tag by reading the committed artifact's metadata.json
(kilobytes; the weights are never read from there), so ``make serve`` serves
exactly the models in the repository even when the store holds other versions.
A ``SERVING_<MODEL>_TAG`` setting overrides this; without either, the newest
version in the store (``<name>:latest``) is used.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import bentoml

from models.artifacts import METADATA_FILE, Artifact, load_artifact, read_json
from models.registry import ModelSpec, artifacts_root


def resolve_tag(spec: ModelSpec, override: str | None = None, root: Path | None = None) -> str:
    if override:
        return override
    metadata_path = spec.artifact_dir(root or artifacts_root()) / METADATA_FILE
    if metadata_path.is_file():
        return spec.bento_tag(read_json(metadata_path))
    return f"{spec.bento_model_name}:latest"


def load_stored_artifact(model_path: str | Path) -> Artifact:
    """The store entry's directory is an artifact directory: load it, verifying checksums."""
    return load_artifact(Path(model_path), verify=True)


def check_store_entries(tags: Iterable[str]) -> None:
    """Stop with one line naming the entry and the problem if a model to serve is damaged.

    BentoML reads each entry's ``model.yaml`` when the server starts and reports
    a damaged one as a long parser traceback that names no model. A missing entry
    is left to BentoML, whose message says so.
    """
    for tag in tags:
        try:
            bentoml.models.get(tag)
        except bentoml.exceptions.NotFound:
            continue
        except Exception as error:  # a YAML or schema error from the entry's files
            detail = " ".join(str(error).split())
            raise SystemExit(f"model store entry {tag} is damaged: {detail}") from None
