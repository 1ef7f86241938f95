"""Importance: magnitude, activation-aware norms against explicit numpy im2col, and zeros."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from reference import im2col, node_tensors
from pruneaug.ir.graph import lift
from pruneaug.passes import importance
from pruneaug.passes.activations import resolve_pads


def conv_model(kernel, **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((6, 4, *kernel)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 11, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kernel,attrs", [
    ((3, 3), {"pads": [1, 1, 1, 1]}),
    ((3, 3), {"strides": [2, 2], "pads": [1, 0, 0, 1]}),
    ((3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    ((1, 3), {"pads": [0, 1, 0, 1], "strides": [1, 2]}),
    ((3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((2, 2), {"auto_pad": "SAME_LOWER"}),
    ((1, 1), {}),
])
def test_conv_column_norms_match_im2col(kernel, attrs):
    model = conv_model(kernel, **attrs)
    ir = lift(model)
    x = np.random.default_rng(0).standard_normal((3, 4, 11, 9)).astype(np.float32)
    norms = importance.input_column_norms(ir, {"x": x})["conv"]
    conv = ir.layer("conv").conv
    columns = im2col(x.astype(np.float64), conv.kernel, conv.strides, resolve_pads(conv, x.shape[2:]), conv.dilations)
    np.testing.assert_allclose(norms, np.linalg.norm(columns, axis=0), rtol=1e-5)
    rows = node_tensors(ir, {"x": x}, ["y"])["y"]
    assert columns.shape[0] == rows.shape[0] * rows.shape[2] * rows.shape[3]  # the padding resolved as onnxruntime's


def test_matmul_norms_cover_every_row_of_3d_activations():
    model = zoo.transformer_block()
    ir = lift(model)
    inputs = zoo.random_inputs(model, batch=3)
    node = ir.prunable_nodes()[0]
    x_name = ir.graph.nodes[node]["proto"].input[0]
    x = node_tensors(ir, inputs, [x_name])[x_name]
    norms = importance.input_column_norms(ir, inputs, batch_size=1)[node]  # batched in ones: sums must add up
    np.testing.assert_allclose(norms, np.linalg.norm(x.reshape(-1, x.shape[-1]), axis=0), rtol=1e-5)


def test_gemm_trans_a_norms_use_the_columns_of_a_transposed():
    ir = lift(zoo.gemm_variants())
    inputs = zoo.random_inputs(zoo.gemm_variants(), batch=4)
    for node in ir.prunable_nodes():
        proto = ir.graph.nodes[node]["proto"]
        x = node_tensors(ir, inputs, [proto.input[0]])[proto.input[0]]
        trans_a = any(a.name == "transA" and a.i for a in proto.attribute)
        a = x.T if trans_a else x
        norms = importance.input_column_norms(ir, inputs)[node]
        np.testing.assert_allclose(norms, np.linalg.norm(a, axis=0), rtol=1e-5, err_msg=node)


def test_shared_weight_sums_both_readers():
    model = zoo.shared_weight()
    ir = lift(model)
    inputs = zoo.random_inputs(model, batch=2)
    node = next(n for n in ir.prunable_nodes() if len(ir.layer(n).nodes) == 2)
    xs = [ir.graph.nodes[r]["proto"].input[0] for r in ir.layer(node).nodes]
    values = node_tensors(ir, inputs, sorted(set(xs)))
    squares = sum(np.square(values[x].reshape(-1, values[x].shape[-1])).sum(axis=0) for x in xs)
    np.testing.assert_allclose(importance.input_column_norms(ir, inputs)[node], np.sqrt(squares), rtol=1e-5)


def test_activation_importance_is_weight_times_norm():
    model = zoo.mlp()
    ir = lift(model)
    inputs = zoo.random_inputs(model, batch=8)
    scored = importance.activation(ir, inputs)
    norms = importance.input_column_norms(ir, inputs)
    for node in ir.prunable_nodes():
        want = np.abs(ir.canonical_weight(node)) * norms[node][None, :]
        np.testing.assert_allclose(scored.graph.nodes[node]["importance"], want, rtol=1e-6)


def test_magnitude_and_zeros():
    ir = lift(zoo.mlp())
    node = ir.prunable_nodes()[0]
    assert np.array_equal(importance.magnitude(ir).graph.nodes[node]["importance"], np.abs(ir.canonical_weight(node)))
    weight = ir.canonical_weight(node).copy()
    weight[:, :3] = 0
    ir.set_canonical_weight(node, weight)
    zeros = importance.from_zeros(ir).graph.nodes[node]["importance"]
    assert np.array_equal(zeros == 0, weight == 0)


def test_importance_is_stored_row_major_even_for_a_transposed_canonical_view():
    ir = importance.magnitude(lift(zoo.mlp()))  # fc1 is MatMul: its canonical W[out, in] is the stored B[in, out].T
    for node in ir.prunable_nodes():
        assert ir.graph.nodes[node]["importance"].flags.c_contiguous


def test_by_pruner_is_the_named_importance():
    model = zoo.mlp()
    calib = zoo.random_inputs(model, batch=8)
    ir = lift(model)
    for name, expected in (("magnitude", importance.magnitude(ir)), ("activation", importance.activation(ir, calib))):
        scored = importance.by_pruner(ir, name, calib)
        for node in ir.prunable_nodes():
            np.testing.assert_array_equal(scored.graph.nodes[node]["importance"], expected.graph.nodes[node]["importance"])
