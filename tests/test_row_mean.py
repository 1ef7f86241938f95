"""Means over trailing axes (`codegen/row_mean.py`, ReduceMean as a global average pool) in our kernel,
against onnxruntime; the means left to TVM named."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from pruneaug.codegen import relax_build, row_mean
from pruneaug.codegen.relax_build import build_model
from test_relax_build import assert_matches_onnxruntime, recorded_calls, x86  # noqa: F401 (the fixture)


def mean_model(x_shape: list[int], axes: list[int], keepdims: int) -> onnx.ModelProto:
    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=axes, keepdims=keepdims)
    graph = helper.make_graph([node], "mean", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("x_shape, axes, keepdims, ours", [
    ([2, 24, 20, 20], [2, 3], 1, True),     # a squeeze-and-excite block's pool, two images
    ([1, 40, 7, 7], [-1, -2], 0, True),     # 49 columns: 3 vectors of 16 and one left over
    ([3, 5, 37], [2], 1, True),             # one trailing axis, ragged
    ([1, 64, 112, 112], [2, 3], 1, True),   # on the thread pool
    ([2, 24, 20, 20], [1], 1, False),       # a middle axis: TVM's
    ([4, 6, 3], [2], 1, False),             # rows shorter than a vector: TVM's
])
def test_a_mean_over_trailing_axes_is_our_kernel_and_matches_onnxruntime(x86, monkeypatch, x_shape, axes, keepdims,
                                                                         ours):
    built = recorded_calls(monkeypatch, row_mean, "row_mean_primfunc")
    model = mean_model(x_shape, axes, keepdims)
    x = (np.random.default_rng(5).standard_normal(x_shape) * 3 + 1).astype(np.float32)
    assert_matches_onnxruntime(build_model(model, {}, x86, {"x": x_shape}), model, {"x": x})
    assert len(built) == (1 if ours else 0)
    if ours:
        assert built[0][0] == tuple(x_shape) and built[0][2] == relax_build._vector_lanes(x86)
