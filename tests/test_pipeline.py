"""The offline pipeline end to end (training/pipeline.py), and how it fails.

``python -m training.pipeline --quick`` runs in a child process with its own
temporary BENTOML_HOME: smoke training of all three models, evaluation, ONNX
export, parity verification and registration. The tests then read the store
through the ``bentoml`` command line, check what the artifacts record, and
check that registering again is idempotent. The failure tests run the real
components on damaged or mismatched artifacts; the re-verify tests check that
verifying the committed artifacts again leaves every byte as it was.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from models.artifacts import (
    ONNX_FILE,
    ONNX_INT8_FILE,
    WEIGHTS_FILE,
    load_artifact,
    staged_artifact,
    update_metadata,
)
from models.registry import (
    MNIST_CLASSIFIER,
    PACKAGE_ARTIFACTS_DIR,
    REGISTRY,
    SENTIMENT_CLASSIFIER,
    get_spec,
)
from training import export, pipeline, verify
from training.common import default_data_dir
from training.config import config_parser, parse_config
from training.evaluation import QUICK_EXAMPLES
from training.latency import not_measured
from training.parity import PARITY_ATOL
from training.variants import MAX_ACCURACY_DROP_PP

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = default_data_dir()

pytestmark = pytest.mark.skipif(
    not (DATA_DIR / "MNIST" / "raw").is_dir() or not (DATA_DIR / "SST-2").is_dir(),
    reason=f"MNIST and SST-2 not found under {DATA_DIR}",
)


def run(args: list[str], bentoml_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("artifacts")
    home = tmp_path_factory.mktemp("bentoml-home")
    result = run(["-m", "training.pipeline", "--quick", "--artifacts-dir", str(root),
                  "--data-dir", str(DATA_DIR), "--threads", "1"], home)  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    return root, home, result


def stored_models(home: Path) -> dict[str, dict]:
    listed = run(["-m", "bentoml", "models", "list", "-o", "json"], home)
    assert listed.returncode == 0, listed.stderr
    models = {}
    for entry in json.loads(listed.stdout):
        shown = run(["-m", "bentoml", "models", "get", entry["tag"], "-o", "json"], home)
        assert shown.returncode == 0, shown.stderr
        models[entry["tag"]] = json.loads(shown.stdout)
    return models


def test_quick_pipeline_registers_all_three_models(quick_run):
    root, home, _ = quick_run
    models = stored_models(home)
    assert sorted(info["name"] for info in models.values()) == sorted(REGISTRY)
    for tag, info in models.items():
        spec = get_spec(info["name"])
        artifact = load_artifact(spec.artifact_dir(root))
        assert info["labels"]["model"] == spec.name
        assert info["labels"]["stage"] == "smoke"
        assert info["labels"]["verified"] == "true"
        metadata = info["metadata"]
        assert metadata["sha256"] == artifact.metadata["files"], tag
        assert metadata["onnx"]["inputs"] == list(spec.onnx.inputs)
        assert metadata["onnx"]["outputs"] == list(spec.onnx.outputs)
        assert {"torch_training", "torch_export", "onnx_export", "onnxruntime_export",
                "bentoml"} <= set(metadata["framework_versions"])  # fmt: skip
        assert metadata["parity"]["passed"] is True
        assert metadata["metrics"] == artifact.metadata["metrics"]
        assert 0 <= metadata["evaluation"]["accuracy"] <= 1


def test_artifacts_record_parity_at_every_batch_size(quick_run):
    root, _, _ = quick_run
    for spec in REGISTRY.values():
        metadata = load_artifact(spec.artifact_dir(root)).metadata
        parity = metadata["parity"]
        assert parity["quick"] is True and parity["passed"] is True
        assert sorted(parity["batch_sizes"], key=int) == ["1", "7", "256"]
        for result in parity["batch_sizes"].values():
            assert result["examples"] == QUICK_EXAMPLES
            assert result["max_abs_diff"] <= PARITY_ATOL
            assert result["label_agreement"] == 1.0
        assert metadata["onnx"]["verified"] is True
        assert metadata["evaluation"]["accuracy"] is not None
    sweep = load_artifact(get_spec(SENTIMENT_CLASSIFIER).artifact_dir(root)).metadata["parity"][
        "length_sweep"
    ]
    assert sweep["lengths"][0] == 1 and sweep["lengths"][1] == sweep["padded_to"] > 10
    assert sweep["max_abs_diff"] <= PARITY_ATOL


def test_variant_decisions_match_the_files(quick_run):
    root, _, _ = quick_run
    for spec in REGISTRY.values():
        directory = spec.artifact_dir(root)
        metadata = load_artifact(directory).metadata
        assert metadata["onnx"]["files"]["fp32"] == ONNX_FILE
        variants = metadata["variants"]
        assert set(variants["policy"]) == {"accuracy", "size", "speed"}
        assert set(variants["fp32"]["latency_ms"]["cpu"]) == {"1", "256"}
        assert variants["latency_devices"]["cpu"]
        for variant in export.variant_candidates(spec):
            measured = variants[variant.precision]
            assert measured["kept"] == (directory / variant.filename).is_file()
            assert (variant.precision in metadata["onnx"]["files"]) == measured["kept"]
            assert measured["bytes"] > 0
            if measured["kept"]:
                assert measured["accuracy_drop_pp"] <= MAX_ACCURACY_DROP_PP
                assert measured["size_ratio"] <= 0.9
            # Speed is measured on the variant's target device only.
            assert set(measured["latency_ms"]) == {variant.target_device}
            if variant.target_device == "cpu":
                assert set(measured["latency_ms"]["cpu"]) == {"1", "256"}
            elif not torch.cuda.is_available():
                assert measured["latency_ms"]["gpu"] == not_measured("gpu")


def test_registering_again_gives_the_same_versions(quick_run):
    root, home, _ = quick_run
    before = set(stored_models(home))
    again = run(["-m", "training.register", "--artifacts-dir", str(root)], home)
    assert again.returncode == 0, again.stderr
    assert set(again.stdout.split()) == before
    assert set(stored_models(home)) == before


@pytest.fixture
def mnist_root(quick_run, tmp_path) -> Path:
    """A copy of the quick run's verified classifier artifact."""
    spec = get_spec(MNIST_CLASSIFIER)
    shutil.copytree(spec.artifact_dir(quick_run[0]), spec.artifact_dir(tmp_path))
    return tmp_path


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_parity_failure_stops_with_a_clear_error_and_changes_nothing(mnist_root, caplog):
    """Weights that no longer match the exported graph: verification must refuse them."""
    spec = get_spec(MNIST_CLASSIFIER)
    directory = spec.artifact_dir(mnist_root)
    with staged_artifact(directory) as staging:
        weights = torch.load(staging / WEIGHTS_FILE, weights_only=True)
        weights["head.1.bias"] += 1.0 + torch.arange(10.0)  # shifts every logit differently
        torch.save(weights, staging / WEIGHTS_FILE)
    before = snapshot(directory)
    with caplog.at_level(logging.ERROR):
        status = verify.main(["--model", MNIST_CLASSIFIER, "--artifacts-dir", str(mnist_root),
                              "--data-dir", str(DATA_DIR), "--quick",
                              "--threads", "1"])  # fmt: skip
    assert status == 1
    assert "mnist-cnn: ONNX Runtime does not match PyTorch" in caplog.text
    assert "batch size 1: max |difference|" in caplog.text
    assert snapshot(directory) == before
    assert [path.name for path in mnist_root.iterdir()] == [spec.name]  # no staging left


