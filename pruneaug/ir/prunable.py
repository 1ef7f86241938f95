"""Which ONNX nodes are prunable, and how their weight maps onto the canonical view.

Only matching lives here ("which nodes"); what to do with them is the passes' business.
Prunable: MatMul whose second operand is a 2-D float32 initializer (directly or through a
Transpose of one), Gemm whose B is a 2-D float32 initializer, and a 1-D or 2-D Conv with a float32
initializer weight and group 1 (the kernels are float32, and a Conv1d runs as a 2-D conv of one-row
images). Depthwise and grouped convs, 3-D convs, MatMuls between two activations, weights of other
dtypes and weights that are also graph inputs (overridable at run time) stay dense.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx

from pruneaug.ir.layer import ConvGeometry
from pruneaug.ir.weights import WeightLayout

_KERNEL_TYPE = onnx.TensorProto.FLOAT  # the block-sparse kernels' only dtype
_CONV_WEIGHT_RANKS = (3, 4)  # [Cout, Cin, k] and [Cout, Cin, kh, kw]


@dataclass(frozen=True)
class WeightUse:
    """One node's reading of a prunable weight."""

    node: str
    op_type: str
    weight: str
    layout: WeightLayout
    activation: str  # the tensor whose rows are X in Y = X @ W.T
    output: str
    conv: ConvGeometry | None = None


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


# Before IR version 4 every initializer had to be listed among the graph inputs too: there, being listed
# does not make a weight one the caller may override.
_INITIALIZERS_APART_FROM_INPUTS_IR = 4


def unique_node_names(nodes: Sequence[onnx.NodeProto]) -> list[str]:
    """The nodes' names, with `op_type_index` for unnamed ones and a suffix for repeats (names need not
    be unique in ONNX, and converters often leave them empty)."""
    seen: set[str] = set()
    names = []
    for index, node in enumerate(nodes):
        base = node.name or f"{node.op_type}_{index}"
        name, suffix = base, 1
        while name in seen:
            name, suffix = f"{base}__{suffix}", suffix + 1
        seen.add(name)
        names.append(name)
    return names


def weight_uses(model: onnx.ModelProto) -> list[WeightUse]:
    """Every node's reading of a prunable weight, in graph order."""
    return [use for use in classify(model).values() if isinstance(use, WeightUse)]


def classify(model: onnx.ModelProto) -> dict[str, WeightUse | str]:
    """For each MatMul, Gemm, Conv, ConvTranspose, recurrent and quantized linear node (by its
    `unique_node_names` name, in graph order): the prunable weight it reads, or why it stays dense (the
    report lists those: a user's layer left dense without a word looks like a layer the tool overlooked).

    A weight is reached directly, through a Transpose of it, or through Identity nodes of either: an
    exporter that finds two layers' weights equal (torch's deep-copied encoder layers before training)
    keeps one initializer and feeds the other layer an Identity of it, and that layer reads the same
    weight, pruned with one mask."""
    graph = model.graph
    graph_inputs = {v.name for v in graph.input} if model.ir_version >= _INITIALIZERS_APART_FROM_INPUTS_IR else set()
    constants = {t.name: t for t in graph.initializer if t.name not in graph_inputs}
    overridable = {t.name for t in graph.initializer if t.name in graph_inputs}
    aliases: dict[str, str] = {}  # Identity output -> the initializer it passes on
    transposes: dict[str, tuple[str, list[int] | None]] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or not node.input:
            continue
        source = aliases.get(node.input[0], node.input[0])
        if node.op_type == "Identity" and source in constants:
            aliases[node.output[0]] = source
        elif node.op_type == "Transpose" and source in constants:
            transposes[node.output[0]] = (source, _attr(node, "perm", None))
        elif node.op_type == "Identity" and source in transposes:
            transposes[node.output[0]] = transposes[source]
    operands = _Operands(constants, transposes, overridable)
    found: dict[str, WeightUse | str] = {}
    for name, node in zip(unique_node_names(graph.node), graph.node):
        if node.domain in ("", "ai.onnx") and node.op_type in _MATCHERS:
            node = _with_inputs(node, [aliases.get(t, t) for t in node.input])
            found[name] = _MATCHERS[node.op_type](node, name, operands)
    return found


