"""Block masks: exact counts of zero blocks, zeros only in whole blocks, ragged edges, original layouts."""
from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zoo
from pruneaug.ir.graph import lift
from pruneaug.ir.layer import BlockSpec
from pruneaug.passes import blockmask, importance
from pruneaug.passes.blockmask import (block_areas, block_grid, block_scores, detect_block, layer_mask,
                                      pruned_block_count, removal_order)


def blocks_of(mask: np.ndarray, block: tuple[int, int]):
    """Yield each block's slice of `mask`, ragged edge blocks included."""
    rows, cols = block_grid(mask.shape, block)
    for i in range(rows):
        for j in range(cols):
            yield mask[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]


@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(1, 40), in_=st.integers(1, 40),
    rows=st.integers(1, 9), cols=st.integers(1, 9),
    sparsity=st.floats(0, 0.99), seed=st.integers(0, 2**16),
)
def test_mask_removes_exactly_the_asked_blocks(out, in_, rows, cols, sparsity, seed):
    importance_values = np.random.default_rng(seed).random((out, in_)) + 1e-3
    mask = layer_mask(importance_values, BlockSpec(rows, cols, sparsity))
    assert mask.shape == (out, in_)
    blocks = list(blocks_of(mask, (rows, cols)))
    assert all(b.all() or not b.any() for b in blocks), "a block is partly pruned"
    assert sum(not b.any() for b in blocks) == pruned_block_count(len(blocks), sparsity)
    assert len(blocks) == block_grid((out, in_), (rows, cols))[0] * block_grid((out, in_), (rows, cols))[1]


def test_lowest_scoring_blocks_go_first():
    scores = np.array([[5.0, 1.0, 3.0], [0.5, 4.0, 2.0]])
    keep = layer_mask(scores, BlockSpec(1, 1, 0.5))  # 1x1 blocks: each weight's score is its magnitude
    assert keep.tolist() == [[True, False, True], [False, True, False]]


def test_ragged_edge_block_is_scored_per_weight():
    """A 2x2 weight matrix of equal values in 4x4 blocks: the edge blocks score like full ones."""
    values = np.ones((6, 6))
    scores = block_scores(values, (4, 4), "l2")
    assert scores.shape == (2, 2)
    np.testing.assert_allclose(scores, 4.0)
    assert block_areas((6, 6), (4, 4)).tolist() == [[16, 8], [8, 4]]
    np.testing.assert_allclose(block_scores(values, (4, 4), "mean"), 1.0)


def test_ragged_edges_can_be_pruned():
    values = np.ones((5, 5))
    values[4, :] = 0.01  # the ragged last block row holds the least important weights
    mask = layer_mask(values, BlockSpec(2, 5, 1 / 3))
    assert not mask[4].any() and mask[:4].all()


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer_block", "shared_weight", "gemm_variants"])
@pytest.mark.parametrize("block,sparsity", [((8, 8), 0.8), ((1, 1), 0.0), ((4, 1), 0.5), ((3, 5), 0.7)])
def test_masked_model_has_zeros_in_whole_blocks_of_each_canonical_view(name, block, sparsity):
    ir = importance.magnitude(lift(zoo.ALL[name]()))
    spec = BlockSpec(*block, sparsity)
    pruned = blockmask.apply_masks(blockmask.assign_blocks(ir, {n: spec for n in ir.prunable_nodes()}))
    for node in pruned.prunable_nodes():
        weight = pruned.canonical_weight(node)
        blocks = list(blocks_of(weight != 0, block))
        assert sum(not b.any() for b in blocks) == pruned_block_count(len(blocks), sparsity), node
        assert all(b.all() or not b.any() for b in blocks), node
        layer = pruned.layer(node)
        stored_mask = layer.layout.from_canonical(pruned.graph.nodes[node]["mask"])
        stored = pruned.weights[layer.weight]
        assert np.array_equal(stored != 0, stored_mask)
        original = ir.weights[layer.weight]
        assert np.array_equal(stored[stored_mask], original[stored_mask])  # kept weights are untouched
    if sparsity == 0.0:
        assert all(np.array_equal(pruned.weights[w], ir.weights[w]) for w in ir.weights)


def test_input_ir_is_not_modified_by_masking():
    ir = importance.magnitude(lift(zoo.mlp()))
    before = {w: a.copy() for w, a in ir.weights.items()}
    blockmask.apply_masks(blockmask.assign_blocks(ir, {n: BlockSpec(4, 4, 0.9) for n in ir.prunable_nodes()}))
    assert all(np.array_equal(before[w], ir.weights[w]) for w in before)
    assert all("mask" not in ir.graph.nodes[n] for n in ir.prunable_nodes())


