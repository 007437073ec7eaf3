"""Import model artifacts into the local BentoML model store.

    python -m training.register                 # every model in the registry
    python -m training.register --model mnist-cnn --artifacts-dir /tmp/artifacts
    bentoml models list                         # shows them, with labels and metadata

Each artifact directory is verified (sha256 of every file) and copied verbatim
into a BentoML model named by the registry. The version is derived from the
artifact's checksums, so registering the same content twice yields the same
tag instead of a new version per run. ``BENTOML_HOME`` chooses the store.

Registering the released artifacts (``models/artifacts/``, the default) also pins
their tags as the versions the service serves, in ``models/served_models.json``;
artifacts from elsewhere are pinned only with ``--pin``.

``--activate URL`` then asks a running service that reads the same model store to
serve the registered versions, so that the export pipeline can end in a rollout::

    SERVING_API_KEY=<a key with the admin scope> \
        python -m training.register --model mnist-cnn --artifacts-dir /tmp/run \
        --activate http://localhost:3000 [--canary 10]

The service loads and checks each version before it serves it (``service.rollouts``);
a refusal is printed with the check that failed, and the exit status is 1.

The store entry's metadata summarises the artifact's metadata.json: metrics,
the test-split evaluation, ONNX signature and files, parity figures, the kept
variants, the sha256 of every file and the framework versions that made it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import bentoml

from models.artifacts import (
    METADATA_FILE,
    ONNX_FILE,
    ONNX_FILES,
    Artifact,
    ArtifactError,
    load_artifact,
)
from models.registry import (
    PACKAGE_ARTIFACTS_DIR,
    REGISTRY,
    ModelSpec,
    artifacts_root,
    get_spec,
    store_version,
)
from models.served import SERVED_MODELS_FILE, pin_served_tags
from training.common import add_model_selection_arguments
from training.log import configure_logging

log = logging.getLogger(__name__)

PROJECT = "digit-sentiment-serving"


def _plain(value: Any) -> Any:
    """A copy BentoML accepts as metadata: JSON types only, no None (BentoML rejects
    it) and no str subclasses such as ``torch.__version__`` (its YAML writer rejects them)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items() if item is not None}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value if item is not None]
    if isinstance(value, bool | int | float):
        return value
    return str(value)


def store_labels(spec: ModelSpec, artifact: Artifact) -> dict[str, str]:
    onnx_files = artifact.metadata.get("onnx", {}).get("files", {})
    return {
        "model": spec.name,
        "project": PROJECT,
        "stage": "smoke" if artifact.metadata.get("smoke") else "release",
        "formats": "+".join(
            [
                "pytorch",
                *(f"onnx-{precision}" for precision in ONNX_FILES if precision in onnx_files),
            ]
        ),
        "verified": str(bool(artifact.metadata.get("parity", {}).get("passed"))).lower(),
    }


def store_metadata(spec: ModelSpec, artifact: Artifact) -> dict[str, Any]:
    metadata = artifact.metadata
    onnx = metadata.get("onnx", {})
    parity = metadata.get("parity", {})
    variants = {
        precision: {
            key: result[key]
            for key in (
                "file",
                "bytes",
                "size_ratio",
                "accuracy",
                "accuracy_drop_pp",
                "kept",
                "reason",
                "target_device",
                "latency_ms",
                "speedup_on_target",
            )
            if key in result
        }
        for precision, result in metadata.get("variants", {}).items()
        if isinstance(result, dict) and "file" in result
    }
    training = metadata.get("training", {})
    return _plain(
        {
            "description": spec.description,
            "labels": list(spec.labels),
            "smoke": bool(metadata.get("smoke")),
            "metrics": metadata.get("metrics", {}),
            "evaluation": metadata.get("evaluation", {}),
            "sha256": metadata["files"],
            "onnx": {
                "inputs": list(spec.onnx.inputs),
                "outputs": list(spec.onnx.outputs),
                "opset": onnx.get("opset"),
                "files": onnx.get("files", {}),
            },
            "parity": {
                "passed": parity.get("passed", False),
                "tolerance": parity.get("tolerance"),
                "max_abs_diff": {
                    size: result["max_abs_diff"]
                    for size, result in parity.get("batch_sizes", {}).items()
                },
            },
            "variants": variants,
            "framework_versions": {
                "python": training.get("python", platform.python_version()),
                "torch_training": training.get("torch"),
                **{
                    f"{name}_export": version
                    for name, version in onnx.get("framework_versions", {}).items()
                },
                "bentoml": bentoml.__version__,
            },
            "training_command": training.get("command"),
        }
    )


