"""Canonical 2-D weight views: every prunable weight seen as W[out, in], so Y[m, out] = X[m, in] @ W.T.

Masks, importance and kernels all work on this one view; the weight itself stays in its ONNX
layout, so a view and its exact inverse are all a pass needs:

    >>> layout = WeightLayout("transpose", (64, 256))       # MatMul B[K=64, N=256]
    >>> layout.to_canonical(np.zeros((64, 256))).shape
    (256, 64)

Layouts:
- `transpose`: the stored array is [in, out] (MatMul `B`, Gemm `B` with transB=0).
- `identity`:  the stored array is already [out, in] (Gemm with transB=1, MatMul through Transpose(W)).
- `conv`:      the stored array is [Cout, Cin, k1, k2, ...]; the view is W[Cout, Cin*k1*k2*...] in im2col
               order (input channel major, then kernel positions row-major), as numpy's reshape gives.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAYOUT_KINDS = ("transpose", "identity", "conv")


@dataclass(frozen=True)
class WeightLayout:
    """How a stored weight maps onto its canonical view."""

    kind: str
    stored_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        assert self.kind in LAYOUT_KINDS, self.kind
        assert len(self.stored_shape) >= 3 if self.kind == "conv" else len(self.stored_shape) == 2

    @property
    def canonical_shape(self) -> tuple[int, int]:
        if self.kind == "transpose":
            return (self.stored_shape[1], self.stored_shape[0])
        if self.kind == "identity":
            return (self.stored_shape[0], self.stored_shape[1])
        return (self.stored_shape[0], int(np.prod(self.stored_shape[1:])))

    def to_canonical(self, stored: np.ndarray) -> np.ndarray:
        """A view (no copy where numpy allows) of the stored weight as W[out, in]."""
        assert stored.shape == self.stored_shape, (stored.shape, self.stored_shape)
        if self.kind == "transpose":
            return stored.T
        if self.kind == "identity":
            return stored
        return stored.reshape(self.canonical_shape)

    def from_canonical(self, canonical: np.ndarray) -> np.ndarray:
        """The exact inverse of `to_canonical`: a C-contiguous array in the stored layout."""
        assert canonical.shape == self.canonical_shape, (canonical.shape, self.canonical_shape)
        if self.kind == "transpose":
            return np.ascontiguousarray(canonical.T)
        if self.kind == "identity":
            return np.ascontiguousarray(canonical)
        return np.ascontiguousarray(canonical).reshape(self.stored_shape)