@pytest.mark.parametrize("block", [(1, 1), (1, 4), (4, 1), (8, 8), (16, 16)])
def test_detect_block_reads_back_the_structure(block):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((48, 40)) + 5.0
    mask = layer_mask(rng.random((48, 40)), BlockSpec(*block, 0.6))
    detected = detect_block(np.where(mask, weight, 0), [(1, 1), (1, 4), (4, 1), (8, 8), (16, 16), (32, 32)])
    assert detected.shape == block
    assert detected.sparsity == pytest.approx(pruned_block_count(len(list(blocks_of(mask, block))), 0.6)
                                              / len(list(blocks_of(mask, block))))


def test_detect_block_without_zeros_is_dense():
    assert detect_block(np.ones((8, 8)), [(4, 4)]) == BlockSpec(1, 1, 0.0)


def test_detect_block_skips_blocks_larger_than_the_weight():
    weight = np.ones((32, 1))
    weight[4:8] = 0  # one 4x1 block; a 1x4 block on a single column would be a ragged 1x1
    assert detect_block(weight, [(1, 4), (4, 1)]) == BlockSpec(4, 1, 1 / 8)


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.integers(0, 4), min_size=1, max_size=40), sparsity=st.floats(0, 1))
def test_unstructured_mask_equals_a_stable_sort_with_ties(values, sparsity):
    scores = np.asarray(values, dtype=np.float64).reshape(1, -1)
    order = np.argsort(scores, axis=None, kind="stable")
    want = np.ones(scores.size, bool)
    want[order[: pruned_block_count(scores.size, sparsity)]] = False
    assert np.array_equal(layer_mask(scores, BlockSpec(1, 1, sparsity)).ravel(), want)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), ties=st.booleans(), sparsity=st.floats(0, 1),
       block=st.sampled_from([(1, 1), (2, 3), (4, 4)]))
def test_memoised_masks_equal_masks_from_fresh_scores(seed, ties, sparsity, block):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 3, (9, 10)).astype(np.float64) if ties else rng.random((9, 10))
    scores = block_scores(values, block)
    keep = np.ones(scores.size, bool)
    keep[np.argsort(scores, axis=None, kind="stable")[: pruned_block_count(scores.size, sparsity)]] = False
    want = np.repeat(np.repeat(keep.reshape(scores.shape), block[0], 0), block[1], 1)[: values.shape[0], : values.shape[1]]
    assert np.array_equal(layer_mask(values, BlockSpec(*block, sparsity)), want)
    assert np.array_equal(layer_mask(values, BlockSpec(*block, sparsity)), want)  # second call: from the memo


def test_removal_orders_are_forgotten_with_their_importance_array():
    values = np.random.default_rng(0).random((6, 6))
    first = removal_order(values, (2, 2))
    assert removal_order(values, (2, 2)) is first
    key = id(values)
    del values
    gc.collect()
    assert key not in blockmask._MEMO


@pytest.mark.parametrize("n_blocks, sparsity, removed", [
    (4, 0.95, 3),  # 3.8 rounds to all 4: a layer left without blocks outputs its bias whatever its input
    (1, 0.9, 0),
    (4, 1.0, 4),  # only a weight that is all zeros already reads as sparsity 1
    (10, 0.45, 5), (10, 1 - 0.55, 5),  # the same sparsity read back from its density rounds alike
    (20, 0.025, 1), (8, 0.05, 0),
])
def test_a_sparsity_below_one_removes_the_nearest_count_but_never_every_block(n_blocks, sparsity, removed):
    assert pruned_block_count(n_blocks, sparsity) == removed


@pytest.mark.parametrize("shape, block", [((64, 128), (32, 32)), ((10, 96), (2, 2)), ((12, 30), (4, 1))])
def test_masks_kernels_timed_and_costs_keep_the_same_block_count(shape, block):
    """The mask a plan ships, the kernel the cost model times and the blocks it predicts for agree at every sparsity."""
    from pruneaug.codegen.bsr_format import random_bsr_weight
    from pruneaug.cost_model.analytical import kept_blocks

    importance = np.random.default_rng(0).random(shape)
    for sparsity in np.arange(0.0, 1.0, 0.05):
        mask = layer_mask(importance, BlockSpec(*block, float(sparsity)))
        in_mask = int(np.count_nonzero(block_scores(mask.astype(np.float64), block, pool="max")))
        assert int(kept_blocks(*shape, block, 1.0 - sparsity)) == in_mask, sparsity
        assert random_bsr_weight(*shape, block, 1.0 - sparsity).nnz_blocks == in_mask, sparsity
        assert in_mask >= 1
