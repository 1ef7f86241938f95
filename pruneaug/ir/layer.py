"""What the IR records on each prunable node: its block shape and sparsity.

    >>> BlockSpec(8, 8, 0.8)
    BlockSpec(rows=8, cols=8, sparsity=0.8)
    >>> BlockSpec.parse("16x4")
    BlockSpec(rows=16, cols=4, sparsity=0.0)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pruneaug.errors import OptionError
from pruneaug.ir.weights import WeightLayout

_BLOCK_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


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
class PrunableLayer:
    """One prunable weight and the nodes that read it (several when the weight is shared).

    `m` is the rows of the layer's X per inference (batch x tokens for MatMul, batch x H_out x W_out
    for Conv) at the input shapes the IR was lifted with; None where shape inference could not tell.
    `input_shape` is a Conv's X (N, C, spatial...) at those shapes, None likewise (or for other ops):
    the cost model times a Conv's own kernels at it.
    """

    weight: str
    nodes: tuple[str, ...]
    op_type: str
    layout: "WeightLayout"
    m: int | None = None
    conv: ConvGeometry | None = None
    input_shape: tuple[int, ...] | None = None

    @property
    def node(self) -> str:
        """The node that carries this layer's annotations (the first reader in graph order)."""
        return self.nodes[0]

    @property
    def shape(self) -> tuple[int, int]:
        """The canonical (out, in)."""
        return self.layout.canonical_shape