@dataclass(frozen=True)
class _Operands:
    """What a node's operands may be: initializers (not graph inputs), Transposes of them, overridable ones."""

    constants: dict[str, onnx.TensorProto]
    transposes: dict[str, tuple[str, list[int] | None]]
    overridable: set[str]

    def why_not_weight(self, operand: str, ranks: tuple[int, ...], rank_note: str = "the kernels take {ranks}") -> str:
        """Why `operand` is no weight of ours: not a constant, or of a dtype or rank the kernels do not take
        (`rank_note` says why the rank is not, formatted with the `ranks` and the `spatial` axes it means)."""
        if operand in self.overridable:
            return "its weight is also a graph input (overridable at run time)"
        tensor = self.constants.get(operand)
        if tensor is None:
            return "its operands are computed tensors (no constant weight)"
        if tensor.data_type != _KERNEL_TYPE:
            return (f"its weight is {onnx.TensorProto.DataType.Name(tensor.data_type).lower()}; the block-sparse "
                    "kernels are float32")
        if len(tensor.dims) not in ranks:
            note = rank_note.format(ranks=" or ".join(map(str, ranks)), spatial=len(tensor.dims) - 2)
            return f"its weight has rank {len(tensor.dims)} ({note})"
        return ""


def _with_inputs(node: onnx.NodeProto, inputs: list[str]) -> onnx.NodeProto:
    """A copy of `node` reading `inputs` (the weights behind its Identity operands)."""
    if list(node.input) == inputs:
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.input[:]
    copy.input.extend(inputs)
    return copy


def _as_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _matmul_use(node, name, operands: _Operands) -> WeightUse | str:
    if len(node.input) != 2:
        return "not a two-operand MatMul"
    activation, operand = node.input
    if activation in operands.constants:
        return "its constant is the first operand (W @ x)"
    if operand in operands.transposes:
        source, perm = operands.transposes[operand]
        why = (operands.why_not_weight(source, (2,))
               or ("" if perm in (None, [1, 0]) else f"its weight is permuted {perm}"))
        layout = WeightLayout("identity", tuple(operands.constants[source].dims)) if not why else None
        weight = source
    else:
        why = operands.why_not_weight(operand, (2,))
        layout = WeightLayout("transpose", tuple(operands.constants[operand].dims)) if not why else None
        weight = operand
    return why or WeightUse(name, "MatMul", weight, layout, activation, node.output[0])


def _gemm_use(node, name, operands: _Operands) -> WeightUse | str:
    if len(node.input) < 2:
        return "a Gemm without B"
    activation, operand = node.input[0], node.input[1]
    if activation in operands.constants:
        return "its constant is A, the first operand"
    why = operands.why_not_weight(operand, (2,))
    if why:
        return why
    kind = "identity" if _attr(node, "transB", 0) else "transpose"
    return WeightUse(name, "Gemm", operand, WeightLayout(kind, tuple(operands.constants[operand].dims)), activation,
                     node.output[0])


def _conv_use(node, name, operands: _Operands) -> WeightUse | str:
    if len(node.input) < 2:
        return "a Conv without a weight"
    activation, operand = node.input[0], node.input[1]
    why = operands.why_not_weight(operand, _CONV_WEIGHT_RANKS,
                                  "a {spatial}-D conv; the kernels take 1-D and 2-D convs")
    if why:
        return why
    if activation in operands.constants:
        return "its input is a constant"
    group = _attr(node, "group", 1)
    if group != 1:
        return f"group {group} (a depthwise or grouped conv)"
    tensor = operands.constants[operand]
    spatial = len(tensor.dims) - 2
    kernel = tuple(int(d) for d in tensor.dims[2:])
    geometry = ConvGeometry(
        kernel=kernel,
        strides=tuple(_attr(node, "strides", [1] * spatial)),
        pads=tuple(_attr(node, "pads", [0] * (2 * spatial))),
        dilations=tuple(_attr(node, "dilations", [1] * spatial)),
        auto_pad=_as_str(_attr(node, "auto_pad", "NOTSET")),
    )
    return WeightUse(name, "Conv", operand, WeightLayout("conv", tuple(tensor.dims)), activation,
                     node.output[0], geometry)


def _unserved(reason: str) -> Callable[..., str]:
    """A matcher for an op that carries weights no kernel of ours runs: always dense, for `reason`."""
    return lambda node, name, operands: reason


_MATCHERS: dict[str, Callable[..., WeightUse | str]] = {
    "MatMul": _matmul_use, "Gemm": _gemm_use, "Conv": _conv_use,
    "ConvTranspose": _unserved("no block-sparse kernel for ConvTranspose"),
    **{op: _unserved(f"no block-sparse kernel for {op} (a recurrent layer)") for op in ("RNN", "GRU", "LSTM")},
    **{op: _unserved(f"a quantized {op}: the block-sparse kernels are float32")
       for op in ("QLinearMatMul", "MatMulInteger", "QLinearConv", "ConvInteger")},
}
