"""Which ONNX nodes are prunable, and how their weight maps onto the canonical view.

Only matching lives here ("which nodes"); what to do with them is the passes' business.
Prunable: MatMul whose second operand is a 2-D float initializer (directly or through a
Transpose of one), Gemm whose B is a 2-D float initializer, and Conv with an initializer weight
and group 1. Depthwise and grouped convs, MatMuls between two activations and weights that are
also graph inputs (overridable at run time) stay dense.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from pruneaug.ir.layer import ConvGeometry
from pruneaug.ir.weights import WeightLayout

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


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


def find_weight_use(
    node: onnx.NodeProto,
    name: str,
    constants: dict[str, onnx.TensorProto],
    transposes: dict[str, tuple[str, list[int] | None]],
) -> WeightUse | None:
    """The prunable weight `node` reads, or None.

    `constants` are the initializers that are not graph inputs; `transposes` maps a Transpose
    node's output to its (input, perm).
    """
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul" and len(node.input) == 2:
        return _matmul_use(node, name, constants, transposes)
    if node.op_type == "Gemm" and len(node.input) >= 2:
        return _gemm_use(node, name, constants)
    if node.op_type == "Conv" and len(node.input) >= 2:
        return _conv_use(node, name, constants)
    return None


def _as_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _float_2d(tensor: onnx.TensorProto | None) -> bool:
    return tensor is not None and tensor.data_type in _FLOAT_TYPES and len(tensor.dims) == 2


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
    if activation in constants or tensor is None or tensor.data_type not in _FLOAT_TYPES or len(tensor.dims) < 3:
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
