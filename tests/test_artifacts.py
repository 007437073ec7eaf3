"""Artifact integrity: a corrupted ONNX graph or state_dict is caught by its checksum.

An exported artifact (random weights, real ONNX export) is copied per test and
one of its files damaged; loading, exporting or registering it must then fail
with ``ArtifactError`` naming the damaged file, before anything is imported.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import bentoml
import pytest
import torch

from models.artifacts import (
    CONFIG_FILE,
    METADATA_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    load_artifact,
    read_json,
    staged_artifact,
    update_metadata,
)
from models.registry import MNIST_CLASSIFIER, REGISTRY, get_spec
from training import export
from training.common import save_trained_model
from training.register import main as register_main
from training.register import register_artifact

SPEC = get_spec(MNIST_CLASSIFIER)


@pytest.fixture(scope="module")
def exported_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    config = SPEC.config_type()
    save_trained_model(SPEC, root, module=SPEC.build(config), config=config,
                       metadata={"smoke": True, "metrics": {}})  # fmt: skip
    export.export_artifact(SPEC, root)
    return root


@pytest.fixture
def artifact_dir(exported_root, tmp_path) -> Path:
    """A fresh copy of the exported artifact, free to damage."""
    copy = SPEC.artifact_dir(tmp_path)
    shutil.copytree(SPEC.artifact_dir(exported_root), copy)
    return copy


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def stored_tags() -> set[str]:
    return {str(model.tag) for model in bentoml.models.list()}


def test_export_records_every_file_with_its_checksum(artifact_dir):
    artifact = load_artifact(artifact_dir)
    assert {WEIGHTS_FILE, ONNX_FILE, CONFIG_FILE} <= set(artifact.metadata["files"])
    assert artifact.metadata["onnx"]["opset"] == export.OPSET
    assert artifact.metadata["onnx"]["inputs"] == list(SPEC.onnx.inputs)


@pytest.mark.parametrize("filename", [ONNX_FILE, WEIGHTS_FILE])
def test_a_flipped_byte_is_detected_and_the_file_named(artifact_dir, filename):
    flip_one_byte(artifact_dir / filename)
    with pytest.raises(ArtifactError, match=rf"{filename}: sha256 is [0-9a-f]{{64}}, metadata.json"
                       rf" records [0-9a-f]{{64}}"):  # fmt: skip
        load_artifact(artifact_dir)


@pytest.mark.parametrize("filename", [ONNX_FILE, WEIGHTS_FILE])
def test_a_truncated_file_is_detected(artifact_dir, filename):
    path = artifact_dir / filename
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=filename):
        SPEC.load_artifact(artifact_dir)


@pytest.mark.parametrize("filename", [METADATA_FILE, CONFIG_FILE])
def test_a_truncated_json_file_is_named(artifact_dir, filename):
    path = artifact_dir / filename
    path.write_text(path.read_text()[:40])
    with pytest.raises(ArtifactError, match=rf"{filename}: not valid JSON .* truncated or damaged"):
        load_artifact(artifact_dir, verify=False)


def test_registration_reports_a_damaged_artifact_in_one_line(artifact_dir, capsys):
    flip_one_byte(artifact_dir / WEIGHTS_FILE)
    assert register_main(["--model", SPEC.name, "--artifacts-dir", str(artifact_dir.parent)]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"register: {SPEC.name}: ") and WEIGHTS_FILE in line
    assert line.count("sha256") == 1 and "Traceback" not in line


def test_a_missing_file_is_detected(artifact_dir):
    (artifact_dir / ONNX_FILE).unlink()
    with pytest.raises(ArtifactError, match=rf"{ONNX_FILE}: listed in metadata.json but missing"):
        load_artifact(artifact_dir)


@pytest.mark.parametrize("filename", [ONNX_FILE, WEIGHTS_FILE])
def test_registration_refuses_a_corrupted_artifact(artifact_dir, filename):
    flip_one_byte(artifact_dir / filename)
    before = stored_tags()
    with pytest.raises(ArtifactError, match=filename):
        register_artifact(SPEC, artifact_dir)
    assert stored_tags() == before


def test_export_refuses_corrupted_weights_and_leaves_the_artifact_alone(artifact_dir):
    flip_one_byte(artifact_dir / WEIGHTS_FILE)
    files_before = {path.name: path.read_bytes() for path in artifact_dir.iterdir()}
    with pytest.raises(ArtifactError, match=WEIGHTS_FILE):
        export.export_artifact(SPEC, artifact_dir.parent)
    assert {path.name: path.read_bytes() for path in artifact_dir.iterdir()} == files_before
    # No staging directory is left behind either.
    assert [path.name for path in artifact_dir.parent.iterdir()] == [artifact_dir.name]


def test_staged_changes_get_fresh_checksums(artifact_dir):
    with staged_artifact(artifact_dir) as staging:
        (staging / ONNX_FILE).write_bytes((staging / ONNX_FILE).read_bytes() + b"\0")
    recorded = read_json(artifact_dir / METADATA_FILE)["files"][ONNX_FILE]
    assert load_artifact(artifact_dir).metadata["files"][ONNX_FILE] == recorded


def test_reexport_drops_measurements_of_the_previous_graph(artifact_dir):
    with staged_artifact(artifact_dir) as staging:
        update_metadata(staging, parity={"passed": True}, variants={"int8": {"kept": True}})
    export.export_artifact(SPEC, artifact_dir.parent)
    metadata = load_artifact(artifact_dir).metadata
    assert "parity" not in metadata and "variants" not in metadata
    assert metadata["onnx"]["verified"] is False


def test_released_artifacts_fit_the_30_mb_budget():
    root = Path(__file__).resolve().parent.parent / "models" / "artifacts"
    files = [path for path in root.rglob("*") if path.is_file()]
    assert {path.parent.name for path in files} == set(REGISTRY)
    assert sum(path.stat().st_size for path in files) <= 30_000_000
