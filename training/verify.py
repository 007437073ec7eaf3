"""Verify exported artifacts: evaluation, ONNX parity, the variant policy and latency.

    python -m training.verify                          # check every artifact, report only
    python -m training.verify --model sst2-bilstm --quick
    python -m training.verify --report /tmp/verify.json    # the figures, as JSON
    python -m training.verify --write                  # record the results in metadata.json

Each job has its module: ``training.evaluation`` (the saved PyTorch model's
test accuracy, checked against the figure its training run recorded),
``training.parity`` (ONNX Runtime against PyTorch on the whole test split),
``training.variants`` (which INT8 / fp16 graphs are released, by accuracy and
size) and ``training.latency`` (speed on this machine, recorded with the
device, never a criterion). This module runs them on one artifact.

Re-verifying only reads: the checks run on a copy of the artifact, which is
then discarded, so the committed files stay byte for byte as they were. It
fails (exit status 1) when a check fails, and when the artifact does not carry
exactly the variants the policy keeps. ``--write`` instead swaps the checked
copy in, atomically: metadata.json gains the measured ``evaluation``,
``parity`` and ``variants`` sections, ``onnx.files``, and the PyTorch module's
output for the spec's example input (``example``: what the service checks a
version against before serving it, ``models.example_outputs``), and a rejected
variant's file is removed. A failed check never writes anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from models.artifacts import (
    METADATA_FILE,
    ONNX_FILE,
    refresh_checksums,
    staged_artifact,
    update_metadata,
)
from models.example_outputs import EXAMPLE_SECTION, example_record
from models.registry import REGISTRY, ModelSpec, get_spec
from training.common import add_model_selection_arguments, default_data_dir
from training.evaluation import (
    QUICK_EXAMPLES,
    VerificationError,
    evaluate_into,
    evaluation_set,
    load_labeller,
    torch_runner,
)
from training.export import variant_candidates
from training.log import configure_logging
from training.parity import ParityError, check_parity, measure_parity
from training.variants import kept_files, measure_variants

log = logging.getLogger(__name__)

__all__ = ["ParityError", "VerificationError", "main", "verify_artifact", "verify_into"]


@contextmanager
def working_copy(directory: Path, *, write: bool) -> Iterator[Path]:
    """A copy of the artifact to check: swapped in on success with ``write``, else discarded."""
    if write:
        with staged_artifact(directory) as staging:
            yield staging
        return
    with tempfile.TemporaryDirectory(prefix=f"{directory.name}-check-") as scratch:
        copy = Path(scratch) / directory.name
        shutil.copytree(directory, copy)
        yield copy


def changed_files(committed: Path, checked: Path) -> list[str]:
    """Files (other than metadata.json) that the checked copy adds, drops or changes."""
    names = {path.name for path in [*committed.iterdir(), *checked.iterdir()] if path.is_file()}
    changed = []
    for name in sorted(names - {METADATA_FILE}):
        before, after = committed / name, checked / name
        if not (before.is_file() and after.is_file() and before.read_bytes() == after.read_bytes()):
            changed.append(name)
    return changed


def check_released_variants(spec: ModelSpec, committed: dict[str, Any], kept: dict[str, str]):
    """The artifact must carry exactly the graphs the policy keeps (a check-only run)."""
    carried = dict(committed.get("onnx", {}).get("files", {}))
    if carried != kept:
        raise VerificationError(
            f"{spec.name}: the artifact carries {sorted(carried)} but the variant policy keeps "
            f"{sorted(kept)} (see the variants' reasons); rerun with --write to release that"
        )


def verify_into(
    spec: ModelSpec,
    directory: Path,
    data_dir: Path,
    *,
    quick: bool = False,
    root: Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Verify the exported artifact in (a copy) ``directory`` and record the results there.

    Raises ParityError, before anything is recorded, when the fp32 graph fails.
    Removes the files of rejected variants from ``directory``. Returns the
    ``parity`` and ``variants`` sections.
    """
    artifact = spec.load_artifact(directory)
    if not artifact.has(ONNX_FILE):
        raise VerificationError(f"{directory}: no {ONNX_FILE}; export the model first")
    module = spec.load_module(artifact, "cpu")
    evalset = evaluation_set(spec, directory, data_dir, quick=quick)
    labeller = load_labeller(spec, root)
    parity = measure_parity(
        spec, module, directory / ONNX_FILE, evalset, labeller, quick=quick, threads=threads
    )
    check_parity(spec.name, parity)
    parity["passed"] = True
    log.info(
        "%s: parity holds (%s)",
        spec.name,
        ", ".join(
            f"batch {size}: max |Δ| {result['max_abs_diff']:.2e}"
            for size, result in parity["batch_sizes"].items()
        ),
    )
    candidates = [
        variant for variant in variant_candidates(spec) if (directory / variant.filename).is_file()
    ]
    variants = measure_variants(
        spec, module, directory, evalset, labeller, candidates, quick=quick, threads=threads
    )
    for variant in candidates:
        if not variants[variant.precision]["kept"]:
            (directory / variant.filename).unlink()
    onnx_section = dict(artifact.metadata.get("onnx", {}))
    onnx_section["files"] = kept_files(variants)
    onnx_section["verified"] = True
    example = example_record(spec, artifact.config, _positional(spec, module))
    sections = {"onnx": onnx_section, "parity": parity, "variants": variants}
    update_metadata(directory, **sections, **{EXAMPLE_SECTION: example})
    refresh_checksums(directory)  # rejected variants were removed
    return {"parity": parity, "variants": variants}


