"""The training scripts under ``torchrun`` (two CPU processes, gloo) and ``--resume``.

Every multi-process run is a real ``python -m torch.distributed.run`` job on a
smoke-sized configuration. Failures are injected by a small launcher script
(written into the test's temporary directory) that wraps
``training.distributed.save_checkpoint``: right after the checkpoint of epoch 1
one rank raises, or kills itself with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.registry import (
    DIGIT_GENERATOR,
    MNIST_CLASSIFIER,
    SENTIMENT_CLASSIFIER,
    get_spec,
    store_version,
)
from training import distributed, mnist, sentiment
from training.common import default_data_dir
from training.data import mnist_test_set, mnist_transform

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = default_data_dir()
JOB_TIMEOUT_S = 240
# After one rank fails, torchrun stops the others; on this small machine that
# takes about two seconds (measured), far from the hour a hung collective would wait.
FAILURE_EXIT_WITHIN_S = 20.0
# Two processes each summing half of a global batch's gradients, then adding
# the halves, round differently from one process summing it all; after two
# smoke epochs (64 AdamW steps) the weights (|w| up to about 5) differ by
# about 1e-5 at most (measured: 7.8e-6).
EQUIVALENCE_ATOL = 1e-4

pytestmark = pytest.mark.skipif(
    not (DATA_DIR / "MNIST" / "raw").is_dir() or not (DATA_DIR / "SST-2").is_dir(),
    reason=f"MNIST or SST-2 not found under {DATA_DIR}",
)

LAUNCHER = """
import importlib, os, signal, sys, time
from pathlib import Path
from training import distributed

module, fault, fault_rank, marker = sys.argv[1:5]
original = distributed.save_checkpoint

def failing(*args, **kwargs):
    path = original(*args, **kwargs)
    if int(os.environ["RANK"]) == int(fault_rank):
        Path(marker).write_text(repr(time.time()))
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure on rank {fault_rank}")
    return path

distributed.save_checkpoint = failing
sys.exit(importlib.import_module(module).main(sys.argv[5:]))
"""


def torchrun(*program: str, processes: int = 2) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone`` with the worktree on the path; output captured."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        *program,
    ]
    return subprocess.run(
        command,
        env=environment,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )


def succeeded(job: subprocess.CompletedProcess) -> None:
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]


def weights(artifact: Path) -> dict[str, torch.Tensor]:
    return torch.load(artifact / "weights.pt", weights_only=True)


def metrics(artifact: Path) -> dict:
    return json.loads((artifact / "metadata.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("launcher") / "launch.py"
    path.write_text(LAUNCHER)
    return path


MNIST_ARGS = ("--smoke", "--epochs", "2", "--resume")


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-process MNIST run of two smoke epochs, with checkpoints."""
    root = tmp_path_factory.mktemp("mnist")
    job = torchrun(
        "-m",
        "training.mnist",
        *MNIST_ARGS,
        "--output-dir",
        str(root / "artifacts"),
        "--checkpoint-dir",
        str(root / "checkpoints"),
    )
    succeeded(job)
    return root


