"""Block masks: pool importance over `r x c` blocks of W[out, in], drop the lowest-scoring blocks.

Needs: prunable nodes with `block` (BlockSpec) and `importance`. Leaves: `mask` (bool, canonical
shape, True = kept) on each prunable node, and the weights zeroed outside it in their ONNX layout.

    >>> layer_mask(np.array([[3., 1.], [2., 4.]]), BlockSpec(1, 1, 0.5))
    array([[ True, False],
           [False,  True]])

Blocks tile W from the top-left; where `r` or `c` does not divide the dimension, the last block of
a row or column is smaller (a ragged edge): it is scored and pruned like any other block, never
dropped. Scores are pooled per weight so that a small edge block competes fairly with full ones
(`l2` is the block's root-mean-square scaled to a full block's size).
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

import numpy as np

from pruneaug.ir.graph import IRModel
from pruneaug.ir.layer import BlockSpec, removed_block_count
from pruneaug.passes.parallel import map_threads

POOLS = ("l2", "mean", "max")
DEFAULT_POOL = "l2"  # how a block's weights' importances make its score, unless a caller says otherwise


def prunes_any(sparsities: Iterable[float]) -> bool:
    """Whether a plan removes any weight: one that removes none is the dense model, the reference the
    pruned ones are refit towards, so a `finish` (reconstruction) leaves it as it is."""
    return any(sparsity > 0 for sparsity in sparsities)


def block_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """How many block rows and block columns tile `shape` (ceil division: ragged edges count)."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def fits(shape: tuple[int, int], block: tuple[int, int]) -> bool:
    """A block tiles a layer when neither side exceeds the weight's (ragged edges are fine)."""
    return block[0] <= shape[0] and block[1] <= shape[1]


