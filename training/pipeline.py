"""The offline pipeline: train → evaluate → export → verify → register, per model.

    python -m training.pipeline                        # all models, full training
    python -m training.pipeline --skip-train           # re-check and register the committed ones
    python -m training.pipeline --skip-train --write   # ... and record the re-export and checks
    python -m training.pipeline --model mnist-cnn --quick --artifacts-dir /tmp/artifacts

Stages, for each model in registry order (the generator's checks read digits
with the classifier, so the classifier comes first):

    train     the model's training script (``spec.training``) writes a complete
              artifact; ``--quick`` sets its config's ``smoke``
    evaluate  the saved PyTorch model's test accuracy (``training.evaluation``)
    export    ONNX fp32 graph plus INT8 / fp16 candidates (``training.export``)
    verify    ONNX Runtime against PyTorch on the test split; variants measured,
              kept or dropped by the variant policy (``training.verify``)
    register  import into the BentoML model store (``training.register``)

Evaluate, export and verify work on a copy of the artifact. After training it
replaces the real one when every check passed, so a failure leaves the previous
artifact exactly as it was. With ``--skip-train`` the run only checks and
reports: the copy is discarded, the committed files stay byte for byte as they
were, and the run fails if the policy would release other variants than the
artifact carries; ``--write`` swaps the re-exported, re-verified copy in. The
pipeline stops at the first failure with an error naming the model, the stage
and the check, and exits with status 1.

Under ``torchrun`` every process runs the train stage (the scripts share the
work, see ``training.distributed``); the later stages run on rank 0 only.

A training script is a module with two names the train stage uses:

    TrainConfig   a frozen dataclass extending ``training.common.RunConfig`` (data
                  and output directories, device, seed, epochs, batch size,
                  threads, smoke, checkpoints, backend): every option of the
                  script as a field with its type, default and one line of help,
                  ``field(default=..., metadata={"help": "..."})``;
                  ``DEFAULT_EPOCHS`` is its epoch count (``training.config``)
    run(config)   train with ``config.resolved()`` (epochs settled: 1 with
                  smoke), write the artifact into ``config.output_dir`` (``None``:
                  ``artifacts_root()``) on rank 0 with
                  ``training.common.save_trained_model``, record ``smoke`` and
                  ``training.common.run_provenance`` in its metadata; return 0

The stage builds ``TrainConfig(data_dir=, output_dir=<artifact root>, device=,
threads=, smoke=<--quick>, dist_backend=)``, with ``seed=`` when ``--seed`` is
given and ``classifier_dir=<the classifier's artifact>`` when the spec's
outputs are read by a classifier (``verification.labels_read_by``) and the
config has that field, then calls ``run(config)``. The command line of a script
is its ``TrainConfig`` too: ``main(argv)`` is ``parse_config`` then ``run``
inside ``invoked_with(argv)``. The smallest such script is ``EXAMPLE_SCRIPT`` in
``tests/test_pipeline.py``; ``training.mnist`` is a complete one.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from models.artifacts import ArtifactError
from models.devices import DEVICE_NAMES
from models.registry import REGISTRY, ModelSpec, artifacts_root, get_spec
from models.served import SERVED_MODELS_FILE, pin_served_tags
from training import distributed
from training.common import default_data_dir, device_argument, pick_device
from training.config import config_command_line
from training.evaluation import VerificationError, evaluate_into
from training.export import export_into
from training.log import configure_logging
from training.register import is_release_root, register_artifact
from training.sources import require_data
from training.variants import kept_files
from training.verify import changed_files, check_released_variants, verify_into, working_copy

log = logging.getLogger(__name__)

ALL = "all"


class PipelineError(RuntimeError):
    """A stage failed; the message names the model and the stage."""


# Failed checks: their message is the whole story. Anything else is a bug or a
# broken environment, and keeps its traceback.
EXPECTED_FAILURES = (VerificationError, ArtifactError)


@contextmanager
def stage(spec: ModelSpec, name: str) -> Iterator[None]:
    log.info("%s: %s", spec.name, name)
    try:
        yield
    except PipelineError:
        raise
    except Exception as error:
        raise PipelineError(f"{spec.name}: {name} failed: {error}") from error


def training_config(spec: ModelSpec, config_type: type, root: Path, args: argparse.Namespace):
    """The training script's config for this run (see the module docstring)."""
    values = {
        "data_dir": args.data_dir,
        "output_dir": root,
        "device": args.device,
        "threads": args.threads,
        "smoke": args.quick,
        "dist_backend": args.dist_backend,
    }
    if args.seed is not None:
        values["seed"] = args.seed
    fields = {item.name for item in dataclasses.fields(config_type)}
    if spec.verification.labels_read_by and "classifier_dir" in fields:
        classifier = get_spec(spec.verification.labels_read_by)
        values["classifier_dir"] = classifier.artifact_dir(root)
    return config_type(**values)


