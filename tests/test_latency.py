"""The cost model as the search sees it: one prediction per distinct point, annotations on the IR."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import zoo
from pruneaug.ir.graph import lift
from pruneaug.ir.layer import BlockSpec
from pruneaug.passes import blockmask, importance, latency


class CountingCosts:
    """Predicts `out * in * m * density * 1e-9` seconds and counts its calls."""

    def __init__(self):
        self.calls = 0

    def predict(self, out, in_, m, block, sparsity):
        self.calls += 1
        return SimpleNamespace(seconds=out * in_ * m * (1 - sparsity) * 1e-9, source="analytical")


def test_layer_latency_asks_once_per_distinct_point():
    costs = CountingCosts()
    fn = latency.layer_latency(costs)
    ir = lift(zoo.transformer_block(), {"x": [2, 16, 64]})
    layers = ir.layers()
    same_shape = [layer for layer in layers if layer.shape == layers[0].shape]
    assert len(same_shape) > 1  # Q, K, V (and out) share a shape
    for _ in range(3):
        for layer in same_shape:
            assert fn(layer, (8, 8), 0.5) == pytest.approx(layer.shape[0] * layer.shape[1] * 32 * 0.5e-9)
    assert costs.calls == 1


def test_annotate_writes_dense_and_chosen_latency():
    ir = importance.magnitude(lift(zoo.mlp(), {"x": [4, 64]}))
    ir = blockmask.apply_masks(blockmask.assign_blocks(ir, {n: BlockSpec(4, 4, 0.75) for n in ir.prunable_nodes()}))
    annotated = latency.annotate(ir, CountingCosts())
    for node in annotated.prunable_nodes():
        data = annotated.graph.nodes[node]
        out, in_ = annotated.layer(node).shape
        assert data["dense_latency_s"] == pytest.approx(out * in_ * 4e-9)
        assert data["predicted_latency_s"] == pytest.approx(out * in_ * 4 * 0.25e-9)
        assert data["latency_source"] == "analytical"



def test_a_weight_read_through_an_identity_is_one_layer_costed_once_per_reader():
    ir = lift(zoo.aliased_weight(), {"x": [2, 16], "z": [2, 3, 16]})
    [node] = ir.prunable_nodes()
    layer = ir.layer(node)
    assert layer.nodes == ("a", "b") and [read.m for read in layer.reads()] == [2, 6]
    costs = CountingCosts()
    assert latency.layer_latency(costs)(layer, (4, 4), 0.5) == pytest.approx(8 * 16 * (2 + 6) * 0.5e-9)
    assert latency.measured_shapes([layer])[0] == {(8, 16, 2), (8, 16, 6)}


def test_a_search_times_its_layers_kernels_only_where_the_cost_model_measures():
    from pruneaug.cost_model.targets import resolve_target

    ir = lift(zoo.transformer_block(), {"x": [2, 16, 64]})
    filled = []

    class Measuring:
        runner = object()

        def fill(self, shapes, blocks, convs):
            filled.append((shapes, blocks, convs))
            return 7

    profile = resolve_target("x86")
    blocks = [(1, 1), (16, 16), (512, 512)]
    assert latency.measure_search_kernels(SimpleNamespace(runner=None), profile, ir.layers(), blocks) == 0
    assert not filled  # a cost model that only predicts times nothing
    assert latency.measure_search_kernels(Measuring(), profile, ir.layers(), blocks) == 7
    [(shapes, served, convs)] = filled
    assert (shapes, convs) == latency.measured_shapes(ir.layers())
    assert served == [b for b in blocks if latency.target_serves(profile, b)]


@pytest.mark.parametrize("sparsity, kernel, block_sparse", [
    (0.0, None, False), (0.5, None, True), (0.5, "block-sparse", True), (0.5, "dense", False),
])
def test_a_layer_runs_block_sparse_where_pruned_unless_annotated_to_run_dense(sparsity, kernel, block_sparse):
    data = {"block": BlockSpec(4, 4, sparsity), **({"kernel": kernel} if kernel else {})}
    assert latency.runs_block_sparse(data) == block_sparse
