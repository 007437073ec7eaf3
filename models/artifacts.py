"""The artifact format: one directory per model, verified by checksum on load.

    weights.pt      state_dict, loaded with ``torch.load(..., weights_only=True)``
    config.json     the config dataclass the module was built with
    metadata.json   labels, preprocessing constants, metrics, data set, the exact
                    training command, framework versions and the sha256 of every
                    other file in the directory
    vocab.json      (sentiment only) the vocabulary, saved with the weights
    report.png      training curves, confusion matrix or digit grid
    model.onnx      (after export) the fp32 ONNX graph; model.int8.onnx and
                    model.fp16.onnx where those variants were kept

Artifacts are never edited in place: ``staged_artifact`` copies the current
directory to a temporary sibling, lets the caller change it, recomputes the
checksums and swaps it in with a rename, so a failure leaves the old artifact
untouched and never a half-written one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch is imported where weights are read or written: the serving parent process
# reads artifacts' metadata only and never needs it.
if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
VOCAB_FILE = "vocab.json"
REPORT_FILE = "report.png"
ONNX_FILE = "model.onnx"
# Optional ONNX variants, present only where the variant policy kept them (accuracy
# and size; training/variants.py); metadata.json's "onnx"/"files" lists them.
ONNX_INT8_FILE = "model.int8.onnx"
ONNX_FP16_FILE = "model.fp16.onnx"
ONNX_FILES: dict[str, str] = {"fp32": ONNX_FILE, "int8": ONNX_INT8_FILE, "fp16": ONNX_FP16_FILE}


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or does not match its checksums."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    """A JSON file's content; a damaged file is an ``ArtifactError`` that names it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno});"
            " the file is truncated or damaged"
        ) from None
    except UnicodeDecodeError as error:
        raise ArtifactError(f"{path}: not UTF-8 ({error.reason}); the file is damaged") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


@dataclass
class Artifact:
    """A loaded (and verified) artifact directory."""

    directory: Path
    config: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    def path(self, filename: str) -> Path:
        if filename not in self.metadata.get("files", {}):
            raise ArtifactError(f"{self.directory}: the artifact has no file {filename!r}")
        return self.directory / filename

    def has(self, filename: str) -> bool:
        return filename in self.metadata.get("files", {})

    def state_dict(self, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        import torch

        return torch.load(self.path(WEIGHTS_FILE), map_location=map_location, weights_only=True)


def verify_checksums(directory: Path, metadata: Mapping[str, Any]) -> None:
    files = metadata.get("files")
    if not files:
        raise ArtifactError(f"{directory / METADATA_FILE}: lists no files and checksums")
    for filename, expected in files.items():
        path = directory / filename
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in {METADATA_FILE} but missing")
        actual = sha256_of(path)
        if actual != expected:
            raise ArtifactError(
                f"{path}: sha256 is {actual}, {METADATA_FILE} records {expected}; the file is "
                "corrupt or was changed after it was written"
            )


def load_artifact(directory: Path, *, verify: bool = True) -> Artifact:
    directory = Path(directory)
    metadata_path = directory / METADATA_FILE
    if not metadata_path.is_file():
        raise ArtifactError(f"{directory}: no {METADATA_FILE}; not a model artifact")
    metadata = read_json(metadata_path)
    if verify:
        verify_checksums(directory, metadata)
    return Artifact(
        directory=directory, config=read_json(directory / CONFIG_FILE), metadata=metadata
    )


def refresh_checksums(directory: Path) -> None:
    """Record the sha256 of every file in a (staging) directory in its metadata.json."""
    metadata_path = directory / METADATA_FILE
    metadata = read_json(metadata_path) if metadata_path.is_file() else {}
    metadata["files"] = {
        path.name: sha256_of(path)
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != METADATA_FILE
    }
    write_json(metadata_path, metadata)


@contextmanager
def staged_artifact(destination: Path, *, start_empty: bool = False) -> Iterator[Path]:
    """Yield a temporary copy of ``destination`` to change; swap it in on success.

    On leaving the block the checksums in metadata.json are recomputed for
    every file present, then the staging directory replaces ``destination``.
    An exception leaves ``destination`` exactly as it was.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        if destination.is_dir() and not start_empty:
            shutil.copytree(destination, staging, dirs_exist_ok=True)
        yield staging
        refresh_checksums(staging)
        staging.chmod(0o755)  # mkdtemp creates 0700; a released artifact is world-readable
        retired = destination.with_name(f".{destination.name}-retired-{os.getpid()}")
        if destination.exists():
            os.replace(destination, retired)
        os.replace(staging, destination)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_model_files(
    directory: Path,
    *,
    state_dict: Mapping[str, torch.Tensor],
    config: Any,
    metadata: Mapping[str, Any],
) -> None:
    """Write weights, config and metadata into a (staging) directory."""
    import torch

    torch.save(
        {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, directory / WEIGHTS_FILE
    )
    write_json(directory / CONFIG_FILE, config_to_dict(config))
    write_json(directory / METADATA_FILE, dict(metadata))


def update_metadata(directory: Path, **sections: Any) -> dict[str, Any]:
    """Merge top-level sections into a (staging) directory's metadata.json."""
    path = directory / METADATA_FILE
    metadata = read_json(path)
    metadata.update(sections)
    write_json(path, metadata)
    return metadata