def train(spec: ModelSpec, root: Path, args: argparse.Namespace) -> None:
    trainer = spec.training_module
    config = training_config(spec, trainer.TrainConfig, root, args)
    command = shlex.join(config_command_line(config))
    log.info("%s: as python -m %s %s", spec.name, trainer.__name__, command)
    status = trainer.run(config)
    if status:
        raise PipelineError(f"{spec.name}: train: {trainer.__name__} returned status {status}")


def run_model(spec: ModelSpec, root: Path, args: argparse.Namespace) -> None:
    directory = spec.artifact_dir(root)
    if args.skip_train:
        if not directory.is_dir():
            raise PipelineError(
                f"{spec.name}: --skip-train, but there is no artifact in "
                f"{directory}; run the pipeline without --skip-train"
            )
    else:
        with stage(spec, "train"):
            train(spec, root, args)
    if not distributed.current().is_main:
        return
    with stage(spec, "checksums"):
        # Checked here as well as in the staged copy, so an error names the real file.
        committed = spec.load_artifact(directory).metadata
    write = args.write or not args.skip_train
    with working_copy(directory, write=write) as staging:
        with stage(spec, "evaluate"):
            evaluate_into(spec, staging, args.data_dir, quick=args.quick, root=root)
        with stage(spec, "export"):
            export_into(spec, staging)
        with stage(spec, "verify"):
            results = verify_into(
                spec, staging, args.data_dir, quick=args.quick, root=root, threads=args.threads
            )
            if not write:
                check_released_variants(spec, committed, kept_files(results["variants"]))
                report_reexport(spec, directory, staging)
    if args.register:
        with stage(spec, "register"):
            tag = register_artifact(spec, directory)
            if is_release_root(args.artifacts_dir) and pin_served_tags([str(tag)]):
                log.info("%s: pinned as served in %s", spec.name, SERVED_MODELS_FILE)
        log.info("%s: registered as %s", spec.name, tag)


def report_reexport(spec: ModelSpec, committed: Path, checked: Path) -> None:
    """Say whether exporting again reproduced the committed files byte for byte."""
    changed = changed_files(committed, checked)
    if changed:
        log.warning(
            "%s: the re-export differs from the committed %s (not written; --write records it)",
            spec.name,
            ", ".join(changed),
        )
    else:
        log.info("%s: the re-export reproduces every committed file; nothing written", spec.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=[ALL, *REGISTRY],
        default=ALL,
        help="which model to run (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-size training and checks on a subset (for tests; the "
        "artifacts are marked smoke)",
    )
    parser.add_argument(
        "--skip-train",
        action="store_true",
        help="start from the existing artifacts instead of training",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="with --skip-train: replace the artifacts with the re-exported, re-verified ones "
        "(without it, --skip-train only checks and reports)",
    )
    parser.add_argument(
        "--no-register", dest="register", action="store_false", help="stop after verification"
    )
    parser.add_argument(
        "--artifacts-dir",
        type=Path,
        default=None,
        help=f"artifact root (default: {artifacts_root()})",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="data root with MNIST/ and SST-2/ (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        type=device_argument,
        default="auto",
        help=f"training device ({DEVICE_NAMES}); parity is checked on the CPU, and GPU "
        "latencies are measured whenever CUDA is available",
    )
    parser.add_argument(
        "--dist-backend",
        choices=distributed.BACKENDS,
        default="auto",
        help="torch.distributed backend under torchrun (auto: nccl on CUDA, else gloo)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="training seed (default: each script's own)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for training and checks (default: all cores)",
    )
    return parser


@distributed.entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require_data(args.data_dir)
    configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    # One process group for all the trainings; ranks other than 0 only train.
    distributed.init(pick_device(args.device), args.dist_backend)
    root = args.artifacts_dir or artifacts_root()
    names = list(REGISTRY) if args.model == ALL else [args.model]
    try:
        for name in names:
            run_model(get_spec(name), root, args)
    except PipelineError as error:
        expected = isinstance(error.__cause__, EXPECTED_FAILURES)
        log.error("pipeline stopped: %s", error, exc_info=None if expected else error)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