def _blocked(matrix: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[block_rows, r, block_cols, c] view of `matrix` zero-padded to whole blocks."""
    rows, cols = block_grid(matrix.shape, block)
    if (rows * block[0], cols * block[1]) == matrix.shape:  # whole blocks: a view, no copy
        return matrix.reshape(rows, block[0], cols, block[1])
    padded = np.zeros((rows * block[0], cols * block[1]), matrix.dtype)
    padded[: matrix.shape[0], : matrix.shape[1]] = matrix
    return padded.reshape(rows, block[0], cols, block[1])


def _extents(size: int, step: int) -> np.ndarray:
    """The length of each block along one axis: `step`, the last one shorter where `step` does not divide `size`."""
    return np.minimum(step, size - np.arange(0, size, step))


def block_areas(shape: tuple[int, int], block: tuple[int, int]) -> np.ndarray:
    """The number of real (unpadded) weights in each block."""
    return np.outer(_extents(shape[0], block[0]), _extents(shape[1], block[1]))


def unit_scores(importance: np.ndarray, pool: str = DEFAULT_POOL) -> np.ndarray:
    """The scores of 1x1 blocks in the importance's own precision: every pool of one weight is the
    weight's own score (l2: its magnitude). Masks compare them only, so float32 orders them as float64
    would; converting BERT-base's 85M scores to float64 for every validated plan took seconds."""
    return np.abs(importance) if pool == "l2" else importance


def block_scores(importance: np.ndarray, block: tuple[int, int], pool: str = DEFAULT_POOL) -> np.ndarray:
    """One score per block, [block_rows, block_cols], in float64 (the proxy sums their squares)."""
    assert pool in POOLS, pool
    if block == (1, 1):
        return unit_scores(importance, pool).astype(np.float64)
    blocked = _blocked(importance.astype(np.float64, copy=False), block)
    areas = block_areas(importance.shape, block)
    if pool == "max":
        return blocked.max(axis=(1, 3))
    if pool == "mean":
        return blocked.sum(axis=(1, 3)) / areas
    return np.sqrt((blocked**2).sum(axis=(1, 3)) * (block[0] * block[1]) / areas)


def pruned_block_count(n_blocks: int, sparsity: float) -> int:
    """How many blocks a sparsity removes (`layer.removed_block_count`: never all of them below 1)."""
    return int(removed_block_count(n_blocks, sparsity))


def cut(flat: np.ndarray, pruned: int) -> tuple[float, int]:
    """Where pruning the `pruned` lowest scores cuts: the highest pruned score, and how many of the scores
    equal to it are pruned (the earliest ones). A partition, not a sort: unstructured layers of large
    models have millions of blocks."""
    if pruned <= 0:
        return -np.inf, 0
    threshold = np.partition(flat, pruned - 1)[pruned - 1]
    return float(threshold), pruned - int(np.count_nonzero(flat < threshold))


def keep_above_cut(flat: np.ndarray, where: tuple[float, int]) -> np.ndarray:
    threshold, tied_pruned = where
    keep = flat > threshold
    if tied_pruned:
        tied = np.flatnonzero(flat == threshold)
        keep[tied[tied_pruned:]] = True
    return keep


def removal_order_of(scores: np.ndarray) -> np.ndarray:
    """Flat block indices in the order pruning removes them: by score, ties by position (a stable sort)."""
    flat = scores.ravel()
    order = np.argsort(flat)  # quicksort: twice as fast as a stable sort, and the same order where no scores tie
    ordered = flat[order]
    if (ordered[1:] == ordered[:-1]).any():
        order = np.argsort(flat, kind="stable")
    return order.astype(np.int32 if flat.size < 2**31 else np.int64)


def keep_from_order(order: np.ndarray, grid: tuple[int, int], sparsity: float) -> np.ndarray:
    keep = np.ones(order.size, bool)
    keep[order[: pruned_block_count(order.size, sparsity)]] = False
    return keep.reshape(grid)


# id(importance) -> {key: value}: what masking a layer again would recompute (removal orders, cuts).
# Entries live as long as their importance array: the search masks every layer once per validated
# plan, mostly with the options of the plan before, and the proxy reads the same orders. Importance
# arrays are never changed in place (a pass that rescores a layer sets a new array), so the array's
# identity is its key.
_MEMO: dict[int, dict[tuple, object]] = {}


def _memoised(importance: np.ndarray, key: tuple, compute):
    entries = _MEMO.get(id(importance))
    if entries is None:
        entries = _MEMO[id(importance)] = {}
        weakref.finalize(importance, _MEMO.pop, id(importance), None)
    if key not in entries:
        entries[key] = compute()
    return entries[key]


def removal_order(importance: np.ndarray, block: tuple[int, int], pool: str = DEFAULT_POOL) -> np.ndarray:
    """`removal_order_of` the layer's block scores, memoised for the lifetime of `importance`."""
    return _memoised(importance, ("order", tuple(block), pool),
                     lambda: removal_order_of(block_scores(importance, block, pool)))


def expand_blocks(keep: np.ndarray, block: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Per-weight mask from a per-block one, cut to `shape`."""
    rows, cols = keep.shape
    full = np.broadcast_to(keep[:, None, :, None], (rows, block[0], cols, block[1])).reshape(rows * block[0], -1)
    return full[: shape[0], : shape[1]]


def layer_mask(importance: np.ndarray, spec: BlockSpec, pool: str = DEFAULT_POOL) -> np.ndarray:
    """The layer's per-weight mask. 1x1 from a memoised cut (sorting millions of weights costs more
    than the few masks a search asks of them); larger blocks from their memoised removal order.
    Sparsity 0 keeps everything without a look at the scores (most layers of most validated plans)."""
    if spec.sparsity == 0:
        return np.ones(importance.shape, bool)
    if spec.shape == (1, 1):
        flat = unit_scores(importance, pool).ravel()
        pruned = pruned_block_count(flat.size, spec.sparsity)
        where = _memoised(importance, ("cut", pool, pruned), lambda: cut(flat, pruned))
        return keep_above_cut(flat, where).reshape(importance.shape)
    keep = keep_from_order(removal_order(importance, spec.shape, pool), block_grid(importance.shape, spec.shape),
                           spec.sparsity)
    return expand_blocks(keep, spec.shape, importance.shape)


def assign_blocks(ir: IRModel, blocks: Mapping[str, BlockSpec]) -> IRModel:
    """Set the block shape and sparsity of the named prunable nodes."""
    result = ir.copy()
    for node, spec in blocks.items():
        assert "layer" in result.graph.nodes[node], node
        result.graph.nodes[node]["block"] = spec
    return result


def apply_masks(ir: IRModel, pool: str = DEFAULT_POOL) -> IRModel:
    """Mask every prunable node by its block spec and importance; weights outside the mask become 0."""
    result = ir.copy()
    nodes = ir.prunable_nodes()

    def masked(node: str) -> tuple[np.ndarray, np.ndarray | None]:
        data = ir.graph.nodes[node]
        mask = layer_mask(data["importance"], data["block"], pool)
        return mask, None if mask.all() else ir.masked_weight(node, mask)

    for node, (mask, weight) in zip(nodes, map_threads(masked, nodes)):  # every core: BERT-base masks 85M weights
        result.graph.nodes[node]["mask"] = mask
        if weight is not None:
            result.weights[ir.layer(node).weight] = weight
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
