"""Shape computations folded to constants before TVM's import (`pruneaug.ir.shape_folding`): torch's
chunk as ShuffleNetV2 exports it, whose halves TVM's frontend left symbolic and then failed to compile,
compiled and checked against onnxruntime; what is not folded, and a folded value an If's branch reads."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pruneaug.codegen import relax_build
from pruneaug.codegen.relax_build import _run_compiled, build_model
from pruneaug.ir.graph import lift
from pruneaug.ir.shape_folding import MAX_FOLDED_ELEMENTS, folded
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


def window_model() -> onnx.ModelProto:
    """Swin's window partition as torch exports it: x padded up to whole 4x4 windows by pads computed from its
    Shape (Gather, Mod, Sub), the padded tensor's Shape (known only once those pads are folded) cut into
    windows by a Reshape, and a MatMul by W (then a Relu) whose size the last Reshape takes from Shape(W)."""
    win = 4
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((win * win, win * win)).astype(np.float32), "w")
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "hw_axes"], ["hw"]),
             helper.make_node("Mod", ["hw", "win"], ["over"]), helper.make_node("Sub", ["win", "over"], ["short"]),
             helper.make_node("Mod", ["short", "win"], ["after"]),
             helper.make_node("Concat", ["zeros6", "after"], ["pads"], axis=0),
             helper.make_node("Pad", ["x", "pads"], ["p"]),
             helper.make_node("Shape", ["p"], ["ps"]), helper.make_node("Gather", ["ps", "hw_axes"], ["phw"]),
             helper.make_node("Div", ["phw", "win"], ["n"]),
             helper.make_node("Gather", ["n", "zero"], ["nh"]), helper.make_node("Gather", ["n", "one"], ["nw"]),
             helper.make_node("Concat", ["lead", "nh", "win", "nw", "win"], ["windows"], axis=0),
             helper.make_node("Reshape", ["p", "windows"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 2, 4, 3, 5]),
             helper.make_node("Shape", ["w"], ["ws"]), helper.make_node("Gather", ["ws", "zero"], ["k"]),
             helper.make_node("Concat", ["one_minus_one", "k"], ["rows"], axis=0),
             helper.make_node("Reshape", ["t", "rows"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["mm"], name="proj"), helper.make_node("Relu", ["mm"], ["y"])]
    constants = [_int64("hw_axes", 2, 3), _int64("win", win), _int64("zeros6", 0, 0, 0, 0, 0, 0), _int64("zero", 0),
                 _int64("one", 1), _int64("lead", 1, 2), _int64("one_minus_one", 1, -1)]
    graph = helper.make_graph(nodes, "windows", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])], [w, *constants])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_pads_computed_from_a_shape_are_folded_and_then_the_padded_shape(x86):
    """Two passes: the pads (Mod of the input's size) first, then the Shape of the Pad they make static; and the
    Shape of an initializer. TVM's frontend refused the model unfolded ("Dynamic pads are not supported yet")."""
    model = window_model()
    flat = folded(model, {"x": [1, 2, 5, 7]})
    assert [node.op_type for node in flat.graph.node] == ["Pad", "Reshape", "Transpose", "Reshape", "MatMul", "Relu"]
    ir = lift(model, {"x": [1, 2, 5, 7]})
    [proj] = ir.prunable_nodes()
    assert ir.layer(proj).m == 8  # the IR reads the folded shapes: 2 channels of 8x8 (padded) in rows of 16
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 7)).astype(np.float32)
    [got] = _run_compiled(build_model(model, {"w": (4, 1)}, x86, {"x": [1, 2, 5, 7]}), model, {"x": x}, x86)
    np.testing.assert_allclose(got, ort_outputs(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
