"""The ONNX graph of a post-norm BERT-style encoder, as exporters emit it, from any source of weights.

One builder serves the random-weight encoders the benchmarks time (tools/bench_model.py,
tools/bench_compile_time.py) and the trained encoder example (tools/make_examples.py), so the graph
the benchmarks measure is the graph a trained model has.

Ops: MatMul+Add linears (weights [in, out] initializers), Reshape/Transpose into heads, Softmax
attention, Erf GELU, LayerNormalization (opset 17). Optional: an input projection from
`in_features` with a learned position table, and a mean pool over the sequence followed by a Gemm
classifier into `classes` logits. Weights come from `weights(name, shape) -> float32 array`, names
like `layer0.q.weight` ([in, out]), `layer0.q.bias`, `layer0.ln1.gamma`, `embed.weight`, `position`,
`classifier.weight` ([classes, hidden], Gemm transB=1).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WeightSource = Callable[[str, tuple[int, ...]], np.ndarray]
OPSET = 17


def random_weights(seed: int = 0) -> WeightSource:
    """Weights of a freshly initialised encoder (timing only: latency does not depend on their values)."""
    rng = np.random.default_rng(seed)

    def draw(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name.endswith(".gamma"):
            return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if name.endswith((".bias", ".beta", "position")):
            return (0.02 * rng.standard_normal(shape)).astype(np.float32)
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    return draw


def encoder(hidden: int, ffn: int, layers: int, seq: int, heads: int, weights: WeightSource,
            batch: int | str = 1, in_features: int | None = None, classes: int | None = None,
            input_name: str = "input", output_name: str | None = None) -> onnx.ModelProto:
    """The encoder graph; `batch` is a size or the name of a dynamic dimension."""
    initializers, nodes = [], []

    def const(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def param(name: str, shape: tuple[int, ...]) -> str:
        array = np.asarray(weights(name, shape), np.float32)
        assert array.shape == shape, (name, array.shape, shape)
        return const(name, array)

    def op(op_type: str, inputs: list[str], **attrs) -> str:
        name = f"{op_type}_{len(nodes)}"
        nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def linear(x: str, n_in: int, n_out: int, name: str) -> str:
        product = op("MatMul", [x, param(f"{name}.weight", (n_in, n_out))])
        return op("Add", [product, param(f"{name}.bias", (n_out,))])

    def layer_norm(x: str, name: str) -> str:
        return op("LayerNormalization", [x, param(f"{name}.gamma", (hidden,)), param(f"{name}.beta", (hidden,))],
                  axis=-1, epsilon=1e-5)

    head_dim = hidden // heads
    split = const("split_heads", np.array([0, 0, heads, head_dim], np.int64))  # 0: keep batch and sequence
    merge = const("merge_heads", np.array([0, 0, hidden], np.int64))
    scalar_values = {"scale": 1 / np.sqrt(head_dim), "half": 0.5, "one": 1.0, "rsqrt2": 2**-0.5}
    scalars = {name: const(name, np.array(value, np.float32)) for name, value in scalar_values.items()}
    x = input_name
    if in_features is not None:
        x = op("Add", [linear(x, in_features, hidden, "embed"), param("position", (seq, hidden))])
    for i in range(layers):
        q, k, v = (op("Transpose", [op("Reshape", [linear(x, hidden, hidden, f"layer{i}.{n}"), split])], perm=perm)
                   for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])))
        probs = op("Softmax", [op("Mul", [op("MatMul", [q, k]), scalars["scale"]])], axis=-1)
        context = op("Reshape", [op("Transpose", [op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge])
        x = layer_norm(op("Add", [x, linear(context, hidden, hidden, f"layer{i}.o")]), f"layer{i}.ln1")
        h = linear(x, hidden, ffn, f"layer{i}.ffn1")
        erf = op("Erf", [op("Mul", [h, scalars["rsqrt2"]])])
        gelu = op("Mul", [op("Mul", [h, scalars["half"]]), op("Add", [scalars["one"], erf])])
        x = layer_norm(op("Add", [x, linear(gelu, ffn, hidden, f"layer{i}.ffn2")]), f"layer{i}.ln2")
    out_shape: list = [batch, seq, hidden]
    if classes is not None:
        pooled = op("ReduceMean", [x], axes=[1], keepdims=0)
        x = op("Gemm", [pooled, param("classifier.weight", (classes, hidden)), param("classifier.bias", (classes,))],
               transB=1)
        out_shape = [batch, classes]
    if output_name is not None:
        nodes[-1].output[0] = x = output_name
    in_shape = [batch, seq, in_features if in_features is not None else hidden]
    graph = helper.make_graph(nodes, "encoder", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, out_shape)], initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(model)
    return model
