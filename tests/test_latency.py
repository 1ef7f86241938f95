"""The cost model as the search sees it: one prediction per distinct point, annotations on the IR."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import zoo
from pruneaug.codegen.schedule import DENSE_BLOCK, WIDE_DENSE_BLOCK
from pruneaug.cost_model.model import DEFAULT_DENSITIES
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

    def dense_options(self, out, in_, m):
        return {DENSE_BLOCK: self.predict(out, in_, m, DENSE_BLOCK, 0.0)}


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

        def fill(self, shapes, blocks, densities, convs):
            assert densities == DEFAULT_DENSITIES  # the search's grid
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


class DenseChoiceCosts(CountingCosts):
    """The dense kernel in 32x16 blocks takes `wide_share[m]` of the default's time at `m` rows."""

    def __init__(self, wide_share):
        super().__init__()
        self.wide_share = wide_share

    def dense_options(self, out, in_, m):
        default = self.predict(out, in_, m, DENSE_BLOCK, 0.0)
        wide = SimpleNamespace(seconds=default.seconds * self.wide_share[m], source="measured")
        return {DENSE_BLOCK: default, WIDE_DENSE_BLOCK: wide}


def test_a_shared_weight_runs_one_dense_kernel_the_faster_for_its_readers_together():
    ir = lift(zoo.aliased_weight(), {"x": [2, 16], "z": [2, 3, 16]})
    [node] = ir.prunable_nodes()
    layer = ir.layer(node)  # read with m = 2 and m = 6: dense times 256 and 768 (x 1e-9)
    # faster at m = 2 alone: 0.5 * 256 + 1.5 * 768 over 256 + 768 is slower together
    block, prediction = latency.dense_kernel(DenseChoiceCosts({2: 0.5, 6: 1.5}), layer)
    assert block == DENSE_BLOCK and prediction.seconds == pytest.approx(1024e-9)
    block, prediction = latency.dense_kernel(DenseChoiceCosts({2: 1.5, 6: 0.5}), layer)
    assert block == WIDE_DENSE_BLOCK and prediction.seconds == pytest.approx(1.5 * 256e-9 + 0.5 * 768e-9)
    assert latency.predict_layer(DenseChoiceCosts({2: 1.5, 6: 0.5}), layer, (4, 4), 0.0) == prediction


def test_dense_layers_in_another_block_shape_are_built_in_it_and_the_rest_as_before():
    """`annotate` records each layer's dense kernel; `deploy.sparse_weights` hands codegen the pruned layers'
    blocks and the dense layers' 32x16 where that is their kernel (the default dense kernel needs no entry)."""
    from pruneaug import deploy

    ir = importance.magnitude(lift(zoo.mlp(), {"x": [4, 64]}))
    nodes = ir.prunable_nodes()
    specs = {n: BlockSpec(4, 4, 0.75 if n == nodes[0] else 0.0) for n in nodes}
    ir = blockmask.apply_masks(blockmask.assign_blocks(ir, specs))
    annotated = latency.annotate(ir, DenseChoiceCosts({4: 0.5}))
    assert all(annotated.graph.nodes[n]["dense_block"] == WIDE_DENSE_BLOCK for n in nodes)
    assert all(annotated.graph.nodes[n]["dense_latency_s"] == pytest.approx(0.5 * np.prod(annotated.layer(n).shape)
                                                                             * 4e-9) for n in nodes)
    weights = [annotated.layer(n).weight for n in nodes]
    assert deploy.sparse_weights(annotated) == {weights[0]: (4, 4), **{w: WIDE_DENSE_BLOCK for w in weights[1:]}}
    default = latency.annotate(ir, DenseChoiceCosts({4: 1.0}))
    assert deploy.sparse_weights(default) == {weights[0]: (4, 4)}
    assert deploy.sparse_weights(ir) == {weights[0]: (4, 4)}  # not annotated: the default dense kernel


def test_a_given_plans_kernels_are_timed_and_pick_between_block_sparse_and_dense(tmp_path):
    """Each layer's dense kernel in each block shape, and a pruned layer's block-sparse kernel at its own block and
    density: `annotate` then runs a pruned layer dense exactly where its block-sparse kernel measured slower."""
    from pruneaug.cost_model import CostModel
    from pruneaug.cost_model.cache import DENSE_BLOCK as DENSE_KEY
    from pruneaug.cost_model.cache import LatencyCache
    from pruneaug.cost_model.targets import resolve_target

    class Runner:
        device = "fake"

        def __init__(self):
            self.calls = []

        def time_layer(self, out, in_, m, block, density):
            self.calls.append((out, in_, m, tuple(block), round(density, 6)))
            if tuple(block) in (DENSE_KEY, WIDE_DENSE_BLOCK):
                return 1e-6 if tuple(block) == WIDE_DENSE_BLOCK else 2e-6
            return 0.5e-6 if tuple(block) == (16, 1) else 3e-6  # fc2's kernel beats dense, fc3's does not

    target = resolve_target("x86")
    costs = CostModel(target, cache=LatencyCache(tmp_path / "c.sqlite"))
    costs.runner = Runner()
    plan = {"fc1": BlockSpec(1, 1, 0.0), "fc2/Gemm": BlockSpec(16, 1, 0.7), "y": BlockSpec(1, 4, 0.5)}
    ir = lift(zoo.mlp(), {"x": [4, 64]})
    ir = blockmask.apply_masks(blockmask.assign_blocks(importance.magnitude(ir), {
        node: next(spec for name, spec in plan.items() if name in node) for node in ir.prunable_nodes()}))
    shapes = {node: (*ir.layer(node).shape, 4) for node in ir.prunable_nodes()}
    assert latency.measure_plan_kernels(costs, target, ir) == 2 * len(shapes) + 2
    dense_calls = [(*shape, block, 1.0) for shape in shapes.values() for block in (DENSE_KEY, WIDE_DENSE_BLOCK)]
    sparse_calls = [(*shapes[node], spec.shape, round(1 - spec.sparsity, 6)) for node in ir.prunable_nodes()
                    for spec in [ir.graph.nodes[node]["block"]] if spec.sparsity > 0]
    assert sorted(costs.runner.calls) == sorted(dense_calls + sparse_calls)
    given = latency.annotate(ir, costs, dense_where_faster=True).graph.nodes
    runs = {node: (given[node]["kernel"], given[node]["predicted_latency_s"], given[node]["latency_source"])
            for node in ir.prunable_nodes()}
    assert sorted(runs.values()) == [("block-sparse", 0.5e-6, "measured"), ("dense", 1e-6, "measured"),
                                     ("dense", 1e-6, "measured")]
    assert latency.measure_plan_kernels(costs, target, ir) == 0  # cached
    costs.runner = None
    assert latency.measure_plan_kernels(costs, target, ir) == 0  # predicting only: nothing to time with
