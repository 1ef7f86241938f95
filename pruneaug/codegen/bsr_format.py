"""Block-sparse row (BSR) weights: the canonical `W[out, in]` cut into `r x c` blocks.

    >>> w = to_bsr(np.eye(4, dtype=np.float32), (2, 2))
    >>> w.indptr.tolist(), w.indices.tolist(), w.data.shape
    ([0, 1, 2], [0, 1], (2, 2, 2))

Ragged edges (a block that does not divide `out` or `in`) are zero-padded so that every stored
block is a full `r x c` tile; `shape` keeps the unpadded size. All-zero blocks are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pruneaug.ir.layer import removed_block_count


@dataclass(frozen=True)
class BSRWeight:
    """Canonical `W[out, in]` in block-sparse row form, ragged edges zero-padded."""

    data: np.ndarray  # float32 [nnzb, r, c]
    indices: np.ndarray  # int32 [nnzb], block-column of each block
    indptr: np.ndarray  # int32 [block_rows + 1]
    shape: tuple[int, int]  # (out, in), unpadded
    block: tuple[int, int]  # (r, c)

    @property
    def block_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def block_cols(self) -> int:
        return -(-self.shape[1] // self.block[1])

    @property
    def nnz_blocks(self) -> int:
        return len(self.indices)

    @property
    def density(self) -> float:
        """Kept blocks over all blocks of the (ceil-div) block grid."""
        return self.nnz_blocks / max(1, self.block_rows * self.block_cols)

    def to_dense(self) -> np.ndarray:
        """The unpadded `W[out, in]` (for tests and reference results)."""
        r, c = self.block
        padded = np.zeros((self.block_rows * r, self.block_cols * c), np.float32)
        for row in range(self.block_rows):
            for b in range(self.indptr[row], self.indptr[row + 1]):
                col = self.indices[b]
                padded[row * r:(row + 1) * r, col * c:(col + 1) * c] = self.data[b]
        return padded[: self.shape[0], : self.shape[1]]


def _pad_to_blocks(w2d: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    r, c = block
    out, in_ = w2d.shape
    padded = np.zeros((-(-out // r) * r, -(-in_ // c) * c), np.float32)
    padded[:out, :in_] = w2d
    return padded


def _from_block_mask(padded: np.ndarray, keep: np.ndarray, shape: tuple[int, int],
                     block: tuple[int, int]) -> BSRWeight:
    r, c = block
    tiles = padded.reshape(keep.shape[0], r, keep.shape[1], c).transpose(0, 2, 1, 3)
    rows, cols = np.nonzero(keep)
    indptr = np.zeros(keep.shape[0] + 1, np.int32)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return BSRWeight(
        data=np.ascontiguousarray(tiles[rows, cols], dtype=np.float32).reshape(len(rows), r, c),
        indices=cols.astype(np.int32),
        indptr=indptr,
        shape=(int(shape[0]), int(shape[1])),
        block=(int(r), int(c)),
    )


def to_bsr(w2d: np.ndarray, block: tuple[int, int]) -> BSRWeight:
    """BSR of a dense 2-D weight; blocks that are entirely zero are not stored."""
    assert w2d.ndim == 2 and block[0] > 0 and block[1] > 0, (w2d.shape, block)
    padded = _pad_to_blocks(np.asarray(w2d, np.float32), block)
    r, c = block
    grid = padded.reshape(padded.shape[0] // r, r, padded.shape[1] // c, c)
    keep = np.any(grid != 0, axis=(1, 3))
    return _from_block_mask(padded, keep, w2d.shape, block)


def random_bsr_weight(out: int, in_: int, block: tuple[int, int], density: float,
                      seed: int = 0) -> BSRWeight:
    """A random BSR weight keeping as many blocks as a mask at sparsity `1 - density` keeps
    (`removed_block_count`; for tests, benchmarks and the kernels the cost model times)."""
    r, c = block
    grid = (-(-out // r), -(-in_ // c))
    nblocks = grid[0] * grid[1]
    rng = np.random.default_rng(seed)
    keep = np.zeros(nblocks, bool)
    keep[rng.choice(nblocks, nblocks - int(removed_block_count(nblocks, 1.0 - density)), replace=False)] = True
    keep = keep.reshape(grid)
    padded = np.zeros((grid[0] * r, grid[1] * c), np.float32)
    padded[:out, :in_] = rng.standard_normal((out, in_)).astype(np.float32)
    # Zero every dropped block; a kept block stays stored even where padding makes it partly zero.
    padded *= np.kron(keep, np.ones((r, c), np.float32))
    return _from_block_mask(padded, keep, (out, in_), block)


def padded_bias(bias: np.ndarray | None, out: int, length: int) -> np.ndarray:
    """The bias (or zeros) padded with zeros to the kernel's padded output size."""
    padded = np.zeros(length, np.float32)
    if bias is not None:
        assert bias.shape == (out,), (bias.shape, out)
        padded[:out] = bias
    return padded


def nonempty_blocks(weight: BSRWeight) -> tuple[np.ndarray, np.ndarray]:
    """data, indices with one never-read dummy block when nothing is kept (TIR wants no 0-sized buffer)."""
    if weight.nnz_blocks:
        return weight.data, weight.indices
    r, c = weight.block
    return np.zeros((1, r, c), np.float32), np.zeros(1, np.int32)