def register_artifact(spec: ModelSpec, artifact_dir: Path | None = None) -> bentoml.Tag:
    """Verify one artifact and import it into the store; return its tag (idempotent)."""
    artifact = spec.load_artifact(artifact_dir)
    if artifact.has(ONNX_FILE) and not artifact.metadata.get("parity", {}).get("passed"):
        log.warning(
            "%s: %s was not verified against PyTorch (run python -m training.verify)",
            spec.name,
            ONNX_FILE,
        )
    tag = bentoml.Tag(spec.bento_model_name, store_version(artifact.metadata))
    try:
        existing = bentoml.models.get(tag)
        load_artifact(Path(existing.path), verify=True)
        log.info("%s is already in the model store", existing.tag)
        return existing.tag
    except bentoml.exceptions.NotFound:
        pass
    except Exception as error:  # damaged, or an entry another BentoML version wrote
        detail = " ".join(str(error).split())
        log.warning("%s is in the model store but cannot be used (%s): replacing it", tag, detail)
        shutil.rmtree(store_entry_dir(tag))
    with bentoml.models.create(
        tag,
        labels=store_labels(spec, artifact),
        metadata=store_metadata(spec, artifact),
    ) as model:
        for filename in [*artifact.metadata["files"], METADATA_FILE]:
            shutil.copy2(artifact.directory / filename, Path(model.path) / filename)
    log.info("registered %s", tag)
    return tag


def store_entry_dir(tag: bentoml.Tag) -> Path:
    """The store entry's directory (BentoML's own calls need an entry they can read)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.model_store_dir.get()) / tag.name / tag.version


class RegistrationError(RuntimeError):
    """One model could not be registered; the message names the model and the file."""


def register_all(names: list[str] | None = None, root: Path | None = None) -> list[bentoml.Tag]:
    specs = [get_spec(name) for name in names] if names else list(REGISTRY.values())
    tags = []
    for spec in specs:
        try:
            tags.append(register_artifact(spec, spec.artifact_dir(root)))
        except ArtifactError as error:
            raise RegistrationError(f"{spec.name}: {error}") from error
    return tags


# The admin key for --activate: from the environment, so that it is in no command line.
API_KEY_VARIABLE = "SERVING_API_KEY"
ACTIVATE_TIMEOUT_S = 120.0


class ActivationError(RuntimeError):
    """The service refused or did not answer; the message says why."""


def activate(url: str, tag: bentoml.Tag, canary_percent: float | None = None) -> dict[str, Any]:
    """Ask the service at ``url`` to serve ``tag`` (or to send it ``canary_percent`` of the
    requests); returns the model's status as the service answers it."""
    body: dict[str, Any] = {"version": tag.version}
    if canary_percent is not None:
        body["canary_percent"] = canary_percent
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get(API_KEY_VARIABLE):
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"{url.rstrip('/')}/admin/models/{tag.name}/activate",
        data=json.dumps(body).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=ACTIVATE_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]
        raise ActivationError(f"{tag}: {error.code} {detail}") from None
    except (urllib.error.URLError, TimeoutError) as error:
        raise ActivationError(f"{tag}: {url} did not answer ({error})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_selection_arguments(parser, "register")
    parser.add_argument(
        "--activate",
        metavar="URL",
        help="then ask the service at URL to serve the registered versions (an admin key "
        f"in ${API_KEY_VARIABLE})",
    )
    parser.add_argument(
        "--canary",
        type=float,
        metavar="PERCENT",
        help="with --activate: start each version as a canary with this share of the requests",
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"record the tags as the served versions in {SERVED_MODELS_FILE.name} "
        "(default: only when registering the released artifacts)",
    )
    args = parser.parse_args(argv)
    configure_logging()
    try:
        tags = register_all(args.model, args.artifacts_dir)
    except RegistrationError as error:
        # A damaged artifact is the operator's to fix, not a bug: one line, no traceback.
        print(f"register: {error}", file=sys.stderr)
        return 1
    for tag in tags:
        print(tag)
    pin = args.pin if args.pin is not None else is_release_root(args.artifacts_dir)
    if pin and pin_served_tags(str(tag) for tag in tags):
        print(f"pinned as served: {SERVED_MODELS_FILE}")
    if args.activate:
        for tag in tags:
            try:
                status = activate(args.activate, tag, args.canary)
            except ActivationError as error:
                print(f"register: activation refused: {error}", file=sys.stderr)
                return 1
            canary = status.get("canary")
            split = f", canary {canary['version']} at {canary['percent']:g} %" if canary else ""
            print(f"{tag.name}: serving {status['serving']}{split} in "
                  f"{len(status['workers'])} worker(s)")  # fmt: skip
    return 0


def is_release_root(root: Path | None) -> bool:
    """Whether ``root`` is the released artifacts' directory, whose versions are served."""
    return (root or artifacts_root()).resolve() == PACKAGE_ARTIFACTS_DIR.resolve()


if __name__ == "__main__":
    raise SystemExit(main())
