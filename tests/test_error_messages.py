"""What a person sees when a command fails for a reason of theirs to fix: one line on
stderr that says what to do, a non-zero exit status and no traceback.

Each test runs the real command in a subprocess: a data directory that is not
there (the training scripts, the pipeline, the benchmarks), the port ``make serve``
would use already taken, and a model store that lacks a served model or holds one
it cannot read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

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
