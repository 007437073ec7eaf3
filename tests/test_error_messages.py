"""What a person sees when a command fails for a reason of theirs to fix: one line on
stderr that says what to do, a non-zero exit status and no traceback.

Each test runs the real command in a subprocess: a data directory that is not
there (the training scripts, the pipeline, the benchmarks), the port ``make serve``
would use already taken, and a model store that lacks a served model or holds one
it cannot read.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def run(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` in the repository, with ``env`` over this process's environment
    (a value of None removes the variable)."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The failed command's stderr, which must be a single line (no traceback)."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- a missing data directory -------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "training.mnist", "--smoke"],
        ["-m", "training.sentiment", "--smoke"],
        ["-m", "training.pipeline", "--quick", "--no-register"],
        ["-m", "training.verify", "--model", "sst2-bilstm", "--quick"],
        ["-m", "bench.payloads"],
    ],
    ids=lambda command: command[1],
)
def test_a_missing_data_directory_given_with_data_dir(command, tmp_path):
    missing = tmp_path / "no-data-here"
    line = one_line_error(run([*command, "--data-dir", str(missing)]))
    assert line.startswith(f"no data directory at {missing}: ")
    assert "--data-dir" in line and "DATA_DIR" in line and "MNIST/ and SST-2/" in line


def test_a_missing_data_directory_from_data_dir_says_so(tmp_path):
    missing = tmp_path / "no-data-here"
    line = one_line_error(run(["-m", "training.sentiment", "--smoke"], {"DATA_DIR": str(missing)}))
    assert line.startswith(f"no data directory at {missing} (from DATA_DIR): ")


def test_the_default_data_directory_missing_says_data_dir_is_not_set(tmp_path):
    """With DATA_DIR unset the default is ../shared/data beside the repository; here it
    is pointed elsewhere, as on a machine without that directory."""
    missing = tmp_path / "shared" / "data"
    code = (
        "import sys, pathlib, training.sources as sources; "
        "sources.DEFAULT_DATA_DIR = pathlib.Path(sys.argv[1]); "
        "from training.sentiment import main; raise SystemExit(main(['--smoke']))"
    )
    line = one_line_error(run(["-c", code, str(missing)], {"DATA_DIR": None}))
    assert line.startswith(f"no data directory at {missing} (the default: DATA_DIR is not set): ")
    assert "--data-dir" in line


def test_a_data_directory_without_the_data_set_names_the_missing_file(tmp_path):
    (tmp_path / "MNIST").mkdir()
    line = one_line_error(run(["-m", "bench.payloads", "--data-dir", str(tmp_path)]))
    assert line.startswith(f"no MNIST/raw/t10k-images-idx3-ubyte in {tmp_path}: ")
    assert "--data-dir" in line and "DATA_DIR" in line


# --- the port make serve would use is taken -----------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on, as an earlier ``make serve`` would."""
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_port_in_use_is_named_with_another_to_pick(taken_port):
    line = one_line_error(run(["-m", "service.preflight", "--port", str(taken_port)]))
    assert line.startswith(f"port {taken_port} is in use")
    assert "make serve PORT=" in line


def test_make_serve_stops_before_starting_anything_when_the_port_is_taken(taken_port):
    """The check is the recipe's first step: nothing is registered or started, and
    besides make's own closing line, stderr is the one line."""
    if subprocess.run(["make", "-q", ".venv/.installed"], cwd=REPO_ROOT).returncode != 0:
        pytest.skip(".venv is not up to date: make serve would rebuild it first")
    result = subprocess.run(["make", "-s", "serve", f"PORT={taken_port}"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if not line.startswith("make")]
    assert len(ours) == 1 and ours[0].startswith(f"port {taken_port} is in use"), result.stderr
    assert "registering" not in result.stdout and "starting" not in result.stdout


def test_a_free_port_passes():
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    result = run(["-m", "service.preflight", "--port", str(port)])
    assert result.returncode == 0 and result.stderr == ""


# --- the model store ----------------------------------------------------------------------


def serve_once(
    home: Path, env: Mapping[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """``bentoml serve`` on the store in ``home``: each case here stops it before it listens."""
    port = str(free_port())
    command = ["-m", "bentoml", "serve", "service.service:ServingService", "--port", port]
    return run(command, {"BENTOML_HOME": str(home), **(env or {})})


@pytest.fixture
def store_copy(model_store, bentoml_home, tmp_path) -> Path:
    """A BentoML home holding a copy of the session's store (the released models)."""
    home = tmp_path / "home"
    shutil.copytree(bentoml_home / "models", home / "models")
    return home


def entry_dir(home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    return home / "models" / name / version


def test_a_store_without_the_served_model_says_to_register(model_store, tmp_path):
    empty = tmp_path / "empty-home"
    line = one_line_error(serve_once(empty))
    tag = model_store["mnist-cnn"]
    assert line.startswith(f"cannot start: {tag} is not in the model store {empty / 'models'}: ")
    assert "make register" in line and "python -m training.register" in line


def test_an_entry_another_bentoml_version_wrote_says_so_and_register_replaces_it(
    model_store, store_copy
):
    """A model.yaml in a shape this BentoML does not read (here: without the creation
    time, written by an old BentoML) names the entry, the field and the writer; then
    ``python -m training.register`` replaces it and the store reads again."""
    tag = model_store["mnist-cnn"]
    model_yaml = entry_dir(store_copy, tag) / "model.yaml"
    content = yaml.safe_load(model_yaml.read_text())
    del content["creation_time"]
    content["context"]["bentoml_version"] = "1.1.11"
    model_yaml.write_text(yaml.safe_dump(content))
    line = one_line_error(serve_once(store_copy))
    assert line.startswith(f"model store entry {tag} is damaged: {model_yaml}: ")
    assert "creation_time" in line and "written by BentoML 1.1.11" in line
    assert line.endswith("run make register (python -m training.register) to replace it")

    registered = run(["-m", "training.register"], {"BENTOML_HOME": str(store_copy)})
    assert registered.returncode == 0, registered.stderr
    assert "cannot be used" in registered.stderr and "replacing it" in registered.stderr
    assert "creation_time" in yaml.safe_load(model_yaml.read_text())


def test_a_damaged_model_file_in_the_store_says_to_register_again(model_store, store_copy):
    tag = model_store["sst2-bilstm"]
    graph = entry_dir(store_copy, tag) / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    line = one_line_error(serve_once(store_copy))
    assert line.startswith(f"model store entry {tag} is damaged: {graph}: sha256 is ")
    assert line.endswith("run make register (python -m training.register) to replace it")


# --- settings the service cannot use ------------------------------------------------------


def test_a_setting_the_service_cannot_use_is_named(model_store, bentoml_home):
    line = one_line_error(serve_once(bentoml_home, {"SERVING_WORKERS": "many"}))
    assert line == (
        "cannot start: SERVING_WORKERS='many': expected an integer (the settings: docs/settings.md)"
    )


def test_a_device_the_machine_lacks_is_named(model_store, bentoml_home):
    line = one_line_error(serve_once(bentoml_home, {"SERVING_DEVICE": "cuda:7"}))
    assert line.startswith("cannot start: device 'cuda:7' was requested")
    assert line.endswith("set SERVING_DEVICE=auto or cpu")