def test_two_process_mnist_writes_one_complete_artifact(mnist_run):
    artifact = get_spec(MNIST_CLASSIFIER).load_artifact(mnist_run / "artifacts" / MNIST_CLASSIFIER)
    metadata = artifact.metadata
    assert metadata["smoke"] is True and metadata["training"]["epochs"] == 2
    assert len(metadata["history"]["validation_accuracy"]) == 2
    # Each rank evaluates its half; the reduced counts cover every image exactly once.
    assert metadata["metrics"]["test_images"] == mnist.SMOKE_EVAL_IMAGES
    confusion = torch.tensor(metadata["metrics"]["test_confusion_matrix"])
    assert int(confusion.sum()) == mnist.SMOKE_EVAL_IMAGES
    # The artifact says how it was made: two processes launched by torchrun, over gloo.
    training = metadata["training"]
    assert (training["launcher"], training["world_size"], training["dist_backend"]) == (
        "torchrun", 2, "gloo",
    )  # fmt: skip
    assert training["command"].startswith(
        "torchrun --nnodes=1 --nproc-per-node=2 -m training.mnist --smoke --epochs 2 --resume"
    ), training["command"]
    checkpoint = torch.load(mnist_run / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert checkpoint["state"]["epoch"] == 2 and checkpoint["world_size"] == 2
    assert len(checkpoint["rng"]) == 2


def test_two_process_test_metrics_are_those_of_the_saved_model(mnist_run):
    """The ranks' halves, added up, score exactly the weights that were written."""
    spec = get_spec(MNIST_CLASSIFIER)
    artifact = spec.load_artifact(mnist_run / "artifacts" / MNIST_CLASSIFIER)
    test_images = mnist_test_set(DATA_DIR, mnist_transform(False))
    alone = mnist.evaluate(
        spec.load_module(artifact),
        mnist._evaluation_loader(test_images, mnist.SMOKE_EVAL_IMAGES),
        torch.device("cpu"),
    )
    recorded = artifact.metadata["metrics"]
    assert alone["confusion"].tolist() == recorded["test_confusion_matrix"]
    assert alone["accuracy"] == recorded["test_accuracy"]
    assert alone["loss"] == pytest.approx(recorded["test_loss"], rel=1e-5)


def test_killed_two_process_run_resumed_with_the_same_command_equals_uninterrupted(
    mnist_run, launcher, tmp_path
):
    same_command = (
        *MNIST_ARGS,
        "--output-dir",
        str(tmp_path / "artifacts"),
        "--checkpoint-dir",
        str(tmp_path / "checkpoints"),
    )
    killed = torchrun(
        str(launcher), "training.mnist", "kill", "1", str(tmp_path / "m"), *same_command
    )
    assert killed.returncode != 0
    assert f"exitcode  : -{int(signal.SIGKILL)}" in killed.stderr
    saved = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert saved["state"]["epoch"] == 1
    assert not (tmp_path / "artifacts" / MNIST_CLASSIFIER).exists()

    resumed = torchrun("-m", "training.mnist", *same_command)
    succeeded(resumed)
    assert "resuming from" in resumed.stderr
    expected = mnist_run / "artifacts" / MNIST_CLASSIFIER
    got = tmp_path / "artifacts" / MNIST_CLASSIFIER
    reference = weights(expected)
    assert all(torch.equal(tensor, reference[name]) for name, tensor in weights(got).items())
    assert metrics(got) == metrics(expected)


def test_a_raising_rank_ends_the_whole_job_within_seconds(launcher, tmp_path):
    marker = tmp_path / "raised-at"
    job = torchrun(
        str(launcher),
        "training.mnist",
        "raise",
        "1",
        str(marker),
        "--smoke",
        "--epochs",
        "3",
        "--output-dir",
        str(tmp_path / "artifacts"),
        "--checkpoint-dir",
        str(tmp_path / "checkpoints"),
    )
    ended = time.time()
    assert job.returncode != 0
    # Rank 0 was waiting for rank 1 inside epoch 2; it must not hang there.
    assert ended - float(marker.read_text()) < FAILURE_EXIT_WITHIN_S
    # torchrun names the failing rank and its own error as the root cause.
    root_cause = job.stderr.split("Root Cause")[-1]
    assert "rank      : 1" in root_cause
    assert "RuntimeError: injected failure on rank 1" in root_cause
    assert not (tmp_path / "artifacts" / MNIST_CLASSIFIER).exists()


# Dropout inside the model draws from each rank's own generator; without it, a
# 2-process run computes the 1-process run's global batches (same order, same
# word dropout), so the weights must agree.
SENTIMENT_EQUIVALENCE_ARGS = (
    "--smoke",
    "--epochs",
    "2",
    "--embedding-dropout",
    "0",
    "--output-dropout",
    "0",
)


@pytest.fixture(scope="module")
def sentiment_two_process(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sentiment2")
    job = torchrun(
        "-m", "training.sentiment", *SENTIMENT_EQUIVALENCE_ARGS, "--output-dir", str(root)
    )
    succeeded(job)
    return root / SENTIMENT_CLASSIFIER


@pytest.fixture(scope="module")
def sentiment_one_process(tmp_path_factory) -> Path:
    """The same configuration in one plain process (no torchrun), with checkpoints."""
    root = tmp_path_factory.mktemp("sentiment1")
    argv = [*SENTIMENT_EQUIVALENCE_ARGS, "--threads", "1", "--output-dir", str(root)]
    assert sentiment.main([*argv, "--checkpoint-dir", str(root / "checkpoints")]) == 0
    return root


def test_two_processes_train_the_one_process_weights(sentiment_two_process, sentiment_one_process):
    spec = get_spec(SENTIMENT_CLASSIFIER)
    spec.load_artifact(sentiment_two_process)  # complete, checksums verified
    one = weights(sentiment_one_process / SENTIMENT_CLASSIFIER)
    two = weights(sentiment_two_process)
    assert one.keys() == two.keys()
    largest = max((one[name] - two[name]).abs().max().item() for name in one)
    assert largest <= EQUIVALENCE_ATOL
    assert metrics(sentiment_two_process)["dev_accuracy"] == pytest.approx(
        metrics(sentiment_one_process / SENTIMENT_CLASSIFIER)["dev_accuracy"]
    )


def test_interrupted_single_process_run_resumes_exactly(
    sentiment_one_process, tmp_path, monkeypatch
):
    argv = [
        *SENTIMENT_EQUIVALENCE_ARGS,
        "--threads",
        "1",
        "--output-dir",
        str(tmp_path),
        "--checkpoint-dir",
        str(tmp_path / "checkpoints"),
        "--resume",
    ]
    original = distributed.save_checkpoint

    def interrupt(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt  # what Ctrl-C does between two epochs

    monkeypatch.setattr(distributed, "save_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        sentiment.main(argv)
    monkeypatch.setattr(distributed, "save_checkpoint", original)
    assert sentiment.main(argv) == 0
    reference = weights(sentiment_one_process / SENTIMENT_CLASSIFIER)
    resumed = weights(tmp_path / SENTIMENT_CLASSIFIER)
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)
    assert metrics(tmp_path / SENTIMENT_CLASSIFIER) == metrics(
        sentiment_one_process / SENTIMENT_CLASSIFIER
    )


def test_two_process_distillation_from_a_teacher(sentiment_two_process, tmp_path):
    job = torchrun(
        "-m",
        "training.sentiment",
        "--smoke",
        "--teachers",
        str(sentiment_two_process),
        "--output-dir",
        str(tmp_path),
    )
    succeeded(job)
    metadata = (
        get_spec(SENTIMENT_CLASSIFIER).load_artifact(tmp_path / SENTIMENT_CLASSIFIER).metadata
    )
    teacher = get_spec(SENTIMENT_CLASSIFIER).load_artifact(sentiment_two_process).metadata
    assert metadata["distillation"]["teachers"][0]["version"] == store_version(teacher)


def test_two_process_gan_writes_one_complete_artifact(mnist_run, tmp_path):
    job = torchrun(
        "-m",
        "training.gan",
        "--smoke",
        "--output-dir",
        str(tmp_path),
        "--classifier-dir",
        str(mnist_run / "artifacts" / MNIST_CLASSIFIER),
    )
    succeeded(job)
    metadata = get_spec(DIGIT_GENERATOR).load_artifact(tmp_path / DIGIT_GENERATOR).metadata
    assert metadata["smoke"] is True
    assert len(metadata["history"]["generator_loss"]) == 1
    for loss in (
        *metadata["history"]["generator_loss"],
        *metadata["history"]["discriminator_loss"],
    ):
        assert 0.0 < loss < 20.0


def test_resuming_with_other_settings_is_refused(mnist_run, tmp_path):
    checkpoints = mnist_run / "checkpoints"
    # The checkpoint was written by 2 processes with batch size 128; this is 1 process, 64.
    config = mnist.TrainConfig(batch_size=64, smoke=True, checkpoint_dir=checkpoints, resume=True)
    with pytest.raises(ValueError, match=r"batch_size.*world_size"):
        mnist.train(config.resolved(), torch.device("cpu"))


def test_backend_choice_and_global_batch_split():
    assert distributed.choose_backend(torch.device("cpu")) == "gloo"
    assert distributed.choose_backend(torch.device("cuda")) == "nccl"
    assert distributed.choose_backend(torch.device("cuda"), "gloo") == "gloo"
    with pytest.raises(ValueError):
        distributed.choose_backend(torch.device("cpu"), "mpi")
    two = distributed.Context(rank=1, world_size=2)
    assert distributed.local_batch_size(two, 128) == 64
    with pytest.raises(ValueError, match="multiple"):
        distributed.local_batch_size(two, 127)
    assert list(distributed.shard(two, list(range(7)))) == [1, 3, 5]
    assert list(distributed.shard(distributed.Context(), [1, 2])) == [1, 2]


def test_two_nodes_meet_through_c10d_rendezvous_and_train_as_one_job(tmp_path):
    """``--nnodes 2`` with a c10d rendezvous, both agents on this machine's loopback:
    the same job as two processes on one node, so the same weights."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "two-nodes",
                "-m",
                "training.mnist",
                "--smoke",
                "--output-dir",
                str(tmp_path / "nodes"),
            ],
            env=environment,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=JOB_TIMEOUT_S)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "distributed: 2 processes" in "".join(outputs)
    succeeded(torchrun("-m", "training.mnist", "--smoke", "--output-dir", str(tmp_path / "one")))
    across, within = (
        weights(tmp_path / "nodes" / MNIST_CLASSIFIER),
        weights(tmp_path / "one" / MNIST_CLASSIFIER),
    )
    assert all(torch.equal(across[name], within[name]) for name in within)
