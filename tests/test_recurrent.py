"""LSTM, GRU and RNN nodes unrolled into plain ONNX ops (`pruneaug.codegen.recurrent`): the unrolled model
against onnxruntime running the original node (layout 1, which onnxruntime refuses, against ONNX's reference
evaluator), whole models compiled by TVM, and the nodes that cannot be unrolled named."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import pruneaug
from pruneaug.codegen.recurrent import RECURRENT_OPS, unrolled
from pruneaug.codegen.relax_build import _run_compiled, build_model
from pruneaug.errors import CodegenError
from test_relax_build import x86  # noqa: F401 (the fixture)

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_model(op: str, steps: int = 5, batch: int = 2, features: int = 3, hidden: int = 4,
                    direction: str = "forward", bias: bool = True, initial: bool = False, peepholes: bool = False,
                    layout: int = 0, outputs: tuple[str, ...] = ("y", "y_h", "y_c"), opset: int = 17, seed: int = 0,
                    **attrs) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One recurrent node over a graph input x (and initial states h0, c0 as graph inputs), its feeds."""
    rng = np.random.default_rng(seed)
    gates, directions = GATES[op], 2 if direction == "bidirectional" else 1

    def weight(name, *shape, scale=1.0):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    initializers = [weight("W", directions, gates * hidden, features), weight("R", directions, gates * hidden, hidden,
                                                                           scale=0.5)]
    inputs = ["x", "W", "R", "", "", "", "", ""]
    if bias:
        initializers.append(weight("B", directions, 2 * gates * hidden))
        inputs[3] = "B"
    if peepholes:
        initializers.append(weight("P", directions, 3 * hidden))
        inputs[7] = "P"
    x_shape = [batch, steps, features] if layout else [steps, batch, features]
    state_shape = [batch, directions, hidden] if layout else [directions, batch, hidden]
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    for index, name in ((5, "h0"), (6, "c0")):
        if initial and (name == "h0" or op == "LSTM"):
            inputs[index] = name
            feeds[name] = rng.standard_normal(state_shape).astype(np.float32)
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, state_shape))
    inputs = inputs[: 8 if op == "LSTM" else 6]
    while not inputs[-1]:
        inputs.pop()
    names = [name if name in outputs and (name != "y_c" or op == "LSTM") else "" for name in ("y", "y_h", "y_c")]
    while not names[-1]:
        names.pop()
    if layout:
        attrs["layout"] = 1
    node = helper.make_node(op, inputs, names, name="recurrent", hidden_size=hidden, direction=direction, **attrs)
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names if name],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def shapes_of(feeds: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {name: list(value.shape) for name, value in feeds.items()}


def assert_unrolled_matches(model, feeds, reference=run_ort):
    flat = unrolled(model, shapes_of(feeds))
    assert not any(node.op_type in RECURRENT_OPS for node in flat.graph.node)
    for got, want in zip(run_ort(flat, feeds), reference(model, feeds), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", RECURRENT_OPS)
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("initial", [False, True])
def test_unrolled_matches_onnxruntime(op, direction, initial):
    assert_unrolled_matches(*recurrent_model(op, direction=direction, initial=initial))


@pytest.mark.parametrize("op, attrs", [
    ("LSTM", dict(peepholes=True)),
    ("LSTM", dict(peepholes=True, initial=True, direction="bidirectional")),
    ("LSTM", dict(clip=0.5)),  # the gates' inputs clipped, not the cell state's (as onnxruntime does)
    ("LSTM", dict(input_forget=1)),
    ("LSTM", dict(bias=False)),
    ("LSTM", dict(outputs=("y_h",))),
    ("LSTM", dict(outputs=("y_c",))),
    ("LSTM", dict(opset=7, initial=True)),
    ("GRU", dict(linear_before_reset=1)),
    ("GRU", dict(linear_before_reset=1, initial=True, direction="bidirectional")),
    ("GRU", dict(clip=0.3)),
    ("RNN", dict(activations=["Relu"], opset=9)),
    # parameters consumed in activation order
    ("LSTM", dict(activations=["HardSigmoid", "LeakyRelu", "Tanh"], activation_alpha=[0.3, 0.2],
                  activation_beta=[0.6])),
    ("GRU", dict(activations=["Affine", "ScaledTanh"], activation_alpha=[0.5, 1.5], activation_beta=[0.1, 0.7])),
    ("GRU", dict(activations=["Affine", "Tanh"], activation_alpha=[0.5], activation_beta=[0.1])),
    ("LSTM", dict(activations=["HardSigmoid", "Elu", "Softsign"])),  # ONNX's default alphas and betas
])
def test_unrolled_options_match_onnxruntime(op, attrs):
    assert_unrolled_matches(*recurrent_model(op, **attrs))


@pytest.mark.parametrize("op", RECURRENT_OPS)
def test_batch_first_layout_matches_the_reference_evaluator(op):
    """onnxruntime refuses layout 1; ONNX's reference evaluator runs it."""
    from onnx.reference import ReferenceEvaluator

    model, feeds = recurrent_model(op, layout=1, initial=True, direction="bidirectional")
    assert_unrolled_matches(model, feeds, lambda m, f: ReferenceEvaluator(m).run(None, f))


def test_a_model_without_recurrent_nodes_is_returned_as_it_is():
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    assert unrolled(model, {"x": [2]}) is model


def _with_input(model: onnx.ModelProto, index: int, name: str, initializer: onnx.TensorProto | None):
    node = model.graph.node[0]
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name
    if initializer is not None:
        model.graph.initializer.append(initializer)
    else:
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 16, 3]))
    return model


