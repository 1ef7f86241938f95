"""A zoo of small ONNX models that exercise every pattern pruneaug must handle.

Built with onnx.helper and numpy only (CI has no torch); weights are random with a fixed seed, so every
call returns the same model. Each builder returns a model that passes
``onnx.checker.check_model(full_check=True)`` and runs in onnxruntime; the graph outputs declare their
full shapes, with the dynamic batch dimension named ``batch``.

    >>> model = mlp()
    >>> {k: v.shape for k, v in random_inputs(model, batch=3).items()}
    {'x': (3, 64)}

``ALL`` maps a name to a builder, for ``pytest.mark.parametrize``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
from onnx import TensorProto, helper, numpy_helper

BATCH = "batch"
DEFAULT_OPSET = 17


class _Builder:
    """Accumulates nodes and initializers of one graph; a node's name is also its (first) output's name."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        """A random float32 initializer scaled by 1/sqrt(fan_in), so activations stay of order one."""
        array = self.rng.standard_normal(shape).astype(np.float32) / np.float32(math.sqrt(fan_in))
        return self.const(name, array)

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def linear(self, x: str, name: str, n_in: int, n_out: int) -> str:
        """``MatMul(x, W[n_in, n_out]) + b``: the layout torch.onnx exports for nn.Linear on N-D inputs."""
        w = self.weight(f"{name}.weight", (n_in, n_out), n_in)
        b = self.weight(f"{name}.bias", (n_out,), n_in)
        return self.op("Add", [self.op("MatMul", [x, w], f"{name}/MatMul"), b], f"{name}/Add")

    def batchnorm(self, x: str, name: str, channels: int) -> str:
        scale = self.const(f"{name}.scale", self.rng.uniform(0.5, 1.5, channels).astype(np.float32))
        bias = self.const(f"{name}.bias", self.rng.normal(0, 0.1, channels).astype(np.float32))
        mean = self.const(f"{name}.mean", self.rng.normal(0, 0.1, channels).astype(np.float32))
        var = self.const(f"{name}.var", self.rng.uniform(0.5, 1.5, channels).astype(np.float32))
        return self.op("BatchNormalization", [x, scale, bias, mean, var], name, epsilon=1e-5)

    def graph(self, name: str, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto]) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)

    def model(self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
        opsets = [helper.make_opsetid("", opset)]
        # The lowest IR version that carries the opset keeps the model loadable by older runtimes.
        return helper.make_model(self.graph(name, inputs, outputs), opset_imports=opsets,
                                 ir_version=helper.find_min_ir_version_for(opsets), producer_name="pruneaug-zoo")


def _value(name: str, shape: list[int | str], elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def mlp() -> onnx.ModelProto:
    """MatMul+Add, Relu, Gemm(transB=1, alpha/beta != 1, bias), Gemm(transB=0): x[batch, 64] -> y[batch, 10]."""
    g = _Builder(seed=1)
    h = g.op("Relu", [g.linear("x", "fc1", 64, 128)], "fc1/Relu")
    w2, b2 = g.weight("fc2.weight", (96, 128), 128), g.weight("fc2.bias", (96,), 128)
    h = g.op("Gemm", [h, w2, b2], "fc2/Gemm", transB=1, alpha=0.5, beta=2.0)
    h = g.op("Relu", [h], "fc2/Relu")
    w3, b3 = g.weight("fc3.weight", (96, 10), 96), g.weight("fc3.bias", (10,), 96)
    g.op("Gemm", [h, w3, b3], "y", transB=0)
    return g.model("mlp", [_value("x", [BATCH, 64])], [_value("y", [BATCH, 10])])


def gemm_variants() -> onnx.ModelProto:
    """Gemm with transA=1 and transB 0/1, alpha/beta, with and without C: a[32, batch] -> y[batch, 16].

    The input is the transposed activation, as some exporters emit it.
    """
    g = _Builder(seed=2)
    b1, c1 = g.weight("g1.B", (32, 48), 32), g.weight("g1.C", (48,), 32)
    g1 = g.op("Gemm", ["a", b1, c1], "g1", transA=1, transB=0, alpha=1.5, beta=0.5)
    g2 = g.op("Gemm", ["a", g.weight("g2.B", (40, 32), 32)], "g2", transA=1, transB=1)
    g1_t = g.op("Transpose", [g1], "g1/Transpose", perm=[1, 0])
    b3, c3 = g.weight("g3.B", (48, 16), 48), g.weight("g3.C", (1, 16), 48)
    g3 = g.op("Gemm", [g1_t, b3, c3], "g3", transA=1, alpha=0.75, beta=1.25)
    b4, c4 = g.weight("g4.B", (16, 40), 40), g.weight("g4.C", (16,), 40)
    g4 = g.op("Gemm", [g2, b4, c4], "g4", transB=1)
    g.op("Add", [g3, g4], "y")
    return g.model("gemm_variants", [_value("a", [32, BATCH])], [_value("y", [BATCH, 16])])


def cnn() -> onnx.ModelProto:
    """Every Conv shape pruneaug meets: x[batch, 3, 16, 16] -> y[batch, 10].

    1x1; 3x3 pad 1; 3x3 stride 2; 3x3 dilation 2; 1x3 and 3x1 with asymmetric pads; depthwise
    (group = C); grouped (group = 2); with and without bias; BatchNormalization and Relu between;
    GlobalAveragePool, Flatten and Gemm at the end.
    """
    g = _Builder(seed=3)

    def conv(x: str, name: str, c_in: int, c_out: int, kernel: tuple[int, int], bias: bool,
             group: int = 1, **attrs: object) -> str:
        fan_in = c_in // group * kernel[0] * kernel[1]
        inputs = [x, g.weight(f"{name}.weight", (c_out, c_in // group, *kernel), fan_in)]
        if bias:
            inputs.append(g.weight(f"{name}.bias", (c_out,), fan_in))
        return g.op("Conv", inputs, name, kernel_shape=list(kernel), group=group, **attrs)

    h = g.op("Relu", [g.batchnorm(conv("x", "pointwise", 3, 16, (1, 1), bias=True), "bn1", 16)], "relu1")
    h = conv(h, "conv3x3", 16, 16, (3, 3), bias=False, pads=[1, 1, 1, 1])
    h = g.op("Relu", [g.batchnorm(h, "bn2", 16)], "relu2")
    h = g.op("Relu", [conv(h, "strided", 16, 32, (3, 3), bias=True, strides=[2, 2], pads=[1, 1, 1, 1])], "relu3")
    h = conv(h, "dilated", 32, 32, (3, 3), bias=False, dilations=[2, 2], pads=[2, 2, 2, 2])
    h = g.op("Relu", [g.batchnorm(h, "bn4", 32)], "relu4")
    # pads are [h_begin, w_begin, h_end, w_end]: both keep the 8x8 map, padding one side only.
    h = conv(h, "row1x3", 32, 32, (1, 3), bias=True, pads=[0, 2, 0, 0])
    h = g.op("Relu", [conv(h, "col3x1", 32, 32, (3, 1), bias=False, pads=[1, 0, 1, 0])], "relu5")
    h = g.op("Relu", [conv(h, "depthwise", 32, 32, (3, 3), bias=True, group=32, pads=[1, 1, 1, 1])], "relu6")
    h = conv(h, "grouped", 32, 48, (3, 3), bias=False, group=2, pads=[1, 1, 1, 1])
    h = g.op("Relu", [g.batchnorm(h, "bn7", 48)], "relu7")
    h = g.op("Flatten", [g.op("GlobalAveragePool", [h], "pool")], "flatten", axis=1)
    g.op("Gemm", [h, g.weight("fc.weight", (10, 48), 48), g.weight("fc.bias", (10,), 48)], "y", transB=1)
    return g.model("cnn", [_value("x", [BATCH, 3, 16, 16])], [_value("y", [BATCH, 10])])


def transformer_block(hidden: int = 64, heads: int = 4, tokens: int = 16) -> onnx.ModelProto:
    """A post-norm encoder block: x[batch, tokens, hidden] -> y[batch, tokens, hidden].

    Q/K/V projections are MatMuls of 2-D initializers on 3-D activations; the output projection
    reaches its weight through ``Transpose(W_init)``; Q@K^T and P@V multiply two activations (not
    prunable). The first norm is a LayerNormalization op, the second its ReduceMean decomposition (as
    exporters emit below opset 17); the FFN's GELU is the Erf decomposition.
    """
    g = _Builder(seed=4)
    head_dim = hidden // heads
    split_shape = g.const("split_heads.shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge_shape = g.const("merge_heads.shape", np.array([0, 0, hidden], dtype=np.int64))

    def heads_of(name: str, perm: list[int]) -> str:
        projected = g.linear("x", name, hidden, hidden)
        return g.op("Transpose", [g.op("Reshape", [projected, split_shape], f"{name}/Reshape")],
                    f"{name}/Transpose", perm=perm)

    q = heads_of("q_proj", [0, 2, 1, 3])  # [batch, heads, tokens, head_dim]
    k_t = heads_of("k_proj", [0, 2, 3, 1])  # [batch, heads, head_dim, tokens]
    v = heads_of("v_proj", [0, 2, 1, 3])
    scale = g.const("attn.scale", np.array(1 / math.sqrt(head_dim), dtype=np.float32))
    scores = g.op("Mul", [g.op("MatMul", [q, k_t], "attn/QK"), scale], "attn/scale")
    context = g.op("MatMul", [g.op("Softmax", [scores], "attn/Softmax", axis=-1), v], "attn/PV")
    context = g.op("Transpose", [context], "attn/merge/Transpose", perm=[0, 2, 1, 3])
    context = g.op("Reshape", [context, merge_shape], "attn/merge/Reshape")
    # Stored [out, in] as nn.Linear keeps it; the graph transposes it back to MatMul's [in, out].
    w_out = g.op("Transpose", [g.weight("out_proj.weight", (hidden, hidden), hidden)], "out_proj/Transpose",
                 perm=[1, 0])
    attn = g.op("Add", [g.op("MatMul", [context, w_out], "out_proj/MatMul"),
                        g.weight("out_proj.bias", (hidden,), hidden)], "out_proj/Add")
    ln1_scale = g.const("ln1.scale", np.ones(hidden, dtype=np.float32))
    ln1_bias = g.const("ln1.bias", np.zeros(hidden, dtype=np.float32))
    h = g.op("LayerNormalization", [g.op("Add", [attn, "x"], "residual1"), ln1_scale, ln1_bias], "ln1",
             axis=-1, epsilon=1e-5)

    up = g.linear(h, "ffn.up", hidden, 2 * hidden)
    erf = g.op("Erf", [g.op("Div", [up, g.const("gelu.sqrt2", np.array(math.sqrt(2), np.float32))], "gelu/Div")],
               "gelu/Erf")
    half = g.const("gelu.half", np.array(0.5, np.float32))
    one = g.const("gelu.one", np.array(1.0, np.float32))
    gelu = g.op("Mul", [g.op("Mul", [up, half], "gelu/Mul_half"), g.op("Add", [erf, one], "gelu/Add_one")],
                "gelu/Mul")
    residual = g.op("Add", [g.linear(gelu, "ffn.down", 2 * hidden, hidden), h], "residual2")

    centred = g.op("Sub", [residual, g.op("ReduceMean", [residual], "ln2/mean", axes=[-1])], "ln2/centred")
    variance = g.op("ReduceMean", [g.op("Mul", [centred, centred], "ln2/square")], "ln2/variance", axes=[-1])
    eps = g.const("ln2.eps", np.array(1e-5, np.float32))
    std = g.op("Sqrt", [g.op("Add", [variance, eps], "ln2/add_eps")], "ln2/std")
    normed = g.op("Div", [centred, std], "ln2/normed")
    scaled = g.op("Mul", [normed, g.const("ln2.scale", np.ones(hidden, np.float32))], "ln2/scale")
    g.op("Add", [scaled, g.const("ln2.bias", np.zeros(hidden, np.float32))], "y")
    shape: list[int | str] = [BATCH, tokens, hidden]
    return g.model("transformer_block", [_value("x", shape)], [_value("y", shape)])


def shared_weight() -> onnx.ModelProto:
    """One initializer ``W[32, 32]`` used by two MatMul nodes: x[batch, 32] -> y[batch, 32]."""
    g = _Builder(seed=5)
    w = g.weight("shared.weight", (32, 32), 32)
    h = g.op("Relu", [g.op("MatMul", ["x", w], "first/MatMul")], "first/Relu")
    g.op("MatMul", [h, w], "y")
    return g.model("shared_weight", [_value("x", [BATCH, 32])], [_value("y", [BATCH, 32])])


def aliased_weight() -> onnx.ModelProto:
    """One initializer ``W[16, 8]`` read by a MatMul of x[batch, 16] and, through an Identity of it (how
    torch's exporter writes two layers whose weights are equal), by a MatMul of z[batch, 3, 16]."""
    g = _Builder(seed=8)
    w = g.weight("tied.weight", (16, 8), 16)
    g.op("MatMul", ["x", w], "a")
    g.op("MatMul", ["z", g.op("Identity", [w], "tied.weight.again")], "b")
    return g.model("aliased_weight", [_value("x", [BATCH, 16]), _value("z", [BATCH, 3, 16])],
                   [_value("a", [BATCH, 8]), _value("b", [BATCH, 3, 8])])


def multi_output() -> onnx.ModelProto:
    """Two outputs from one trunk: x[batch, 32] -> logits[batch, 10], aux[batch, 4]."""
    g = _Builder(seed=6)
    h = g.op("Relu", [g.linear("x", "trunk", 32, 64)], "trunk/Relu")
    g.op("Gemm", [h, g.weight("head.weight", (10, 64), 64), g.weight("head.bias", (10,), 64)], "logits", transB=1)
    g.op("MatMul", [h, g.weight("aux.weight", (64, 4), 64)], "aux")
    return g.model("multi_output", [_value("x", [BATCH, 32])],
                   [_value("logits", [BATCH, 10]), _value("aux", [BATCH, 4])])


def with_subgraph() -> onnx.ModelProto:
    """An If whose branches hold their own MatMul initializers (to be left untouched), between prunable
    MatMuls of the main graph: x[batch, 32] -> y[batch, 8]."""
    branch_out = [_value("branch_out", [BATCH, 16])]
    branches = {}
    for seed, branch in enumerate(("then", "else"), start=70):
        b = _Builder(seed=seed)
        b.op("MatMul", ["h", b.weight(f"{branch}.weight", (32, 16), 32)], "branch_out")
        branches[f"{branch}_branch"] = b.graph(f"{branch}_branch", [], branch_out)

    g = _Builder(seed=7)
    h = g.op("Relu", [g.op("MatMul", ["x", g.weight("pre.weight", (32, 32), 32)], "pre/MatMul")], "h")
    total = g.op("ReduceSum", [h], "h/sum", keepdims=0)
    cond = g.op("Greater", [total, g.const("threshold", np.array(0.0, np.float32))], "cond")
    chosen = g.op("If", [cond], "branch", **branches)
    g.op("MatMul", [chosen, g.weight("post.weight", (16, 8), 16)], "y")
    return g.model("with_subgraph", [_value("x", [BATCH, 32])], [_value("y", [BATCH, 8])])


def batched_matmul() -> onnx.ModelProto:
    """2-D weights on a 3-D and then a 4-D activation: x[batch, 16, 32] -> y[batch, 2, 8, 24]."""
    g = _Builder(seed=8)
    h = g.op("Relu", [g.op("MatMul", ["x", g.weight("w3d", (32, 48), 32)], "matmul3d")], "relu")
    h = g.op("Reshape", [h, g.const("to4d.shape", np.array([0, 2, 8, 48], np.int64))], "to4d")
    g.op("MatMul", [h, g.weight("w4d", (48, 24), 48)], "y")
    return g.model("batched_matmul", [_value("x", [BATCH, 16, 32])], [_value("y", [BATCH, 2, 8, 24])])


def no_prunable() -> onnx.ModelProto:
    """No MatMul/Gemm/Conv at all: x[batch, 16] -> y[batch, 16]."""
    g = _Builder(seed=9)
    g.op("Add", [g.op("Relu", ["x"], "relu"), g.weight("offset", (16,), 1)], "y")
    return g.model("no_prunable", [_value("x", [BATCH, 16])], [_value("y", [BATCH, 16])])


def opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """``model`` at the default-domain opset ``version`` (13..21).

    onnx's version converter does the work where it has adapters (upwards it always does). Downwards it
    lacks adapters for ops whose newer version only added types (Add 14 -> 13, ...); there the model is
    re-stamped and the full checker, which validates every node against the new opset's schemas,
    decides whether that was sound. The IR version becomes the least that carries the opset, as
    exporters for that opset wrote it.
    """
    assert 13 <= version <= 21, version
    try:
        converted = onnx.version_converter.convert_version(model, version)
    except RuntimeError:
        converted = onnx.ModelProto()
        converted.CopyFrom(model)
        del converted.opset_import[:]
        converted.opset_import.append(helper.make_opsetid("", version))
    converted.ir_version = helper.find_min_ir_version_for(list(converted.opset_import))
    onnx.checker.check_model(converted, full_check=True)
    return converted


def save_with_external_data(model: onnx.ModelProto, path: str | Path) -> Path:
    """Saves ``model`` at ``path`` with every initializer in ``<name>.data`` beside it; returns that file."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving with external data rewrites the initializers of the proto it is given
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=0)
    return data


def random_inputs(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays for the model's graph inputs; every dimension without a fixed size gets ``batch``."""
    rng = np.random.default_rng(seed)
    initializers = {init.name for init in model.graph.initializer}
    inputs = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        inputs[value.name] = rng.standard_normal(shape).astype(dtype)
    return inputs


ALL: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp": mlp,
    "mlp_opset13": lambda: opset(mlp(), 13),
    "mlp_opset21": lambda: opset(mlp(), 21),
    "gemm_variants": gemm_variants,
    "cnn": cnn,
    "cnn_opset13": lambda: opset(cnn(), 13),
    "transformer_block": transformer_block,
    "transformer_block_opset21": lambda: opset(transformer_block(), 21),
    "shared_weight": shared_weight,
    "aliased_weight": aliased_weight,
    "multi_output": multi_output,
    "with_subgraph": with_subgraph,
    "batched_matmul": batched_matmul,
    "no_prunable": no_prunable,
}