def test_reverifying_the_committed_artifacts_changes_no_byte(tmp_path):
    """verify and pipeline --skip-train check and report; without --write they write
    nothing, not even metadata.json."""
    spec = get_spec(MNIST_CLASSIFIER)
    directory = spec.artifact_dir(tmp_path)
    shutil.copytree(spec.artifact_dir(PACKAGE_ARTIFACTS_DIR), directory)
    before = snapshot(directory)
    common = ["--model", MNIST_CLASSIFIER, "--artifacts-dir", str(tmp_path),
              "--data-dir", str(DATA_DIR), "--quick", "--threads", "1"]  # fmt: skip
    assert verify.main(common) == 0
    assert snapshot(directory) == before
    assert pipeline.main([*common, "--skip-train", "--no-register"]) == 0
    assert snapshot(directory) == before
    assert [path.name for path in tmp_path.iterdir()] == [spec.name]  # no copy left


def test_a_variant_that_loses_accuracy_fails_the_check_and_is_dropped_on_write(mnist_root, caplog):
    """An INT8 graph from other weights: re-verifying reports it and writes nothing;
    --write drops it and records why."""
    spec = get_spec(MNIST_CLASSIFIER)
    directory = spec.artifact_dir(mnist_root)
    artifact = load_artifact(directory)
    torch.manual_seed(1)
    unrelated = export.quantize_int8(
        export.export_onnx(spec, spec.build(artifact.config), artifact.config)
    )
    with staged_artifact(directory) as staging:
        onnx.save_model(unrelated, staging / ONNX_INT8_FILE)
        # Released as a variant, whether or not the quick run's own INT8 graph was kept.
        onnx_section = artifact.metadata["onnx"]
        files = {**onnx_section["files"], "int8": ONNX_INT8_FILE}
        update_metadata(staging, onnx={**onnx_section, "files": files})
    before = snapshot(directory)
    common = ["--model", MNIST_CLASSIFIER, "--artifacts-dir", str(mnist_root),
              "--data-dir", str(DATA_DIR), "--quick", "--threads", "1"]  # fmt: skip
    with caplog.at_level(logging.ERROR):
        assert verify.main(common) == 1
    assert "the variant policy keeps ['fp16', 'fp32']" in caplog.text
    assert snapshot(directory) == before

    assert verify.main([*common, "--write"]) == 0
    assert not (directory / ONNX_INT8_FILE).exists()
    metadata = load_artifact(directory).metadata
    assert "int8" not in metadata["onnx"]["files"]
    int8 = metadata["variants"]["int8"]
    assert int8["kept"] is False and "accuracy drop above" in int8["reason"]
    assert int8["accuracy_drop_pp"] > 10 * MAX_ACCURACY_DROP_PP
    # Once written, checking again passes and changes nothing.
    written = snapshot(directory)
    assert verify.main(common) == 0
    assert snapshot(directory) == written