def _positional(spec: ModelSpec, module: torch.nn.Module):
    """The module as the service's predictors are called: inputs in ONNX order."""
    run = torch_runner(spec, module)
    return lambda *inputs: run(dict(zip(spec.onnx.inputs, inputs, strict=True)))


def verify_artifact(
    spec: ModelSpec,
    root: Path | None,
    data_dir: Path,
    *,
    quick: bool = False,
    threads: int | None = None,
    write: bool = False,
) -> dict[str, Any]:
    """Evaluate and verify one exported artifact; return what was measured.

    Without ``write`` nothing in the artifact changes, and it must already carry
    exactly the variants the policy keeps; with ``write`` the results replace it
    atomically. A failed check raises VerificationError and writes nothing.
    """
    directory = spec.artifact_dir(root)
    committed = spec.load_artifact(directory).metadata
    with working_copy(directory, write=write) as copy:
        evaluation = evaluate_into(spec, copy, data_dir, quick=quick, root=root)
        results = verify_into(spec, copy, data_dir, quick=quick, root=root, threads=threads)
        if not write:
            check_released_variants(spec, committed, kept_files(results["variants"]))
            changed = changed_files(directory, copy)
            if changed:  # metadata aside, verifying changes no file; this is a bug guard
                raise VerificationError(f"{spec.name}: verification changed {changed}")
    log.info(
        "%s: %s",
        spec.name,
        "results recorded in the artifact" if write else "checked, nothing written",
    )
    return {"evaluation": evaluation, **results, "written": write}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_selection_arguments(parser, "verify")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"first {QUICK_EXAMPLES} examples only, short latency runs",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch and ONNX Runtime (default: all cores)",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="record the results in the artifacts (and remove rejected variants); "
        "without it, verification only checks and reports",
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="also write every measured figure here (JSON)"
    )
    args = parser.parse_args(argv)
    configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {}
    status = 0
    try:
        for name in args.model or list(REGISTRY):
            report[name] = verify_artifact(
                get_spec(name),
                args.artifacts_dir,
                args.data_dir,
                quick=args.quick,
                threads=args.threads,
                write=args.write,
            )
    except VerificationError as error:
        log.error("%s", error)
        status = 1
    if args.report:
        args.report.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
