"""Numpy references the tests check pruneaug against: a layer's output from its canonical W, and im2col."""
from __future__ import annotations

import numpy as np
import onnx

from pruneaug.ir.graph import IRModel, lower
from pruneaug.passes import ort_run
from pruneaug.passes.activations import resolve_pads


def activate(y: np.ndarray, activation: str | None) -> np.ndarray:
    """A kernel's `activation` (`bsr.ACTIVATIONS`) applied to its linear result `y`."""
    if activation == "relu":
        return np.maximum(y, 0)
    if activation == "relu6":
        return np.clip(y, 0, 6)
    if activation == "hardswish":
        return y * np.clip(y + 3, 0, 6) / 6
    if activation == "gelu":  # exact erf: the kernels' rational approximation must stay within the tests' tolerance
        from scipy.special import erf

        return y * 0.5 * (1 + erf(y / np.sqrt(2)))
    assert activation is None, activation
    return y


def im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """[N * out positions, Cin * prod(kernel)] rows in the canonical column order, by explicit loops."""
    rank = len(kernel)
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[rank + i]) for i in range(rank)])
    outs = [(padded.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(rank)]
    rows = []
    for n in range(x.shape[0]):
        for position in np.ndindex(*outs):
            row = []
            for channel in range(x.shape[1]):
                for offset in np.ndindex(*kernel):
                    index = tuple(position[i] * strides[i] + offset[i] * dilations[i] for i in range(rank))
                    row.append(padded[(n, channel) + index])
            rows.append(row)
    return np.asarray(rows)


def node_tensors(ir: IRModel, inputs: dict[str, np.ndarray], tensors: list[str]) -> dict[str, np.ndarray]:
    model = ort_run.with_outputs(lower(ir), tensors)
    return dict(zip(tensors, ort_run.make_session(model).run(tensors, inputs)))


def layer_output_from_canonical(ir: IRModel, node: str, x: np.ndarray) -> np.ndarray:
    """What `node` computes on input `x`, from its canonical weight: X @ W.T (Gemm/Conv extras included).

    Returned as [m, out] rows, to compare with the node's real output reshaped the same way.
    """
    layer = ir.layer(node)
    proto = ir.graph.nodes[node]["proto"]
    w = ir.canonical_weight(node).astype(np.float64)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in proto.attribute}
    if layer.op_type == "MatMul":
        return x.reshape(-1, x.shape[-1]) @ w.T
    if layer.op_type == "Gemm":
        a = x.T if attrs.get("transA", 0) else x
        y = attrs.get("alpha", 1.0) * (a @ w.T)
        if len(proto.input) > 2 and proto.input[2]:
            bias = onnx.numpy_helper.to_array(next(t for t in ir.source.graph.initializer if t.name == proto.input[2]))
            y = y + attrs.get("beta", 1.0) * bias
        return y
    conv = layer.conv
    pads = resolve_pads(conv, x.shape[2:])
    columns = im2col(x.astype(np.float64), conv.kernel, conv.strides, pads, conv.dilations)
    y = columns @ w.T  # [N * positions, Cout]
    if len(proto.input) > 2 and proto.input[2]:
        y = y + onnx.numpy_helper.to_array(next(t for t in ir.source.graph.initializer if t.name == proto.input[2]))
    return y


def rows_of_output(y: np.ndarray, op_type: str) -> np.ndarray:
    """A node's output as [m, out] rows: channels last for Conv."""
    if op_type == "Conv":
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])
