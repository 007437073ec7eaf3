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

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import bentoml
import cattrs
import yaml

from models.artifacts import Artifact, load_artifact
from models.registry import ModelSpec, get_spec
from models.served import ServedModelsError, served_tags
from service.settings import model_keys

# BentoML's module that reads model.yaml, and logs a YAML error before raising it.
BENTOML_MODEL_LOGGER = "bentoml._internal.models.model"


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


def version_of(tag: object) -> str:
    """The version part of a store tag (``name:version``, a string or a ``bentoml.Tag``)."""
    return str(tag).partition(":")[2]


def load_stored_artifact(model_path: str | Path) -> Artifact:
    """The store entry's directory is an artifact directory: load it, verifying checksums."""
    return load_artifact(Path(model_path), verify=True)


def check_store_entries(tags: Iterable[str]) -> None:
    """Stop with one line naming the entry and what to do if a model to serve is not in
    the store, or is there but cannot be read.

    BentoML reports a missing entry as a failed download from BentoCloud, and a
    damaged ``model.yaml`` (or one another BentoML version wrote in a shape this one
    does not read) as a long parser traceback that names no model. Where a
    BentoCloud context is configured, a missing entry is left to BentoML, which
    pulls it from there.
    """
    for tag in tags:
        try:
            with _quiet(BENTOML_MODEL_LOGGER):
                bentoml.models.get(tag)
        except bentoml.exceptions.NotFound:
            if _cloud_configured():
                continue
            raise SystemExit(
                f"cannot start: {tag} is not in the model store {_store_dir()}: run make "
                "register (python -m training.register) to add the released models"
            ) from None
        except Exception as error:  # a YAML or schema error from the entry's files
            raise SystemExit(damaged_entry_line(tag, entry_problem(tag, error))) from None


def damaged_entry_line(tag: str, problem: str) -> str:
    """The line that stops the start when the store entry ``tag`` cannot be used."""
    return (
        f"model store entry {tag} is damaged: {problem}: run make register "
        "(python -m training.register) to replace it"
    )


def entry_problem(tag: str, error: Exception) -> str:
    """What is wrong with the store entry ``tag``, which BentoML failed to read with
    ``error``, in a few words: the file, the problem, and which BentoML version wrote
    it where that is not this one."""
    name, _, version = str(tag).partition(":")
    if version in ("", "latest"):  # BentoML's file naming the newest version
        with contextlib.suppress(OSError):
            version = (_store_dir() / name / "latest").read_text().strip()
    path = _store_dir() / name / version / "model.yaml"
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        problem = (
            f"not valid YAML: {error.problem} (line {mark.line + 1}, column {mark.column + 1})"
        )
    elif isinstance(error, cattrs.BaseValidationError):
        problem = "; ".join(cattrs.transform_error(error))
    elif isinstance(error, KeyError):
        problem = f"no {error.args[0]!r} field"
    else:
        problem = " ".join(str(error).split())
    written = ""
    with contextlib.suppress(Exception):
        content = yaml.safe_load(path.read_text())
        writer = str(content["context"]["bentoml_version"])
        if writer != bentoml.__version__:
            written = f" (written by BentoML {writer}, this is {bentoml.__version__})"
    return f"{path}: {problem}{written}"


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The logger ``name`` silent inside (BentoML logs a YAML error before raising it)."""
    logger = logging.getLogger(name)
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _store_dir() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.model_store_dir.get())


def _cloud_configured() -> bool:
    """Whether BentoML has a BentoCloud login to pull missing models from."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.cloud_config.get()).is_file()