@pytest.mark.parametrize("change, message", [
    (lambda m: _with_input(m, 4, "lengths", numpy_helper.from_array(np.array([6, 3], np.int32), "lengths")),
     r"node 'recurrent': LSTM sequence_lens \('lengths'\) \[6, 3\] is not one length from 0 to 5 per sequence of "
     r"the batch of 2"),
    (lambda m: _with_input(m, 1, "W_in", None), r"node 'recurrent': LSTM input W \('W_in'\) must be an initializer"),
    (lambda m: m.graph.node[0].attribute.append(helper.make_attribute("activations", ["Sigmoid", "Swish", "Tanh"])),
     r"node 'recurrent': LSTM activation 'Swish' is not one of Sigmoid, Tanh"),
    (lambda m: m.graph.node[0].attribute.append(helper.make_attribute("activations", ["Sigmoid", "Tanh"])),
     r"node 'recurrent': LSTM has 2 activations; expected 3"),
    # onnxruntime's LSTM reads the lists one way here and its GRU the other way for a like mix
    (lambda m: m.graph.node[0].attribute.extend([
        helper.make_attribute("activations", ["Sigmoid", "LeakyRelu", "ScaledTanh"]),
        helper.make_attribute("activation_alpha", [0.2, 1.5]), helper.make_attribute("activation_beta", [0.0, 0.7])]),
     r"runtimes read these lists differently"),
    (lambda m: m.graph.node[0].attribute.extend([
        helper.make_attribute("activations", ["Sigmoid", "Affine", "Tanh"]),
        helper.make_attribute("activation_alpha", [0.2])]),
     r"activation Affine needs activation_beta"),
])
def test_what_cannot_be_unrolled_is_named(change, message):
    model, feeds = recurrent_model("LSTM")
    change(model)
    with pytest.raises(CodegenError, match=message):
        unrolled(model, shapes_of(feeds))


def test_full_length_sequence_lens_is_no_obstacle():
    model, feeds = recurrent_model("GRU")
    _with_input(model, 4, "lengths", numpy_helper.from_array(np.array([5, 5], np.int32), "lengths"))
    assert_unrolled_matches(model, feeds)
    assert not any(node.op_type == "Less" for node in unrolled(model, shapes_of(feeds)).graph.node)  # nothing masked


def _with_lengths(model: onnx.ModelProto, feeds: dict[str, np.ndarray], lengths: list[int], constant: bool):
    """`model`'s node given sequence_lens `lengths`, as a graph input fed them or as an initializer."""
    array = np.array(lengths, np.int32)
    if constant:
        return _with_input(model, 4, "lengths", numpy_helper.from_array(array, "lengths")), feeds
    model.graph.node[0].input.extend([""] * (5 - len(model.graph.node[0].input)))
    model.graph.node[0].input[4] = "lengths"
    model.graph.input.append(helper.make_tensor_value_info("lengths", TensorProto.INT32, [len(lengths)]))
    return model, {**feeds, "lengths": array}