def test_pipeline_stops_on_a_corrupted_file_and_names_it(mnist_root, caplog):
    directory = get_spec(MNIST_CLASSIFIER).artifact_dir(mnist_root)
    onnx_path = directory / ONNX_FILE
    onnx_path.write_bytes(onnx_path.read_bytes()[:-1])
    before = snapshot(directory)
    with caplog.at_level(logging.ERROR):
        status = pipeline.main(["--model", MNIST_CLASSIFIER, "--skip-train", "--quick",
                                "--artifacts-dir", str(mnist_root), "--data-dir", str(DATA_DIR),
                                "--threads", "1"])  # fmt: skip
    assert status == 1
    assert f"mnist-cnn: checksums failed: {onnx_path}: sha256" in caplog.text
    assert snapshot(directory) == before


def test_skip_train_without_an_artifact_is_an_error(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        status = pipeline.main(["--model", MNIST_CLASSIFIER, "--skip-train", "--no-register",
                                "--artifacts-dir", str(tmp_path)])  # fmt: skip
    assert status == 1
    assert "--skip-train, but there is no artifact" in caplog.text


# --- the train stage's contract with a training script -----------------------------------


@pytest.mark.parametrize("name", list(REGISTRY))
def test_train_stage_passes_the_scripts_config_object(name, tmp_path, monkeypatch):
    spec = get_spec(name)
    trainer = spec.training_module
    passed = []
    monkeypatch.setattr(trainer, "run", lambda config: passed.append(config) or 0)
    args = pipeline.build_parser().parse_args(
        ["--quick", "--data-dir", str(DATA_DIR), "--threads", "1", "--seed", "5"]
    )
    pipeline.train(spec, tmp_path, args)
    [config] = passed
    assert type(config) is trainer.TrainConfig
    assert (config.smoke, config.data_dir, config.output_dir) == (True, DATA_DIR, tmp_path)
    assert (config.threads, config.seed, config.device, config.epochs) == (1, 5, "auto", None)
    if spec.verification.labels_read_by:
        reader = get_spec(spec.verification.labels_read_by)
        assert config.classifier_dir == reader.artifact_dir(tmp_path)
    else:
        assert not hasattr(config, "classifier_dir")


# The smallest training script the pipeline runs: the contract in training/pipeline.py.
EXAMPLE_SCRIPT = '''
"""Train a small digit classifier for a few steps (an example of the contract)."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.utils.data import DataLoader

from models.digits import DigitClassifier, DigitClassifierConfig
from models.registry import MNIST_CLASSIFIER, get_spec
from training import distributed
from training.common import (
    RunConfig, invoked_with, run_provenance, save_trained_model, seed_everything, start_run,
)
from training.config import config_record, parse_config
from training.data import mnist_train_validation


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    DEFAULT_EPOCHS: ClassVar[int] = 2
    DATA: ClassVar[str] = "MNIST/raw"
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam's step", "flag": "--lr"})
    steps: int = field(default=20, metadata={"help": "batches per epoch (4 with --smoke)"})


def run(config: TrainConfig) -> int:
    config = config.resolved()
    device = start_run(config)
    seed_everything(config.seed)
    train_set, _ = mnist_train_validation(config.data_dir, seed=config.seed)
    batches = DataLoader(train_set, batch_size=config.batch_size, shuffle=True)
    model = DigitClassifier(DigitClassifierConfig()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    for _ in range(config.epochs):
        for _, (images, labels) in zip(range(4 if config.smoke else config.steps), batches):
            loss = torch.nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    if distributed.current().is_main:
        training = {**run_provenance(device), "hyperparameters": config_record(config)}
        save_trained_model(
            get_spec(MNIST_CLASSIFIER), config.output_dir, module=model.cpu(),
            config=model.config, metadata={"smoke": config.smoke, "training": training},
        )
    return 0


@distributed.entry_point
def main(argv: list[str] | None = None) -> int:
    config = parse_config(TrainConfig, argv, __doc__)
    with invoked_with(argv):
        return run(config)
'''


def test_a_script_written_to_the_contract_trains_in_the_pipeline(tmp_path, monkeypatch, capsys):
    (tmp_path / "small_digits.py").write_text(EXAMPLE_SCRIPT)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = dataclasses.replace(get_spec(MNIST_CLASSIFIER), training="small_digits")
    args = pipeline.build_parser().parse_args(
        ["--quick", "--data-dir", str(DATA_DIR), "--threads", "1"]
    )
    pipeline.train(spec, tmp_path / "artifacts", args)
    metadata = spec.load_artifact(spec.artifact_dir(tmp_path / "artifacts")).metadata
    assert metadata["smoke"] is True
    recorded = metadata["training"]["hyperparameters"]
    assert (recorded["epochs"], recorded["learning_rate"], recorded["smoke"]) == (1, 1e-3, True)
    assert recorded["output_dir"] == str(tmp_path / "artifacts")
    # Its command line comes from the same declaration.
    config_type = spec.training_module.TrainConfig
    with pytest.raises(SystemExit):
        parse_config(config_type, ["--lr", "fast"])
    assert "argument --lr: invalid float value: 'fast'" in capsys.readouterr().err
    shown = config_parser(config_type).format_help()
    assert "--lr LR" in shown and "batches per epoch (4 with --smoke)" in shown
