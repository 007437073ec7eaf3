"""The sub-pixel rewrite of stride-2 transposed convolutions (training/subpixel.py).

Small graphs built by hand, with random weights and shapes that are neither
square nor multiples of ONNX Runtime's channel blocks, run in ONNX Runtime before
and after the rewrite. The exported generator itself is compared with PyTorch in
tests/test_export.py.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.onnx_session import open_session
from training.subpixel import rewrite_upsampling

CHANNELS, OUT_CHANNELS, LAST_CHANNELS = 5, 3, 2
HEIGHT, WIDTH = 4, 6


def upsampling_graph(
    *,
    activation: str | None = "Relu",
    last_conv: bool = True,
    last_activation: str | None = "Tanh",
    bias: bool = True,
    conv_transpose: dict | None = None,
    extra_reader: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """x → ConvTranspose → [activation] → [3×3 Conv → [activation]] → y."""
    rng = np.random.default_rng(seed)
    attributes = {"kernel_shape": [4, 4], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    attributes.update(conv_transpose or {})
    kernel = attributes["kernel_shape"]
    initializers = [
        numpy_helper.from_array(
            rng.standard_normal((CHANNELS, OUT_CHANNELS, *kernel)).astype(np.float32), "w"
        )
    ]
    inputs = ["x", "w"]
    if bias:
        initializers.append(
            numpy_helper.from_array(rng.standard_normal(OUT_CHANNELS).astype(np.float32), "b")
        )
        inputs.append("b")
    nodes = [helper.make_node("ConvTranspose", inputs, ["up"], name="up", **attributes)]
    outputs = []
    current = "up"
    if activation:
        nodes.append(helper.make_node(activation, [current], ["up_act"], name="up_act"))
        current = "up_act"
    if extra_reader:
        nodes.append(helper.make_node("Identity", [current], ["seen"], name="seen"))
        outputs.append(helper.make_tensor_value_info("seen", TensorProto.FLOAT, [None] * 4))
    if last_conv:
        initializers += [
            numpy_helper.from_array(
                rng.standard_normal((LAST_CHANNELS, OUT_CHANNELS, 3, 3)).astype(np.float32), "k"
            ),
            numpy_helper.from_array(rng.standard_normal(LAST_CHANNELS).astype(np.float32), "c"),
        ]
        nodes.append(
            helper.make_node(
                "Conv",
                [current, "k", "c"],
                ["last"],
                name="last",
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            )
        )
        current = "last"
        if last_activation:
            nodes.append(helper.make_node(last_activation, [current], ["y"], name="last_act"))
            current = "y"
    outputs.insert(0, helper.make_tensor_value_info(current, TensorProto.FLOAT, [None] * 4))
    graph = helper.make_graph(
        nodes,
        "upsampling",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", CHANNELS, None, None])],
        outputs,
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return open_session(model.SerializeToString(), threads=1).run(None, {"x": x})


def assert_same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    onnx.checker.check_model(rewritten, full_check=True)
    rng = np.random.default_rng(1)
    for batch, height, width in ((1, HEIGHT, WIDTH), (3, 7, 5), (2, 1, 1)):
        x = rng.standard_normal((batch, CHANNELS, height, width)).astype(np.float32)
        expected, actual = run(original, x), run(rewritten, x)
        for want, got in zip(expected, actual, strict=True):
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-5


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize(
    "shape",
    [
        {},
        {"activation": None},
        {"bias": False},
        {"last_activation": None},
        {"activation": "Sigmoid", "last_activation": "Relu"},
        {"last_conv": False},
        {"last_conv": False, "activation": None},
    ],
)
def test_rewrite_gives_the_same_images(shape):
    original = upsampling_graph(**shape)
    rewritten, count = rewrite_upsampling(original)
    assert count == 1
    ops = op_counts(rewritten)
    assert "ConvTranspose" not in ops
    # Four phase convolutions, plus the last layer's when it was folded in.
    assert ops["Conv"] == 4 + shape.get("last_conv", True)
    assert ops["DepthToSpace"] == 1
    assert_same_outputs(original, rewritten)


def test_activations_fuse_into_the_phases_and_only_the_last_output_is_interleaved():
    rewritten, _ = rewrite_upsampling(upsampling_graph())
    order = [node.op_type for node in rewritten.graph.node]
    assert order == ["Conv", "Relu"] * 4 + ["Concat", "Conv", "Tanh", "DepthToSpace"]
    interleave = rewritten.graph.node[-1]
    assert interleave.output[0] == "y"  # the graph's output name is kept


def test_a_tensor_read_elsewhere_is_still_produced():
    original = upsampling_graph(extra_reader=True)
    rewritten, count = rewrite_upsampling(original)
    assert count == 1
    # The activation's output has a second reader, so the 3×3 Conv stays as it was,
    # on the interleaved image.
    assert op_counts(rewritten)["DepthToSpace"] == 1
    assert_same_outputs(original, rewritten)


@pytest.mark.parametrize(
    "attributes",
    [
        {"strides": [1, 1]},
        {"pads": [0, 0, 0, 0]},
        {"kernel_shape": [3, 3]},
        {"output_padding": [1, 1]},
        {"dilations": [2, 2]},
    ],
)
def test_other_transposed_convolutions_are_left_alone(attributes):
    original = upsampling_graph(conv_transpose=attributes, last_conv=False)
    rewritten, count = rewrite_upsampling(original)
    assert count == 0
    assert rewritten.SerializeToString() == original.SerializeToString()