@pytest.mark.parametrize("op", RECURRENT_OPS)
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("initial, constant", [(True, False), (False, True)])
def test_sequence_lens_ends_each_sequence_as_onnxruntime_does(op, direction, initial, constant):
    """Sequences of 5, 3, 1 and 0 steps in one batch: past its end a sequence's Y is 0 and its last states are
    those of its own last step (a reverse direction starts at that step); fed at run time or constant."""
    model, feeds = recurrent_model(op, batch=4, direction=direction, initial=initial)
    assert_unrolled_matches(*_with_lengths(model, feeds, [5, 3, 1, 0], constant))


def keyword_spotter(op: str, direction: str, frames: int = 6, features: int = 10, hidden: int = 16) -> onnx.ModelProto:
    """x[batch, frames, features] -> Transpose -> recurrent node -> its last hidden state -> Gemm, as torch
    exports a batch-first recurrent classifier."""
    model, _ = recurrent_model(op, steps=frames, batch=1, features=features, hidden=hidden, direction=direction,
                               outputs=("y_h",))
    graph = model.graph
    directions = 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(1)
    graph.node[0].input[0] = "x_time_major"
    graph.node.insert(0, helper.make_node("Transpose", ["x"], ["x_time_major"], perm=[1, 0, 2]))
    graph.node.extend([helper.make_node("Transpose", ["y_h"], ["h_batch"], perm=[1, 0, 2]),
                       helper.make_node("Flatten", ["h_batch"], ["flat"], axis=1),
                       helper.make_node("Gemm", ["flat", "fc.weight"], ["logits"], transB=1, name="fc")])
    graph.initializer.append(numpy_helper.from_array(
        rng.standard_normal((8, directions * hidden)).astype(np.float32), "fc.weight"))
    del graph.input[:], graph.output[:]
    graph.input.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", frames, features]))
    graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 8]))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("op, direction", [("LSTM", "forward"), ("GRU", "bidirectional"), ("RNN", "reverse")])
def test_a_recurrent_classifier_compiles_and_matches_onnxruntime(x86, op, direction):
    model = keyword_spotter(op, direction)
    x = np.random.default_rng(2).standard_normal((3, 6, 10)).astype(np.float32)
    [got] = _run_compiled(build_model(model, {"fc.weight": (4, 1)}, x86, {"x": [3, 6, 10]}), model, {"x": x}, x86)
    np.testing.assert_allclose(got, run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_a_classifier_over_sequences_of_several_lengths_compiles_and_matches_onnxruntime(x86):
    """sequence_lens as a graph input of the compiled model: TVM runs the masked steps."""
    model = keyword_spotter("LSTM", "bidirectional")
    model.graph.node[1].input.append("lengths")  # after x, W, R, B: sequence_lens
    model.graph.input.append(helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]))
    feeds = {"x": np.random.default_rng(3).standard_normal((3, 6, 10)).astype(np.float32),
             "lengths": np.array([6, 2, 4], np.int32)}
    compiled = build_model(model, {"fc.weight": (4, 1)}, x86, shapes_of(feeds))
    [got] = _run_compiled(compiled, model, feeds, x86)
    np.testing.assert_allclose(got, run_ort(model, feeds)[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, run_ort(model, {**feeds, "lengths": np.array([6, 6, 6], np.int32)})[0], atol=1e-3)


def test_compile_writes_an_artifact_for_an_lstm_model(tmp_path):
    path = tmp_path / "kws.onnx"
    onnx.save(keyword_spotter("LSTM", "forward"), path)
    result = pruneaug.compile(path, target="x86", block="4x1", sparsity=0.5, measure="none", out=tmp_path / "out")
    assert result.artifact is not None and result.artifact.exists(), result.warnings  # built, and gated against ort
    assert not any("no compiled artifact" in warning for warning in result.warnings), result.warnings
