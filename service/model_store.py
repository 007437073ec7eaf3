"""Which model store entries the service loads, and reading them back as artifacts.

``python -m training.register`` imports each artifact directory verbatim into
the BentoML model store under ``<registry name>:<content version>`` and, when
it registers the released artifacts, records those tags in
``service/served_models.json``. That file is the one place that says which
version of each model the service serves: the bento carries it, and nothing
else of the artifacts tree, so ``make serve`` and a built bento serve exactly
the released models even when the store holds other versions. A
``SERVING_<ENDPOINT>_TAG`` setting overrides it; a model it does not name is
served at ``<name>:latest``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import bentoml

from models.artifacts import Artifact, load_artifact
from models.registry import ModelSpec, get_spec
from service.settings import MODEL_KEYS

SERVED_MODELS_FILE = Path(__file__).resolve().with_name("served_models.json")


class ServedModelsError(ValueError):
    """The file of served versions cannot be read; the message names it."""


def served_tags(path: Path | None = None) -> dict[str, str]:
    """Registry name → the pinned store tag (none pinned when the file does not exist)."""
    path = path or SERVED_MODELS_FILE
    if not path.is_file():
        return {}
    try:
        tags = json.loads(path.read_text())
    except ValueError as error:
        raise ServedModelsError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(tags, dict) or not all(
        isinstance(tag, str) and tag.startswith(f"{name}:") for name, tag in tags.items()
    ):
        raise ServedModelsError(f'{path} must map each model name to "<name>:<version>"')
    return tags


def resolve_tag(
    spec: ModelSpec, override: str | None = None, pins: Mapping[str, str] | None = None
) -> str:
    if override:
        return override
    pinned = (served_tags() if pins is None else pins).get(spec.name)
    return pinned or f"{spec.bento_model_name}:latest"


def served_model_tags(overrides: Mapping[str, str | None]) -> dict[str, str]:
    """Model key → the tag to serve, for the service's models (``MODEL_KEYS``); a file
    of pins that cannot be read stops the start with one line naming it."""
    try:
        pins = served_tags()
    except ServedModelsError as error:
        raise SystemExit(f"cannot start: {error}") from None
    return {
        key: resolve_tag(get_spec(name), overrides.get(key), pins)
        for key, name in MODEL_KEYS.items()
    }


def pin_served_tags(tags: Iterable[str], path: Path | None = None) -> bool:
    """Record these tags as the served versions of their models, keeping the others'.

    The file is rewritten only when a pin changes (so that registering the same
    release again leaves the checkout clean); returns whether it changed.
    """
    path = path or SERVED_MODELS_FILE
    current = served_tags(path)
    pinned = {**current, **{str(tag).partition(":")[0]: str(tag) for tag in tags}}
    if pinned == current:
        return False
    path.write_text(json.dumps(dict(sorted(pinned.items())), indent=2) + "\n")
    return True


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
