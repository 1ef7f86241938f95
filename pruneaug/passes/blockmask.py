"""Block masks: pool importance over `r x c` blocks of W[out, in], drop the lowest-scoring blocks.

Needs: prunable nodes with `block` (BlockSpec) and `importance`. Leaves: `mask` (bool, canonical
shape, True = kept) on each prunable node, and the weights zeroed outside it in their ONNX layout.

    >>> keep = block_keep(np.array([[3., 1.], [2., 4.]]), sparsity=0.5)
    >>> keep
    array([[ True, False],
           [False,  True]])

Blocks tile W from the top-left; where `r` or `c` does not divide the dimension, the last block of
a row or column is smaller (a ragged edge): it is scored and pruned like any other block, never
dropped. Scores are pooled per weight so that a small edge block competes fairly with full ones
(`l2` is the block's root-mean-square scaled to a full block's size).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from pruneaug.ir.graph import IRModel
from pruneaug.ir.layer import BlockSpec

POOLS = ("l2", "mean", "max")


def block_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """How many block rows and block columns tile `shape` (ceil division: ragged edges count)."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def fits(shape: tuple[int, int], block: tuple[int, int]) -> bool:
    """A block tiles a layer when neither side exceeds the weight's (ragged edges are fine)."""
    return block[0] <= shape[0] and block[1] <= shape[1]


def _blocked(matrix: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[block_rows, r, block_cols, c] view of `matrix` zero-padded to whole blocks."""
    rows, cols = block_grid(matrix.shape, block)
    padded = np.zeros((rows * block[0], cols * block[1]), matrix.dtype)
    padded[: matrix.shape[0], : matrix.shape[1]] = matrix
    return padded.reshape(rows, block[0], cols, block[1])


def block_areas(shape: tuple[int, int], block: tuple[int, int]) -> np.ndarray:
    """The number of real (unpadded) weights in each block."""
    return _blocked(np.ones(shape, np.int64), block).sum(axis=(1, 3))


def block_scores(importance: np.ndarray, block: tuple[int, int], pool: str = "l2") -> np.ndarray:
    """One score per block, [block_rows, block_cols]."""
    assert pool in POOLS, pool
    blocked = _blocked(importance.astype(np.float64, copy=False), block)
    areas = block_areas(importance.shape, block)
    if pool == "max":
        return blocked.max(axis=(1, 3))
    if pool == "mean":
        return blocked.sum(axis=(1, 3)) / areas
    return np.sqrt((blocked**2).sum(axis=(1, 3)) * (block[0] * block[1]) / areas)


def pruned_block_count(n_blocks: int, sparsity: float) -> int:
    """How many blocks a sparsity removes: the nearest whole number, halves rounded up."""
    return int(np.floor(sparsity * n_blocks + 0.5))


def block_keep(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """True for the blocks kept: all but the `pruned_block_count` lowest scores (ties: the earlier block goes first).

    A partition, not a sort: unstructured layers of large models have millions of blocks, and the
    search masks every layer once per validated plan.
    """
    flat = scores.ravel()
    pruned = pruned_block_count(flat.size, sparsity)
    keep = np.ones(flat.size, bool)
    if pruned >= flat.size:
        keep[:] = False
    elif pruned > 0:
        threshold = np.partition(flat, pruned - 1)[pruned - 1]
        below = flat < threshold
        keep[below] = False
        keep[np.flatnonzero(flat == threshold)[: pruned - int(below.sum())]] = False
    return keep.reshape(scores.shape)


def expand_blocks(keep: np.ndarray, block: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Per-weight mask from a per-block one, cut to `shape`."""
    full = np.repeat(np.repeat(keep, block[0], axis=0), block[1], axis=1)
    return full[: shape[0], : shape[1]]


def layer_mask(importance: np.ndarray, spec: BlockSpec, pool: str = "l2") -> np.ndarray:
    keep = block_keep(block_scores(importance, spec.shape, pool), spec.sparsity)
    return expand_blocks(keep, spec.shape, importance.shape)


def assign_blocks(ir: IRModel, blocks: Mapping[str, BlockSpec]) -> IRModel:
    """Set the block shape and sparsity of the named prunable nodes."""
    result = ir.copy()
    for node, spec in blocks.items():
        assert "layer" in result.graph.nodes[node], node
        result.graph.nodes[node]["block"] = spec
    return result


def apply_masks(ir: IRModel, pool: str = "l2") -> IRModel:
    """Mask every prunable node by its block spec and importance; weights outside the mask become 0."""
    result = ir.copy()
    for node in ir.prunable_nodes():
        data = result.graph.nodes[node]
        mask = layer_mask(data["importance"], data["block"], pool)
        data["mask"] = mask
        if not mask.all():
            result.set_canonical_weight(node, np.where(mask, ir.canonical_weight(node), 0))
    return result


def detect_block(weight: np.ndarray, candidates: Iterable[tuple[int, int]]) -> BlockSpec:
    """The largest candidate block whose whole blocks hold every zero of `weight`, with its block sparsity.

    Falls back to 1x1 (every zero is its own block); equal areas: the first candidate listed wins.
    Blocks that do not fit the weight are skipped: a 1x4 block on a one-column weight is no 1x4 block.
    A weight without zeros is dense: 1x1 at sparsity 0.
    """
    zeros = weight == 0
    total_zeros = int(zeros.sum())
    if total_zeros == 0:
        return BlockSpec(1, 1, 0.0)
    for rows, cols in sorted(dict.fromkeys(candidates), key=lambda b: -b[0] * b[1]):
        if not fits(weight.shape, (rows, cols)):
            continue
        areas = block_areas(weight.shape, (rows, cols))
        empty = _blocked(zeros, (rows, cols)).sum(axis=(1, 3)) == areas
        if int(areas[empty].sum()) == total_zeros:
            return BlockSpec(rows, cols, float(empty.sum()) / empty.size)
    return BlockSpec(1, 1, total_zeros / weight.size)


def detect_blocks(ir: IRModel, candidates: Iterable[tuple[int, int]]) -> IRModel:
    """Read each prunable weight's block structure off its zeros (for --keep-sparsity)."""
    candidates = list(candidates)
    return assign_blocks(ir, {n: detect_block(ir.canonical_weight(n), candidates) for n in ir.prunable_nodes()})
