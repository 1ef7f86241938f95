"""Which ONNX nodes are prunable, and how their weight maps onto the canonical view.

Only matching lives here ("which nodes"); what to do with them is the passes' business.
Prunable: MatMul whose second operand is a 2-D float32 initializer (directly or through a
Transpose of one), Gemm whose B is a 2-D float32 initializer, and a 1-D or 2-D Conv with a float32
initializer weight and group 1 (the kernels are float32, and a Conv1d runs as a 2-D conv of one-row
images). Depthwise and grouped convs, 3-D convs, MatMuls between two activations, weights of other
dtypes and weights that are also graph inputs (overridable at run time) stay dense.
"""
from __future__ import annotations

from collections.abc import Sequence
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


def weight_uses(graph: onnx.GraphProto, names: Sequence[str] | None = None) -> list[WeightUse]:
    """Every node's reading of a prunable weight, in graph order; `names` are the nodes' names (default
    their ONNX names).

    A weight is reached directly, through a Transpose of it, or through Identity nodes of either: an
    exporter that finds two layers' weights equal (torch's deep-copied encoder layers before training)
    keeps one initializer and feeds the other layer an Identity of it, and that layer reads the same
    weight, pruned with one mask."""
    graph_inputs = {v.name for v in graph.input}
    constants = {t.name: t for t in graph.initializer if t.name not in graph_inputs}
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
    uses = []
    for name, node in zip(names or [n.name for n in graph.node], graph.node):
        use = find_weight_use(node, name, constants, transposes, aliases)
        if use is not None:
            uses.append(use)
    return uses


def find_weight_use(
    node: onnx.NodeProto,
    name: str,
    constants: dict[str, onnx.TensorProto],
    transposes: dict[str, tuple[str, list[int] | None]],
    aliases: dict[str, str] | None = None,
) -> WeightUse | None:
    """The prunable weight `node` reads, or None.

    `constants` are the initializers that are not graph inputs; `transposes` maps a Transpose
    node's output to its (input, perm); `aliases` an Identity's output to the initializer it passes on.
    """
    if node.domain not in ("", "ai.onnx"):
        return None
    if aliases:
        node = _with_inputs(node, [aliases.get(t, t) for t in node.input])
    if node.op_type == "MatMul" and len(node.input) == 2:
        return _matmul_use(node, name, constants, transposes)
    if node.op_type == "Gemm" and len(node.input) >= 2:
        return _gemm_use(node, name, constants)
    if node.op_type == "Conv" and len(node.input) >= 2:
        return _conv_use(node, name, constants)
    return None


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


def _float_2d(tensor: onnx.TensorProto | None) -> bool:
    return tensor is not None and tensor.data_type == _KERNEL_TYPE and len(tensor.dims) == 2


def _matmul_use(node, name, constants, transposes) -> WeightUse | None:
    activation, operand = node.input
    if activation in constants:
        return None
    if _float_2d(constants.get(operand)):
        tensor = constants[operand]
        return WeightUse(name, "MatMul", operand, WeightLayout("transpose", tuple(tensor.dims)), activation, node.output[0])
    if operand in transposes:
        source, perm = transposes[operand]
        if _float_2d(constants.get(source)) and perm in (None, [1, 0]):
            tensor = constants[source]
            return WeightUse(name, "MatMul", source, WeightLayout("identity", tuple(tensor.dims)), activation, node.output[0])
    return None


def _gemm_use(node, name, constants) -> WeightUse | None:
    activation, operand = node.input[0], node.input[1]
    if activation in constants or not _float_2d(constants.get(operand)):
        return None
    kind = "identity" if _attr(node, "transB", 0) else "transpose"
    return WeightUse(name, "Gemm", operand, WeightLayout(kind, tuple(constants[operand].dims)), activation,
                     node.output[0])


def _conv_use(node, name, constants) -> WeightUse | None:
    activation, operand = node.input[0], node.input[1]
    tensor = constants.get(operand)
    if (activation in constants or tensor is None or tensor.data_type != _KERNEL_TYPE
            or len(tensor.dims) not in _CONV_WEIGHT_RANKS):
        return None
    if _attr(node, "group", 1) != 1:
        return None
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
