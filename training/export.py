"""ONNX export of the registered models, and the INT8 / fp16 candidate variants.

    python -m training.export                          # every artifact under models/artifacts
    python -m training.export --model sst2-bilstm --artifacts-dir /tmp/artifacts

Writes ``model.onnx`` (fp32, opset ``OPSET``) into an artifact, plus candidate
variants: ``model.int8.onnx`` (dynamic INT8 quantization, for the CPU) and
``model.fp16.onnx`` (half-precision weights and arithmetic, for the GPU). Whether
a candidate is kept is decided by ``training.variants``, from its measured
accuracy and size;
``python -m training.pipeline`` runs export and verification in one atomic update
of the artifact, so an unverified graph is never released.

Exporter choice
---------------
The torch.export-based exporter (``dynamo=True``, PyTorch's default since 2.9),
followed by a second constant-folding pass with a raised size limit:

* Dynamic axes are declared as ``torch.export.Dim`` objects and checked
  symbolically while tracing, so an axis the code would quietly specialise (the
  "frozen dynamic shape" pitfall) fails the export instead of the first request
  with an unseen batch size. We trace with batch 3 and length 5, never 1, because
  torch.export specialises size-1 dimensions. The legacy TorchScript exporter
  (``dynamo=False``) only relabels the axes named in ``dynamic_axes``; a size the
  Python code turns into a number while tracing becomes a constant with at most a
  TracerWarning (for LSTMs it warns that a batch size other than the traced one
  "can cause an error"), and it is deprecated. For these three models both
  exporters gave correct graphs at every batch size and length we tried; the
  choice rests on the guard against freezing, the cleaner graph and support.
* The graph is smaller and plainer: for the BiLSTM, 51 nodes against the legacy
  exporter's 116, most of which are Shape/Gather/Unsqueeze/Concat chains that
  rebuild the LSTMs' zero initial states.
* Its one blemish is fixed here: onnxscript's default folding limit (8,192
  elements) leaves Slice/Concat nodes that reorder each LSTM's gate weights from
  PyTorch's (i, f, g, o) to ONNX's (i, o, f, c) layout on every call. Folding
  again with a higher limit turns them into plain initializers, which is also what
  lets dynamic INT8 quantization find and quantize the LSTM weights.
* Packed sequences, the LSTM pitfall both exporters share, never arise: the
  sentiment model runs its two LSTMs over the whole padded batch and handles
  lengths with gather/mask operations (see ``models/sentiment.py``), so the
  exported graph is exactly the PyTorch computation. ``tests/test_export.py`` and
  ``training.verify`` check batch sizes and lengths other than the traced ones.
* The generator's transposed convolutions are then rewritten as sub-pixel
  convolutions, which ONNX Runtime's CPU kernels run 1.6× faster for the same
  arithmetic (``training.subpixel``).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import onnxscript
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16

from models.artifacts import (
    METADATA_FILE,
    ONNX_FILE,
    ONNX_FILES,
    ONNX_FP16_FILE,
    ONNX_INT8_FILE,
    read_json,
    refresh_checksums,
    staged_artifact,
    write_json,
)
from models.registry import EXAMPLE_BATCH, EXAMPLE_LENGTH, REGISTRY, ModelSpec, get_spec
from training import subpixel
from training.common import add_model_selection_arguments
from training.log import configure_logging

log = logging.getLogger(__name__)

# The exporter's native opset for torch 2.14; pinned so a framework upgrade
# cannot change the released graphs silently. ONNX Runtime ≥ 1.17 runs it.
OPSET = 20
EXPORTER = (
    "torch.onnx.export(dynamo=True) + onnxscript constant folding"
    " + stride-2 ConvTranspose as sub-pixel Conv (training.subpixel)"
)
# Large enough to fold every weight re-layout in these models (the biggest is the
# embedding table), so no weight is rearranged at inference time.
FOLD_SIZE_LIMIT = 1 << 26
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"
# metadata.json sections written by training.verify about a particular graph.
VERIFICATION_SECTIONS = ("parity", "variants")


def example_inputs(spec: ModelSpec, config: Any) -> tuple[torch.Tensor, ...]:
    """The inputs the export traces with (the spec's example at the traced sizes)."""
    arrays = spec.example_inputs(config, EXAMPLE_BATCH, seed=0, sequence_length=EXAMPLE_LENGTH)
    return tuple(torch.from_numpy(array) for array in arrays)


# --- fp32 export --------------------------------------------------------------------


def dynamic_shapes(spec: ModelSpec) -> dict[str, dict[int, torch.export.Dim]]:
    """``spec.onnx.dynamic_axes`` as torch.export dims; one Dim per axis name, shared
    between inputs, so e.g. ``token_ids`` and ``lengths`` must agree on the batch."""
    dims: dict[str, torch.export.Dim] = {}
    shapes: dict[str, dict[int, torch.export.Dim]] = {}
    for name in spec.onnx.inputs:
        axes = spec.onnx.dynamic_axes.get(name, {})
        shapes[name] = {
            axis: dims.setdefault(label, torch.export.Dim(label, min=1))
            for axis, label in axes.items()
        }
    return shapes


def check_signature(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """The graph's input/output names match the registry and every dynamic axis is symbolic."""
    inputs = tuple(value.name for value in model.graph.input)
    outputs = tuple(value.name for value in model.graph.output)
    if inputs != spec.onnx.inputs or outputs != spec.onnx.outputs:
        raise ValueError(
            f"{spec.name}: exported graph has inputs {inputs} and outputs {outputs}; "
            f"the registry expects {spec.onnx.inputs} and {spec.onnx.outputs}"
        )
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, label in spec.onnx.dynamic_axes.get(value.name, {}).items():
            if not dims[axis].dim_param:
                raise ValueError(
                    f"{spec.name}: axis {axis} ({label}) of {value.name!r} was frozen to "
                    f"{dims[axis].dim_value} during export; it must stay dynamic"
                )


def _rename_axes(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """Give every dynamic axis the registry's name (the exporter may invent its own for outputs)."""
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, label in spec.onnx.dynamic_axes.get(value.name, {}).items():
            if dims[axis].dim_param:
                dims[axis].dim_param = label


def _strip_stack_traces(model: onnx.ModelProto) -> None:
    """Drop the per-node Python stack traces the exporter records: they hold absolute
    paths and line numbers, so the same weights exported from another checkout (or
    after an unrelated edit) would otherwise give a different file and model version."""
    for node in model.graph.node:
        kept = [entry for entry in node.metadata_props if entry.key != STACK_TRACE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def export_onnx(
    spec: ModelSpec, module: torch.nn.Module, config: Any, *, subpixel_upsampling: bool = True
) -> onnx.ModelProto:
    """Export ``module`` (moved to the CPU, eval mode) and return the checked ONNX model.

    ``subpixel_upsampling=False`` keeps transposed convolutions as the exporter writes
    them (``bench.micro`` times both graphs).
    """
    module = module.to("cpu").eval()
    example = example_inputs(spec, config)
    with warnings.catch_warnings():
        # Known, harmless notices from torch.export about nn.LSTM's cached flat weights
        # and about a deprecated helper the exporter itself calls.
        warnings.filterwarnings("ignore", message=r".*_flat_weights.*")
        warnings.filterwarnings("ignore", message=r".*_check_is_size.*")
        warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used.*")
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            input_names=list(spec.onnx.inputs),
            output_names=list(spec.onnx.outputs),
            dynamic_shapes=dynamic_shapes(spec),
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    model = onnxscript.optimizer.optimize(
        program.model_proto, input_size_limit=FOLD_SIZE_LIMIT, output_size_limit=FOLD_SIZE_LIMIT
    )
    if subpixel_upsampling:
        model, _ = subpixel.rewrite_upsampling(model)
    _rename_axes(model, spec)
    _strip_stack_traces(model)
    model.doc_string = f"{spec.name}: {spec.description}"
    onnx.checker.check_model(model, full_check=True)
    check_signature(model, spec)
    return model


# --- variants -----------------------------------------------------------------------


@dataclass(frozen=True)
class OnnxVariant:
    """A lower-precision copy of the fp32 graph, built for one kind of device."""

    precision: str
    filename: str
    target_device: str
    description: str
    build: Callable[[onnx.ModelProto], onnx.ModelProto]


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``Gemm(A, B, C)`` with a constant B as ``MatMul(A, B') + C``.

    ONNX Runtime's dynamic quantizer handles MatMul but not Gemm, and the exporter
    writes every ``nn.Linear`` on a 2-D input as Gemm.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    rewritten = []
    for node in model.graph.node:
        attributes = {
            attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute
        }
        if (
            node.op_type != "Gemm"
            or node.input[1] not in initializers
            or attributes.get("transA", 0)
            or attributes.get("alpha", 1.0) != 1.0
            or attributes.get("beta", 1.0) != 1.0
        ):
            rewritten.append(node)
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if attributes.get("transB", 0):
            weight = weight.T
        weight_name = f"{node.input[1]}_matmul"
        model.graph.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(weight), weight_name)
        )
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        rewritten.append(
            helper.make_node(
                "MatMul", [node.input[0], weight_name], [product], name=f"{node.name}_matmul"
            )
        )
        if has_bias:
            rewritten.append(
                helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"
                )
            )
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    used = {name for node in model.graph.node for name in node.input}
    kept = [tensor for tensor in model.graph.initializer if tensor.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


# Conv is left in fp32: ONNX Runtime's ConvInteger kernel is far slower than its
# fp32 convolution for a network this small (measured on the MNIST CNN, one CPU
# thread: 0.85 ms against 0.17 ms at batch 1, 273 ms against 51 ms at batch 256),
# and the convolutions hold under 5 % of the classifier's weights. The fully
# connected layers, the embedding table and the LSTMs hold the rest.
INT8_OP_TYPES = ("MatMul", "Gather", "LSTM")


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantizer logs through the root logger: one INFO line per tensor
    it skips, and advice to run its pre-processing, which would fuse MatMul + Add back
    into the Gemm it cannot quantize."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic INT8 quantization (weights int8, activations quantized per call)."""
    with tempfile.TemporaryDirectory() as scratch, _quiet_root_logger():
        source, target = Path(scratch, "fp32.onnx"), Path(scratch, "int8.onnx")
        onnx.save_model(gemm_to_matmul(model), source)
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=list(INT8_OP_TYPES),
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
        quantized = onnx.load_model(target)
    onnx.checker.check_model(quantized)
    return quantized


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Half-precision weights and arithmetic; inputs and outputs stay fp32 for callers."""
    converted = convert_float_to_float16(
        onnx.ModelProto.FromString(model.SerializeToString()), keep_io_types=True
    )
    # The converter appends the input casts at the end of the node list; ONNX
    # requires topological order.
    graph = ir.from_proto(converted)
    graph.graph.sort()
    converted = ir.to_proto(graph)
    onnx.checker.check_model(converted)
    return converted


INT8 = OnnxVariant("int8", ONNX_INT8_FILE, "cpu", "dynamic INT8 quantization", quantize_int8)
FP16 = OnnxVariant("fp16", ONNX_FP16_FILE, "gpu", "float16 weights and arithmetic", convert_fp16)
# Each spec lists its candidates by precision (``spec.variants``) and says why.
VARIANTS: dict[str, OnnxVariant] = {variant.precision: variant for variant in (INT8, FP16)}


def variant_candidates(spec: ModelSpec) -> tuple[OnnxVariant, ...]:
    return tuple(VARIANTS[precision] for precision in spec.variants)


# --- artifact level -----------------------------------------------------------------


def framework_versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def export_into(spec: ModelSpec, directory: Path) -> dict[str, Any]:
    """Export the artifact in (staging) ``directory``: fp32 graph plus candidate variants.

    Records the export in metadata.json's ``onnx`` section and returns it. Variant
    files are candidates until ``training.variants`` keeps or drops them.
    """
    artifact = spec.load_artifact(directory)
    module = spec.load_module(artifact, device="cpu")
    model = export_onnx(spec, module, artifact.config)
    # Files from an earlier export must not outlive it (a variant dropped now, say).
    for filename in ONNX_FILES.values():
        (directory / filename).unlink(missing_ok=True)
    onnx.save_model(model, directory / ONNX_FILE)
    files = {"fp32": ONNX_FILE}
    for variant in variant_candidates(spec):
        onnx.save_model(variant.build(model), directory / variant.filename)
        files[variant.precision] = variant.filename
    example = example_inputs(spec, artifact.config)
    section = {
        "exporter": EXPORTER,
        "opset": OPSET,
        "inputs": list(spec.onnx.inputs),
        "outputs": list(spec.onnx.outputs),
        "dynamic_axes": {
            name: {str(axis): label for axis, label in axes.items()}
            for name, axes in spec.onnx.dynamic_axes.items()
        },
        "traced_shapes": {
            name: list(tensor.shape) for name, tensor in zip(spec.onnx.inputs, example, strict=True)
        },
        "files": files,
        "verified": False,
        "framework_versions": framework_versions(),
    }
    metadata = read_json(directory / METADATA_FILE)
    # Measurements of an earlier graph do not describe this one.
    for stale in VERIFICATION_SECTIONS:
        metadata.pop(stale, None)
    write_json(directory / METADATA_FILE, {**metadata, "onnx": section})
    refresh_checksums(directory)
    log.info("%s: exported %s", spec.name, ", ".join(files.values()))
    return section


def export_artifact(spec: ModelSpec, root: Path | None = None) -> dict[str, Any]:
    """Export one artifact in place, atomically (the old files stay until it succeeds)."""
    with staged_artifact(spec.artifact_dir(root)) as staging:
        return export_into(spec, staging)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_selection_arguments(parser, "export")
    args = parser.parse_args(argv)
    configure_logging()
    for name in args.model or list(REGISTRY):
        export_artifact(get_spec(name), args.artifacts_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
