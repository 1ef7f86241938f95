"""Shape computations folded to constants before TVM's import (`pruneaug.codegen.shape_folding`): torch's
chunk as ShuffleNetV2 exports it, whose halves TVM's frontend left symbolic and then failed to compile,
compiled and checked against onnxruntime; what is not folded, and a folded value an If's branch reads."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pruneaug.codegen import relax_build
from pruneaug.codegen.relax_build import _run_compiled, build_model
from pruneaug.codegen.shape_folding import MAX_FOLDED_ELEMENTS, folded
from test_relax_build import ort_outputs, x86  # noqa: F401 (the fixture)

SHAPE = [1, 8, 6, 6]


def _int64(name: str, *values: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def chunk_model(opset: int = 17) -> onnx.ModelProto:
    """Conv, then torch's export of `x.chunk(2, dim=1)` as ShuffleNetV2 writes it (the bounds of the two Slices
    computed from x.size(1): Shape, Gather, Add, Div, Mul), a Conv on the second half, the halves concatenated."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("a", (8, 8, 1, 1)), ("b", (4, 4, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "a"], ["c1"], name="conv1"),
             helper.make_node("Shape", ["c1"], ["shape"]), helper.make_node("Gather", ["shape", "axis"], ["channels"]),
             helper.make_node("Add", ["channels", "one"], ["rounded"]),
             helper.make_node("Div", ["rounded", "two"], ["half"]),
             helper.make_node("Mul", ["half", "one"], ["end_1"]), helper.make_node("Mul", ["half", "two"], ["end_2"]),
             helper.make_node("Slice", ["c1", "zero", "end_1", "axis"], ["first"]),
             helper.make_node("Slice", ["c1", "end_1", "end_2", "axis"], ["second"]),
             helper.make_node("Conv", ["second", "b"], ["c2"], name="conv2"),
             helper.make_node("Concat", ["first", "c2"], ["y"], axis=1)]
    constants = [_int64(name, value) for name, value in (("axis", 1), ("zero", 0), ("one", 1), ("two", 2))]
    graph = helper.make_graph(nodes, "chunk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)], weights + constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("opset", [11, 17])
def test_a_chunk_compiles_and_matches_onnxruntime(x86, opset):
    model = chunk_model(opset)
    flat = folded(model, {"x": SHAPE})
    assert [node.op_type for node in flat.graph.node] == ["Conv", "Slice", "Slice", "Conv", "Concat"]
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    [got] = _run_compiled(build_model(model, {"b": (4, 1)}, x86, {"x": SHAPE}), model, {"x": x}, x86)
    np.testing.assert_allclose(got, ort_outputs(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_the_frontend_fails_on_the_unfolded_chunk(x86, monkeypatch):
    """Why the folding is there: TVM's frontend leaves the halves' shapes symbolic and the next conv fails."""
    monkeypatch.setattr(relax_build.shape_folding, "folded", lambda model, shapes: model)
    with pytest.raises(Exception, match="ShapeExpr"):
        build_model(chunk_model(), {}, x86, {"x": SHAPE})


def test_large_values_are_left_to_the_model():
    """A Range longer than MAX_FOLDED_ELEMENTS stays a node; the Shape feeding it is folded."""
    size = MAX_FOLDED_ELEMENTS + 1
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("ReduceProd", ["s"], ["count"], keepdims=0),
             helper.make_node("Range", ["zero", "count", "one"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["xf", "rf"], ["y"]), helper.make_node("Reshape", ["x", "minus_one"], ["xf"])]
    nodes = [nodes[0], nodes[1], nodes[2], nodes[3], nodes[5], nodes[4]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                               (("zero", 0), ("one", 1))] + [_int64("minus_one", -1)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    flat = folded(model, {"x": [size]})
    assert [node.op_type for node in flat.graph.node] == ["Range", "Cast", "Reshape", "Add"]
    x = np.arange(size, dtype=np.float32)
    np.testing.assert_array_equal(ort_outputs(flat, {"x": x})[0], ort_outputs(model, {"x": x})[0])


def test_a_value_an_if_branch_reads_stays_an_initializer():
    shape_then = helper.make_graph([helper.make_node("Identity", ["s"], ["out"])], "then", [],
                                   [helper.make_tensor_value_info("out", TensorProto.INT64, None)])
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("If", ["flag"], ["y"], then_branch=shape_then,
                                                                       else_branch=shape_then)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    flat = folded(model, {"x": [3, 5], "flag": []})
    assert [node.op_type for node in flat.graph.node] == ["If"]
    [value] = [numpy_helper.to_array(init) for init in flat.graph.initializer if init.name == "s"]
    np.testing.assert_array_equal(value, [3, 5])


def test_a_model_without_shape_ops_is_returned_as_it_is():
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    assert folded(model, {"x": [2]}) is model
