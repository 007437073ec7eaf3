"""Which model store entries the service loads, and reading them back as artifacts.

``python -m training.register`` imports each artifact directory verbatim into
the BentoML model store under ``<registry name>:<content version>`` and, when
it registers the released artifacts, records those tags in
``models/served_models.json`` (``models.served``). That file is the one place that says which
version of each model the service serves: the bento carries it, and nothing
else of the artifacts tree, so ``make serve`` and a built bento serve exactly
the released models even when the store holds other versions. A
``SERVING_<ENDPOINT>_TAG`` setting overrides it; a model it does not name is
served at ``<name>:latest``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import bentoml

from models.artifacts import Artifact, load_artifact
from models.registry import ModelSpec, get_spec
from models.served import ServedModelsError, served_tags
from service.settings import model_keys


def resolve_tag(
    spec: ModelSpec, override: str | None = None, pins: Mapping[str, str] | None = None
) -> str:
    if override:
        return override
    pinned = (served_tags() if pins is None else pins).get(spec.name)
    return pinned or f"{spec.bento_model_name}:latest"


def served_model_tags(overrides: Mapping[str, str | None]) -> dict[str, str]:
    """Model key → the tag to serve, for the service's models (``model_keys``); a file
    of pins that cannot be read stops the start with one line naming it."""
    try:
        pins = served_tags()
    except ServedModelsError as error:
        raise SystemExit(f"cannot start: {error}") from None
    return {
        key: resolve_tag(get_spec(name), overrides.get(key), pins)
        for key, name in model_keys().items()
    }


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
