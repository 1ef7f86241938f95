"""2-D max and average pooling as our own CPU kernel (`pruneaug.codegen.pooling`): which pools the rewrite
takes, and outputs against onnxruntime (max pooling bit for bit)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from pruneaug.codegen import relax_build
from pruneaug.codegen.pooling import PoolGeometry
from pruneaug.codegen.relax_build import _run_compiled, build_model, rewritten_model
from test_relax_build import ort_outputs, x86  # noqa: F401 (x86: the fixture)


def pool_model(op: str, x_shape: list[int], **attrs) -> onnx.ModelProto:
    """`op(x)` (MaxPool or AveragePool) with its ONNX attributes."""
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def pools_left_to_tvm(model: onnx.ModelProto, target) -> int:
    script = rewritten_model(model, {}, target)["main"].script()
    return script.count("R.nn.max_pool2d(") + script.count("R.nn.avg_pool2d(")


# op, input shape, attributes, ours (False: left to TVM's own op)
CASES = [
    ("MaxPool", [2, 3, 20, 37], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), True),  # 17 interior cols
    ("MaxPool", [1, 5, 9, 11], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), True),
    ("MaxPool", [1, 4, 8, 21], dict(kernel_shape=[3, 2], pads=[1, 0, 0, 1]), True),  # asymmetric: top 1, right 1
    ("MaxPool", [1, 2, 10, 40], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), True),  # last window past X
    ("MaxPool", [1, 3, 3, 3], dict(kernel_shape=[5, 5], pads=[2, 2, 2, 2]), True),  # windows wider than the map
    ("MaxPool", [1, 4, 12, 12], dict(kernel_shape=[2, 2], strides=[2, 2]), False),  # 6 strided columns: TVM's
    ("MaxPool", [1, 2, 9, 9], dict(kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 2, 2, 2]), False),  # dilated
    ("MaxPool", [1, 3, 8, 9], dict(kernel_shape=[8, 9]), False),  # 72 taps: a global max, TVM's
    ("MaxPool", [1, 3, 8, 8], dict(kernel_shape=[8, 8]), True),  # 64
    ("AveragePool", [2, 3, 9, 11], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), True),  # pads not counted
    ("AveragePool", [1, 3, 9, 11], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), True),
    ("AveragePool", [1, 2, 11, 45], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), True),
    ("AveragePool", [1, 4, 6, 21], dict(kernel_shape=[2, 2], strides=[1, 1]), True),
    ("AveragePool", [1, 2, 10, 40], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), False),  # TVM's
]


@pytest.mark.parametrize("op, x_shape, attrs, ours", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_pools_match_onnxruntime(x86, op, x_shape, attrs, ours):
    model = pool_model(op, x_shape, **attrs)
    assert pools_left_to_tvm(model, x86) == (0 if ours else 1)
    rng = np.random.default_rng(len(x_shape) + sum(x_shape))
    for x in (rng.standard_normal(x_shape).astype(np.float32), -rng.uniform(1, 2, x_shape).astype(np.float32)):
        # all negative: a max that started from 0, or read zero padding, would show
        [ours_y] = _run_compiled(build_model(model, {}, x86, {"x": x_shape}), model, {"x": x}, x86)
        [ort_y] = ort_outputs(model, {"x": x})
        assert ours_y.shape == ort_y.shape
        if op == "MaxPool":
            np.testing.assert_array_equal(ours_y, ort_y)
        else:
            np.testing.assert_allclose(ours_y, ort_y, rtol=1e-5, atol=1e-6)


def test_the_resnet_stem_pool_runs_on_the_thread_pool_and_matches(x86, monkeypatch):
    """64x56x56 outputs of 9 taps: worth the pool's threads (`threads.worth_parallel`) where there are two."""
    made = []
    real = relax_build.pooling.pool2d_primfunc
    monkeypatch.setattr(relax_build.pooling, "pool2d_primfunc", lambda *key: made.append(key) or real(*key))
    model = pool_model("MaxPool", [1, 64, 112, 112], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    x = np.random.default_rng(0).standard_normal([1, 64, 112, 112]).astype(np.float32)
    [ours_y] = _run_compiled(build_model(model, {}, x86, {"x": [1, 64, 112, 112]}), model, {"x": x}, x86)
    np.testing.assert_array_equal(ours_y, ort_outputs(model, {"x": x})[0])
    [(kind, geo, parallel, include_pad)] = made
    assert (kind, geo.out_hw, geo.interior, include_pad) == ("max", (56, 56), (1, 56), False)
    assert parallel == int(x86.cores > 1)


@pytest.mark.parametrize("geo, interior, overlap", [
    (PoolGeometry((1, 1, 8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (8, 8)), (1, 7), True),
    (PoolGeometry((1, 1, 112, 112), (3, 3), (2, 2), (1, 1, 1, 1), (56, 56)), (1, 56), True),
    (PoolGeometry((1, 1, 4, 4), (2, 2), (2, 2), (2, 2, 0, 0), (3, 3)), (1, 3), False),  # pad 2 >= kernel 2
    (PoolGeometry((1, 1, 5, 5), (2, 2), (2, 2), (0, 0, 3, 3), (5, 5)), (0, 2), False),  # last window all padding
    (PoolGeometry((1, 1, 3, 3), (5, 5), (1, 1), (2, 2, 2, 2), (3, 3)), (2, 2), True),  # no interior column
])
def test_pool_geometry_interior_and_overlap(geo, interior, overlap):
    assert geo.interior == interior
    assert geo.windows_overlap_input() == overlap


def test_kernels_of_one_op_with_two_shapes_in_one_model_match_onnxruntime(x86):
    """Two max pools, two softmaxes and two layer norms of different shapes: one kernel each, under distinct
    names (TVMScript names every kernel of an op alike; the module took two as a duplicate symbol)."""
    shape = [1, 4, 8, 16]
    rng = np.random.default_rng(1)
    inits = {f"{name}{width}": rng.standard_normal(width).astype(np.float32)
             for name in ("scale", "shift") for width in (15, 16)}
    nodes = [helper.make_node("MaxPool", ["x"], ["p16"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),  # [1, 4, 8, 16]
             helper.make_node("MaxPool", ["x"], ["p15"], kernel_shape=[2, 2]),  # [1, 4, 7, 15]
             *(node for width in (15, 16) for node in (
                 helper.make_node("Softmax", [f"p{width}"], [f"s{width}"], axis=-1),
                 helper.make_node("LayerNormalization", [f"s{width}", f"scale{width}", f"shift{width}"], [f"y{width}"],
                                  axis=-1)))]
    graph = helper.make_graph(nodes, "two_shapes", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(f"y{width}", onnx.TensorProto.FLOAT, None)
                               for width in (15, 16)],
                              [onnx.numpy_helper.from_array(value, name) for name, value in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    script = rewritten_model(model, {}, x86)["main"].script()
    assert [script.count(f"R.call_tir({op}") for op in ("max_pool2d", "softmax", "layer_norm")] == [2, 2, 2]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ours = _run_compiled(build_model(model, {}, x86, {"x": shape}), model, {"x": x}, x86)
    for ours_y, ort_y in zip(ours, ort_outputs(model, {"x": x}), strict=True):
        np.testing.assert_allclose(ours_y, ort_y, rtol=1e-4, atol=1e-5)
