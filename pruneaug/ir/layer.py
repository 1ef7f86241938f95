"""What the IR records on each prunable node: its block shape and sparsity.

    >>> BlockSpec(8, 8, 0.8)
    BlockSpec(rows=8, cols=8, sparsity=0.8)
    >>> BlockSpec.parse("16x4")
    BlockSpec(rows=16, cols=4, sparsity=0.0)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from pruneaug.errors import OptionError
from pruneaug.ir.weights import WeightLayout

_BLOCK_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


_ROUNDING_SLACK = 1e-9  # a sparsity read back as 1 - density (0.45 as 1 - 0.55) rounds as the sparsity itself


def removed_block_count(n_blocks, sparsity):
    """How many of a layer's `n_blocks` blocks `sparsity` removes: the nearest whole number (halves up),
    but never every block short of sparsity 1 (a layer without blocks outputs its bias whatever its input:
    0.95 of 4 blocks removed all 4). The one rule for masks, kernels timed and predicted costs alike.
    Broadcasts like numpy; int64."""
    n = np.asarray(n_blocks, dtype=np.int64)
    s = np.asarray(sparsity, dtype=np.float64)
    nearest = np.floor(s * n + 0.5 + _ROUNDING_SLACK).astype(np.int64)
    return np.where(s >= 1.0, n, np.clip(nearest, 0, np.maximum(n - 1, 0)))


@dataclass(frozen=True)
class BlockSpec:
    """A block `rows x cols` of the canonical view W[out, in], and the share of blocks removed."""

    rows: int
    cols: int
    sparsity: float = 0.0

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise OptionError(f"block {self.rows}x{self.cols}: both sides must be >= 1")
        if not 0.0 <= self.sparsity <= 1.0:  # 1.0 only arises from a weight that is all zeros already
            raise OptionError(f"sparsity {self.sparsity}: must be in [0, 1]")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.cols}"

    @classmethod
    def parse(cls, text: str, sparsity: float = 0.0) -> "BlockSpec":
        """Read `RxC` as typed by a user; the error names the text it could not read."""
        match = _BLOCK_RE.match(text)
        if not match:
            raise OptionError(f"--block {text!r}: expected ROWSxCOLS with positive integers, e.g. 8x8")
        rows, cols = int(match.group(1)), int(match.group(2))
        if rows < 1 or cols < 1:
            raise OptionError(f"--block {text!r}: both sides must be >= 1")
        return cls(rows, cols, sparsity)


@dataclass(frozen=True)
class ConvGeometry:
    """What a Conv's kernel needs beyond its weight: kernel size, strides, pads (ONNX order), dilations."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # begin pads for each spatial axis, then end pads
    dilations: tuple[int, ...]
    auto_pad: str = "NOTSET"  # SAME_UPPER/SAME_LOWER/VALID override `pads`, as in ONNX


@dataclass(frozen=True)
class LayerRead:
    """How one more node reads a shared weight: its rows, and a Conv's geometry and input (see PrunableLayer)."""

    m: int | None
    conv: ConvGeometry | None = None
    input_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable weight and the nodes that read it (several when the weight is shared).

    `m` is the rows of the layer's X per inference (batch x tokens for MatMul, batch x H_out x W_out
    for Conv) at the input shapes the IR was lifted with; None where shape inference could not tell.
    `input_shape` is a Conv's X (N, C, spatial...) at those shapes, None likewise (or for other ops):
    the cost model times a Conv's own kernels at it. These are the first reader's; `other_reads` the
    other readers' (each runs its own kernel call, at its own shapes).
    """

    weight: str
    nodes: tuple[str, ...]
    op_type: str
    layout: "WeightLayout"
    m: int | None = None
    conv: ConvGeometry | None = None
    input_shape: tuple[int, ...] | None = None
    other_reads: tuple[LayerRead, ...] = ()

    def reads(self) -> list["PrunableLayer"]:
        """The layer as each of its readers runs it (one for an unshared weight): a shared weight costs
        one kernel call per reader."""
        return [self] + [replace(self, m=read.m, conv=read.conv, input_shape=read.input_shape, other_reads=())
                         for read in self.other_reads]

    @property
    def node(self) -> str:
        """The node that carries this layer's annotations (the first reader in graph order)."""
        return self.nodes[0]

    @property
    def shape(self) -> tuple[int, int]:
        """The canonical (out, in)."""
        return self.layout.canonical_shape
