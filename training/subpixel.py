"""Stride-2 transposed convolutions rewritten as sub-pixel convolutions, in an ONNX graph.

A ``ConvTranspose`` with stride 2, a 4×4 kernel and padding 1 (the digit
generator's two upsampling layers) doubles each side of its input. Each output
pixel reads a 2×2 window of the input, through one of four 2×2 slices of the
kernel; which window and which slice depend only on the pixel's *phase* (the
parity of its row and of its column). So the layer is exactly four ordinary 2×2
convolutions, one per phase, whose outputs interleave into the doubled image
(``DepthToSpace``).

The arithmetic is the same; where it runs is not. ONNX Runtime's CPU
``ConvTranspose`` is a matrix product per image followed by a scalar col2im
scatter, while ``Conv`` runs in its blocked (NCHWc) convolution kernels, and an
activation right after a ``Conv`` is fused into it. For the generator on two
cores, 256 rows: 55 ms against 89 ms (``docs/benchmarks.md``, fifth round).

Two more steps keep data out of the interleave, which is a plain memory shuffle
and costs as much as a convolution here:

* an element-wise activation after the transposed convolution is applied to each
  phase (it commutes with interleaving), so it fuses into the phase's ``Conv``;
* a 3×3, stride-1, padding-1 ``Conv`` that reads the doubled image (the
  generator's last layer) is computed on the four phase images instead, as one
  3×3 ``Conv`` whose output channels are again phases. Only its output, with far
  fewer channels, is interleaved.

The rewrite is exact up to float rounding (``tests/test_export.py`` and
``training.verify`` compare it with PyTorch); other nodes are left as they are.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Phases in DepthToSpace's DCR channel order: (row parity, column parity).
PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))
# For an output row 2m + parity, the kernel rows that meet input rows (m - 1, m)
# (parity 0) or (m, m + 1) (parity 1); the same holds for columns.
KERNEL_TAPS = {0: (3, 1), 1: (2, 0)}
# The input padding that makes a 2×2 convolution read exactly those rows:
# (before, after).
PHASE_PADS = {0: (1, 0), 1: (0, 1)}
# Activations that act on each element alone, so they commute with interleaving.
ELEMENTWISE = frozenset({"Relu", "Tanh", "Sigmoid"})


def _attributes(node: onnx.NodeProto) -> dict:
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _is_2d_convolution(
    node: onnx.NodeProto,
    weights: dict[str, np.ndarray],
    op_type: str,
    *,
    kernel: tuple[int, int],
    stride: int,
) -> bool:
    """``node`` is ``op_type`` with constant weights (and bias), one group, no dilation,
    explicit padding of 1 on every side, and the given kernel and stride."""
    if node.op_type != op_type or node.input[1] not in weights:
        return False
    if len(node.input) > 2 and node.input[2] and node.input[2] not in weights:
        return False
    weight = weights[node.input[1]]
    attributes = _attributes(node)
    return (
        weight.ndim == 4
        and weight.shape[2:] == kernel
        and tuple(attributes.get("strides", (1, 1))) == (stride, stride)
        and tuple(attributes.get("pads", (0, 0, 0, 0))) == (1, 1, 1, 1)
        and tuple(attributes.get("dilations", (1, 1))) == (1, 1)
        and attributes.get("group", 1) == 1
        and attributes.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    )


def _is_stride2_upsampling(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> bool:
    attributes = _attributes(node)
    return (
        _is_2d_convolution(node, weights, "ConvTranspose", kernel=(4, 4), stride=2)
        and tuple(attributes.get("output_padding", (0, 0))) == (0, 0)
        and "output_shape" not in attributes
    )


def _is_same_size_3x3(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> bool:
    return _is_2d_convolution(node, weights, "Conv", kernel=(3, 3), stride=1)


def phase_kernels(weight: np.ndarray) -> list[np.ndarray]:
    """The four ``Cout×Cin×2×2`` Conv kernels of a ``Cin×Cout×4×4`` ConvTranspose kernel."""
    kernels = []
    for row_parity, column_parity in PHASES:
        rows, columns = KERNEL_TAPS[row_parity], KERNEL_TAPS[column_parity]
        taps = weight[:, :, rows, :][:, :, :, columns]
        kernels.append(np.ascontiguousarray(taps.transpose(1, 0, 2, 3)))
    return kernels


def phase_space_kernel(kernel: np.ndarray) -> np.ndarray:
    """A ``Co×C×3×3`` same-size kernel, as one acting on the four phase images.

    Input and output channels are ``phase × channels`` in DCR order. The phase
    images are half the size, so a tap ``dy`` rows from an output pixel of row
    parity ``p`` lands in the phase image of parity ``(p + dy) % 2``, shifted by
    ``(p + dy) // 2`` rows (one of -1, 0, 1). Zero padding agrees on both sides:
    a tap falls off the full image exactly when it falls off the phase image.
    """
    out_channels, channels = kernel.shape[:2]
    phased = np.zeros((4 * out_channels, 4 * channels, 3, 3), dtype=kernel.dtype)
    for out_phase, (out_row, out_column) in enumerate(PHASES):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                in_phase = PHASES.index(((out_row + dy) % 2, (out_column + dx) % 2))
                shift_y, shift_x = (out_row + dy) // 2, (out_column + dx) // 2
                phased[
                    out_phase * out_channels : (out_phase + 1) * out_channels,
                    in_phase * channels : (in_phase + 1) * channels,
                    shift_y + 1,
                    shift_x + 1,
                ] += kernel[:, :, dy + 1, dx + 1]
    return phased


@dataclass
class _Rewriter:
    """One pass over a graph; nodes it folds into a rewrite are emitted by that rewrite."""

    graph: onnx.GraphProto

    def __post_init__(self) -> None:
        self.weights = {
            tensor.name: numpy_helper.to_array(tensor) for tensor in self.graph.initializer
        }
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.graph_outputs = {value.name for value in self.graph.output}
        self.absorbed: set[int] = set()
        self.new_initializers: list[onnx.TensorProto] = []

    def sole_consumer(self, name: str, accept) -> onnx.NodeProto | None:
        """The one node reading ``name``, if ``accept`` takes it and nothing else needs ``name``."""
        readers = self.consumers.get(name, [])
        if name in self.graph_outputs or len(readers) != 1 or not accept(readers[0]):
            return None
        return readers[0]

    def constant(self, array: np.ndarray, name: str) -> str:
        self.new_initializers.append(numpy_helper.from_array(array, name))
        return name

    def bias(self, node: onnx.NodeProto, channels: int, dtype) -> np.ndarray:
        if len(node.input) > 2 and node.input[2]:
            return self.weights[node.input[2]]
        return np.zeros(channels, dtype=dtype)

    def activation_after(self, name: str) -> onnx.NodeProto | None:
        return self.sole_consumer(name, lambda node: node.op_type in ELEMENTWISE)

    def rewrite(self) -> int:
        """Rewrite every matching ConvTranspose in place; returns how many."""
        emitted: list[onnx.NodeProto] = []
        count = 0
        for node in self.graph.node:
            if id(node) in self.absorbed:
                continue
            if _is_stride2_upsampling(node, self.weights):
                emitted.extend(self.upsampling(node))
                count += 1
            else:
                emitted.append(node)
        del self.graph.node[:]
        self.graph.node.extend(emitted)
        self.graph.initializer.extend(self.new_initializers)
        return count

    def upsampling(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """Phase convolutions (+ activation), optionally a phase-space 3×3 Conv, interleave."""
        prefix = node.name or node.output[0]
        weight = self.weights[node.input[1]]
        out_channels = weight.shape[1]
        bias = self.bias(node, out_channels, weight.dtype)
        activation = self.activation_after(node.output[0])
        result = node.output[0]
        if activation is not None:
            self.absorbed.add(id(activation))
            result = activation.output[0]

        # Every phase adds the same per-channel bias.
        bias_name = self.constant(bias, f"{prefix}_phase_bias")
        nodes, phases = [], []
        for index, ((row, column), kernel) in enumerate(
            zip(PHASES, phase_kernels(weight), strict=True)
        ):
            (top, bottom), (left, right) = PHASE_PADS[row], PHASE_PADS[column]
            phase = f"{prefix}_phase{index}"
            nodes.append(
                helper.make_node(
                    "Conv",
                    [
                        node.input[0],
                        self.constant(kernel, f"{prefix}_phase{index}_weight"),
                        bias_name,
                    ],
                    [phase],
                    name=phase,
                    kernel_shape=[2, 2],
                    pads=[top, left, bottom, right],
                )
            )
            if activation is not None:
                nodes.append(
                    helper.make_node(
                        activation.op_type,
                        [phase],
                        [f"{phase}_{activation.op_type.lower()}"],
                        name=f"{phase}_{activation.op_type.lower()}",
                    )
                )
            phases.append(nodes[-1].output[0])
        stacked = f"{prefix}_phases"
        nodes.append(helper.make_node("Concat", phases, [stacked], name=stacked, axis=1))

        follower = self.sole_consumer(
            result, lambda reader: _is_same_size_3x3(reader, self.weights)
        )
        if follower is not None:
            self.absorbed.add(id(follower))
            nodes.extend(self.phase_space_conv(follower, stacked))
            return nodes
        nodes.append(_interleave(stacked, result, f"{prefix}_interleave"))
        return nodes

    def phase_space_conv(self, conv: onnx.NodeProto, stacked: str) -> list[onnx.NodeProto]:
        """``conv`` (and an activation after it) on the phase images, then the interleave."""
        prefix = conv.name or conv.output[0]
        kernel = self.weights[conv.input[1]]
        bias = self.bias(conv, kernel.shape[0], kernel.dtype)
        result = conv.output[0]
        phased = f"{prefix}_phases"
        nodes = [
            helper.make_node(
                "Conv",
                [
                    stacked,
                    self.constant(phase_space_kernel(kernel), f"{prefix}_phase_weight"),
                    self.constant(np.tile(bias, 4), f"{prefix}_phase_bias"),
                ],
                [phased],
                name=phased,
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            )
        ]
        activation = self.activation_after(result)
        if activation is not None:
            self.absorbed.add(id(activation))
            result = activation.output[0]
            nodes.append(
                helper.make_node(
                    activation.op_type, [phased], [f"{phased}_activated"], name=f"{phased}_act"
                )
            )
        nodes.append(_interleave(nodes[-1].output[0], result, f"{prefix}_interleave"))
        return nodes


def _interleave(phases: str, output: str, name: str) -> onnx.NodeProto:
    return helper.make_node("DepthToSpace", [phases], [output], name=name, blocksize=2, mode="DCR")


def rewrite_upsampling(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every stride-2, 4×4, padding-1 ``ConvTranspose`` (with
    constant weights) computed as sub-pixel convolutions; also how many were rewritten."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    count = _Rewriter(model.graph).rewrite()
    if count:
        used = {name for node in model.graph.node for name in node.input}
        produced = {name for node in model.graph.node for name in node.output}
        kept = [tensor for tensor in model.graph.initializer if tensor.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        # Shapes recorded for tensors the rewrite removed would describe nothing.
        stale = [value for value in model.graph.value_info if value.name not in produced]
        for value in stale:
            model.graph.value_info.remove(value)
    return model, count
