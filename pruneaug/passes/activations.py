"""The X of each prunable layer: its input activation seen as rows of Y[m, out] = X[m, in] @ W.T.

Importance needs the squared norm of each column of X, reconstruction its Gram matrix X.T @ X;
both read X through these functions, so MatMul on N-D activations, Gemm with transA and Conv
(im2col columns in the canonical W order) are handled in one place. For a Conv the column norms
come window by window, without building the im2col matrix (which can be many times the input).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from pruneaug.ir.layer import ConvGeometry


def resolve_pads(conv: ConvGeometry, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Explicit begin/end pads, auto_pad resolved as ONNX defines it."""
    rank = len(spatial)
    if conv.auto_pad in ("NOTSET", ""):
        return conv.pads
    if conv.auto_pad == "VALID":
        return (0,) * (2 * rank)
    begins, ends = [], []
    for size, kernel, stride, dilation in zip(spatial, conv.kernel, conv.strides, conv.dilations):
        out = -(-size // stride)
        total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if conv.auto_pad == "SAME_UPPER" else large)
        ends.append(large if conv.auto_pad == "SAME_UPPER" else small)
    return tuple(begins + ends)


def conv_windows(x: np.ndarray, conv: ConvGeometry) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """(kernel offset, [N, Cin, out...] view of the padded input that offset reads at every output position)."""
    rank = len(conv.kernel)
    pads = resolve_pads(conv, x.shape[2:])
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[rank + i]) for i in range(rank)])
    outs = [
        (padded.shape[2 + i] - conv.dilations[i] * (conv.kernel[i] - 1) - 1) // conv.strides[i] + 1 for i in range(rank)
    ]
    for offset in np.ndindex(*conv.kernel):
        window = tuple(
            slice(offset[i] * conv.dilations[i], offset[i] * conv.dilations[i] + conv.strides[i] * (outs[i] - 1) + 1,
                  conv.strides[i])
            for i in range(rank)
        )
        yield offset, padded[(slice(None), slice(None)) + window]


def im2col(x: np.ndarray, conv: ConvGeometry) -> np.ndarray:
    """[N * output positions, Cin * prod(kernel)] rows of a Conv input, columns in canonical W order."""
    rank = len(conv.kernel)
    columns = None
    for offset, window in conv_windows(x, conv):
        if columns is None:
            columns = np.empty((x.shape[0], x.shape[1], *conv.kernel, *window.shape[2:]), x.dtype)
        columns[(slice(None), slice(None)) + offset] = window
    assert columns is not None
    # [N, Cin, k..., out...] -> [N, out..., Cin, k...] -> rows
    moved = np.moveaxis(columns, list(range(2 + rank, 2 + 2 * rank)), list(range(1, 1 + rank)))
    return moved.reshape(-1, int(np.prod(columns.shape[1:2 + rank])))


def _trans_a(proto: onnx.NodeProto) -> bool:
    return proto.op_type == "Gemm" and any(a.name == "transA" and a.i for a in proto.attribute)


def input_rows(x: np.ndarray, proto: onnx.NodeProto, conv: ConvGeometry | None) -> np.ndarray:
    """The X of Y[m, out] = X[m, in] @ W.T for a prunable node reading activation `x`."""
    if proto.op_type == "Conv":
        assert conv is not None
        return im2col(x, conv)
    if _trans_a(proto):
        return x.T
    return x.reshape(-1, x.shape[-1])


def column_squares(x: np.ndarray, proto: onnx.NodeProto, conv: ConvGeometry | None) -> np.ndarray:
    """Sum over the rows of X of x_j**2, per canonical input column j."""
    x = x.astype(np.float64, copy=False)
    if proto.op_type != "Conv":
        rows = input_rows(x, proto, conv)
        return np.einsum("mk,mk->k", rows, rows)
    assert conv is not None
    squares = np.empty((x.shape[1], *conv.kernel))
    for offset, window in conv_windows(x, conv):
        squares[(slice(None),) + offset] = (window * window).sum(axis=tuple(a for a in range(window.ndim) if a != 1))
    return squares.reshape(-1)
