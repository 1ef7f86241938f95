"""ONNX <-> IR: round trips, prunable-node matching, canonical views and rows per inference."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import zoo
from reference import layer_output_from_canonical, node_tensors, rows_of_output
from pruneaug.ir.graph import lift, lower
from pruneaug.ir import onnx_io
from pruneaug.ir.onnx_io import load_model
from pruneaug.ir.weights import WeightLayout
from pruneaug.passes import ort_run


def outputs_of(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort_run.make_session(model).run(None, inputs)


@pytest.mark.parametrize("name", sorted(zoo.ALL))
def test_lift_then_lower_keeps_outputs(name):
    model = zoo.ALL[name]()
    inputs = zoo.random_inputs(model, batch=3)
    lowered = lower(lift(model))
    onnx.checker.check_model(lowered, full_check=True)
    onnx.shape_inference.infer_shapes(lowered, strict_mode=True)
    for got, want in zip(outputs_of(lowered, inputs), outputs_of(model, inputs), strict=True):
        assert got.shape == want.shape
        assert np.max(np.abs(got - want), initial=0.0) <= 1e-5


@pytest.mark.parametrize("name", sorted(set(zoo.ALL) - {"no_prunable"}))
def test_canonical_view_computes_the_layer(name):
    """Y = X @ W.T with the canonical W reproduces every prunable node's output in onnxruntime."""
    model = zoo.ALL[name]()
    inputs = zoo.random_inputs(model, batch=2)
    ir = lift(model)
    assert ir.prunable_nodes()
    tensors = {}
    for node in ir.prunable_nodes():
        proto = ir.graph.nodes[node]["proto"]
        tensors[node] = (proto.input[0], proto.output[0])
    values = node_tensors(ir, inputs, sorted({t for pair in tensors.values() for t in pair}))
    for node, (x_name, y_name) in tensors.items():
        want = rows_of_output(values[y_name], ir.layer(node).op_type)
        got = layer_output_from_canonical(ir, node, values[x_name])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=node)


def prunable_summary(model):
    ir = lift(model)
    return {n: (ir.layer(n).op_type, ir.layer(n).weight, ir.layer(n).layout.kind) for n in ir.prunable_nodes()}


def test_cnn_prunes_group_one_convs_only():
    model = zoo.cnn()
    summary = prunable_summary(model)
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in model.graph.node if n.op_type == "Conv"}
    convs = {n for n, (op, _, _) in summary.items() if op == "Conv"}
    assert convs == {name for name, group in groups.items() if group == 1}
    assert any(group > 1 for group in groups.values()), "the zoo CNN should hold a depthwise/grouped conv"
    assert any(op == "Gemm" for op, _, _ in summary.values())


def _one_op(op: str, x_shape: list[int], weight: np.ndarray, **attrs) -> onnx.ModelProto:
    w = onnx.numpy_helper.from_array(weight, "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(op, ["x", "w"], ["y"], name="op", **attrs)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.helper.np_dtype_to_tensor_dtype(weight.dtype), x_shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.helper.np_dtype_to_tensor_dtype(weight.dtype), None)], [w])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_a_conv1d_is_prunable_and_costed_as_the_2d_conv_of_one_row_images():
    from pruneaug.passes.latency import conv_shape

    model = _one_op("Conv", [2, 6, 37], np.ones((12, 6, 5), np.float32), strides=[2], pads=[1, 0], dilations=[2])
    ir = lift(model, {"x": [2, 6, 37]})
    [node] = ir.prunable_nodes()
    layer = ir.layer(node)
    assert layer.shape == (12, 30) and layer.m == 2 * 15  # (37 + 1 - 2 * 4 - 1) // 2 + 1 outputs
    shape = conv_shape(layer)  # what codegen.relax_build runs: X [2, 6, 1, 37], kernel 1 x 5
    assert (shape.x_shape, shape.kernel, shape.strides, shape.pads, shape.dilations) == (
        (2, 6, 1, 37), (1, 5), (1, 2), (0, 1, 0, 0), (1, 2))
    assert shape.matmul == (12, 30, layer.m)


@pytest.mark.parametrize("op, x_shape, weight, attrs, why", [
    ("Conv", [1, 2, 4, 5, 6], np.ones((4, 2, 3, 3, 3), np.float32), {}, "its weight has rank 5 (a 3-D conv"),
    ("MatMul", [3, 8], np.ones((8, 4), np.float16), {}, "its weight is float16; the block-sparse kernels are float32"),
    ("MatMul", [3, 8], np.ones((8, 4), np.float64), {}, "its weight is double"),
    ("MatMul", [2, 3, 8], np.ones((2, 8, 4), np.float32), {}, "its weight has rank 3 (the kernels take 2)"),
    ("Conv", [1, 2, 5, 5], np.ones((4, 2, 3, 3), np.float16), {}, "its weight is float16"),
    ("Conv", [1, 4, 5, 5], np.ones((4, 1, 3, 3), np.float32), {"group": 4}, "group 4 (a depthwise or grouped conv)"),
    ("ConvTranspose", [1, 2, 5, 5], np.ones((2, 4, 3, 3), np.float32), {}, "no block-sparse kernel for ConvTranspose"),
    ("GRU", [5, 1, 8], np.ones((1, 12, 8), np.float32), {"hidden_size": 4}, "no block-sparse kernel for GRU"),
], ids=["conv3d", "matmul fp16", "matmul fp64", "batched matmul", "conv fp16", "depthwise", "conv transpose", "gru"])
def test_layers_our_kernels_cannot_run_stay_dense_and_say_why(op, x_shape, weight, attrs, why):
    ir = lift(_one_op(op, x_shape, weight, **attrs))
    assert ir.prunable_nodes() == [] and list(ir.kept_dense) == ["op"]
    assert ir.kept_dense["op"].startswith(why)


def test_transformer_attention_matmuls_are_not_prunable():
    model = zoo.transformer_block()
    ir = lift(model)
    initializers = {t.name for t in model.graph.initializer}
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose"}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        operand = node.input[1]
        weight_like = operand in initializers or transposed.get(operand) in initializers
        assert (node.name in ir.prunable_nodes()) == weight_like, node.name
    kinds = {ir.layer(n).layout.kind for n in ir.prunable_nodes()}
    assert kinds == {"transpose", "identity"}  # the weight reached through Transpose(W) keeps W as the view
    assert set(ir.kept_dense.values()) == {"its operands are computed tensors (no constant weight)"}
    assert len(ir.kept_dense) == sum(n.op_type == "MatMul" for n in model.graph.node) - len(ir.prunable_nodes())


def test_shared_weight_is_one_layer_read_by_two_nodes():
    ir = lift(zoo.shared_weight())
    shared = [ir.layer(n) for n in ir.prunable_nodes() if len(ir.layer(n).nodes) == 2]
    assert len(shared) == 1
    weights = [ir.layer(n).weight for n in ir.prunable_nodes()]
    assert len(weights) == len(set(weights))


def test_subgraph_nodes_are_untouched_and_not_prunable():
    model = zoo.with_subgraph()
    ir = lift(model)
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    assert if_node.name not in ir.prunable_nodes()
    lowered = lower(ir)
    assert next(n for n in lowered.graph.node if n.op_type == "If") == if_node
    assert ir.prunable_nodes()


def test_rows_per_inference():
    mlp = lift(zoo.mlp(), {"x": [5, 64]})
    assert {mlp.layer(n).m for n in mlp.prunable_nodes()} == {5}
    block = zoo.transformer_block()
    x = block.graph.input[0]
    tokens = x.type.tensor_type.shape.dim[1].dim_value
    ir = lift(block, {x.name: [3, tokens, x.type.tensor_type.shape.dim[2].dim_value]})
    assert {ir.layer(n).m for n in ir.prunable_nodes()} == {3 * tokens}
    cnn = lift(zoo.cnn(), {"x": [2, *[d.dim_value for d in zoo.cnn().graph.input[0].type.tensor_type.shape.dim[1:]]]})
    inputs = zoo.random_inputs(zoo.cnn(), batch=2)
    outputs = {n: cnn.graph.nodes[n]["proto"].output[0] for n in cnn.prunable_nodes()}
    values = node_tensors(cnn, inputs, sorted(outputs.values()))
    for node, tensor in outputs.items():
        assert cnn.layer(node).m == rows_of_output(values[tensor], cnn.layer(node).op_type).shape[0]


@pytest.mark.parametrize("kind,shape", [("transpose", (6, 4)), ("identity", (4, 6)), ("conv", (4, 3, 2, 1)), ("conv", (4, 2, 3))])
def test_canonical_view_inverse_is_exact(kind, shape):
    layout = WeightLayout(kind, shape)
    stored = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    canonical = layout.to_canonical(stored)
    assert canonical.shape == layout.canonical_shape
    assert np.array_equal(layout.from_canonical(canonical), stored)
    assert layout.from_canonical(canonical).flags.c_contiguous


def test_external_data_model_loads_and_lowers(tmp_path):
    model = zoo.mlp()
    path = tmp_path / "model.onnx"
    zoo.save_with_external_data(model, path)
    loaded = load_model(path)
    inputs = zoo.random_inputs(model)
    for got, want in zip(outputs_of(lower(lift(loaded)), inputs), outputs_of(model, inputs)):
        assert np.max(np.abs(got - want)) <= 1e-5


def test_save_model_moves_weights_out_past_the_protobuf_limit_and_leaves_the_model_whole(tmp_path, monkeypatch):
    model = zoo.mlp()
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert onnx_io.tensor_bytes(model) == sum(w.nbytes for w in weights.values())
    onnx_io.save_model(model, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT_BYTES", onnx_io.tensor_bytes(model) - 1)
    onnx_io.save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    for path in (tmp_path / "small.onnx", tmp_path / "big.onnx"):
        saved = {t.name: onnx.numpy_helper.to_array(t) for t in load_model(path).graph.initializer}
        assert saved.keys() == weights.keys() and all(np.array_equal(saved[n], weights[n]) for n in weights)
    # onnx's external-data writer empties the tensors of the proto it is given: ours gets a copy
    kept = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert all(np.array_equal(kept[n], weights[n]) for n in weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "small.onnx"]


def test_a_tensor_of_an_unknown_type_is_the_checkers_to_name():
    from pruneaug.errors import ModelError

    model = zoo.mlp()
    model.graph.initializer[0].data_type = 0  # UNDEFINED
    before = onnx_io.tensor_bytes(zoo.mlp())
    assert onnx_io.tensor_bytes(model) == before - onnx.numpy_helper.to_array(zoo.mlp().graph.initializer[0]).nbytes
    with pytest.raises(ModelError, match="the model given: fails onnx.checker"):
        onnx_io.check_model(model, "the model given")


def test_an_old_ir_model_lists_its_initializers_as_inputs_and_they_are_still_weights():
    """Before IR version 4 every initializer had to be a graph input as well: that is no run-time override."""
    model = _one_op("MatMul", [3, 8], np.ones((8, 4), np.float32))
    model.graph.input.append(onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [8, 4]))
    model.ir_version = 3
    assert lift(model).prunable_nodes() == ["op"]
    model.ir_version = 7  # listed as an input in a newer model: the caller may feed another weight
    ir = lift(model)
    assert ir.prunable_nodes() == [] and ir.kept_dense == {"op": "its weight is also a graph input (overridable at run time)"}
