"""Sensitivities kept across compiles: recalled only for the same model, data and settings."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import zoo
from pruneaug.cost_model.cache import LatencyCache
from pruneaug.ir.graph import lift
from pruneaug.passes import importance, proxy, search, sensitivity_store
from pruneaug.passes.sensitivity_store import RECORD_KIND, digest, sensitivities


@pytest.fixture()
def setting(tmp_path):
    model = zoo.mlp()
    calib = zoo.random_inputs(model, batch=32, seed=3)
    cache = LatencyCache(tmp_path / "cache.sqlite", tvm_version="test", kernel_version="test")
    return importance.magnitude(lift(model)), calib, cache


def probes_forbidden(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the probes ran again")
    monkeypatch.setattr(proxy, "measure_sensitivities", fail)


def test_a_second_compile_recalls_the_same_sensitivities_without_probing(setting, monkeypatch):
    ir, calib, cache = setting
    measured, recalled = sensitivities(ir, calib, cache)
    assert not recalled
    probes_forbidden(monkeypatch)
    again, recalled = sensitivities(ir, calib, cache)
    assert recalled
    for node in ir.prunable_nodes():
        assert again.graph.nodes[node]["sensitivity"] == measured.graph.nodes[node]["sensitivity"]
        assert "sensitivity" not in ir.graph.nodes[node]  # the input IR is left alone


def test_block_scales_survive_the_round_trip(setting):
    ir, calib, cache = setting
    measured, _ = sensitivities(ir, calib, cache, blocks=[(4, 4)])
    again, recalled = sensitivities(ir, calib, cache, blocks=[(4, 4)])
    node = ir.prunable_nodes()[0]
    assert recalled and (4, 4) in again.graph.nodes[node]["sensitivity"].block_scales
    assert again.graph.nodes[node]["sensitivity"] == measured.graph.nodes[node]["sensitivity"]


def test_other_data_weights_importance_or_settings_change_the_digest(setting):
    ir, calib, _ = setting
    base = digest(ir, calib, {"pool": "l2"})
    other_calib = {name: array + 1 for name, array in calib.items()}
    changed_weight = ir.copy()
    node = ir.prunable_nodes()[0]
    changed_weight.set_canonical_weight(node, ir.canonical_weight(node) * 2)
    rescored = ir.copy()
    rescored.graph.nodes[node]["importance"] = ir.graph.nodes[node]["importance"] + 1
    digests = {base, digest(ir, other_calib, {"pool": "l2"}), digest(changed_weight, calib, {"pool": "l2"}),
               digest(rescored, calib, {"pool": "l2"}), digest(ir, calib, {"pool": "max"})}
    assert len(digests) == 5
    assert digest(ir, calib, {"pool": "l2"}) == base


def test_other_calibration_data_is_probed_again(setting):
    ir, calib, cache = setting
    sensitivities(ir, calib, cache)
    _, recalled = sensitivities(ir, {name: array[:16] for name, array in calib.items()}, cache)
    assert not recalled


@pytest.mark.parametrize("damage", ["not json", '{"some/node": {}}', '{"x": 1}'])
def test_a_damaged_record_is_measured_again_and_replaced(setting, damage):
    ir, calib, cache = setting
    measured, _ = sensitivities(ir, calib, cache)
    key = digest(ir, calib, {"probe_shares": list(proxy.PROBE_SHARES), "probe_block": list(proxy.PROBE_BLOCK),
                             "blocks": [], "pool": "l2"})
    assert cache.get_record(RECORD_KIND, key) is not None
    cache.put_record(RECORD_KIND, key, damage)
    again, recalled = sensitivities(ir, calib, cache)
    assert not recalled
    assert sensitivity_store.sensitivities(ir, calib, cache)[1]
    node = ir.prunable_nodes()[0]
    assert np.allclose(again.graph.nodes[node]["sensitivity"].errors, measured.graph.nodes[node]["sensitivity"].errors)


def test_energy_shares_are_recalled_for_the_same_importance_blocks_and_grid(setting, monkeypatch):
    ir, _, cache = setting
    nodes = ir.prunable_nodes()
    blocks = {node: [(1, 1), (4, 4)] for node in nodes}
    grid = [0.25, 0.5, 0.75]
    shares = sensitivity_store.cached_shares(cache)
    computed = shares(ir, blocks, grid, "l2")
    for node in nodes:  # what the proxy computes for each layer and block, not a copy of something else
        for row, block in zip(computed[node], blocks[node]):
            assert np.array_equal(row, proxy.pruned_energy_shares(ir.graph.nodes[node]["importance"], block, grid))
            assert np.all(np.diff(row) > 0) and 0 < row[0] and row[-1] < 1

    calls = []
    table = proxy.energy_share_table
    monkeypatch.setattr(proxy, "energy_share_table", lambda *args: calls.append(args) or table(*args))
    recalled = sensitivity_store.cached_shares(cache)(ir, blocks, grid, "l2")
    assert not calls and all(np.array_equal(a, b) for n in nodes for a, b in zip(recalled[n], computed[n]))

    rescored = ir.copy()  # another importance, another grid or other blocks: partitioned again
    rescored.graph.nodes[nodes[0]]["importance"] = ir.graph.nodes[nodes[0]]["importance"] + 1
    for args in ((rescored, blocks, grid), (ir, blocks, [0.25, 0.5]), (ir, {n: [(4, 4)] for n in nodes}, grid)):
        again = shares(*args, "l2")
        assert len(calls) == 1 and len(again[nodes[0]]) == len(args[1][nodes[0]])
        calls.clear()

    cache._execute("UPDATE records SET value='{damaged' WHERE kind=?", (sensitivity_store.SHARES_KIND,))
    assert all(np.array_equal(a, b) for n in nodes for a, b in zip(shares(ir, blocks, grid, "l2")[n], computed[n]))
    assert len(calls) == 1


def _changed(ir, initializer: str):
    """The same model with one initializer doubled, scored again."""
    model = onnx.ModelProto()
    model.CopyFrom(ir.source)
    tensor = next(t for t in model.graph.initializer if t.name == initializer)
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 2, tensor.name))
    return importance.magnitude(lift(model))


def _plan(ir, sparsity: float) -> dict:
    return {node: search.Option((4, 4), sparsity, 1e-6, 0.01) for node in ir.prunable_nodes()}


def test_a_validated_loss_is_recalled_only_for_the_same_plan_model_data_metric_and_reconstruction(setting):
    ir, calib, cache = setting
    eval_inputs, labels = zoo.random_inputs(ir.source, batch=8, seed=4), np.arange(8) % 3
    key = sensitivity_store.model_digest(ir)
    memo = sensitivity_store.validation_memo(cache, key, eval_inputs, labels, "top1")
    assert memo.recall(_plan(ir, 0.5)) is None
    memo.remember(_plan(ir, 0.5), 0.0123456789)
    same = sensitivity_store.validation_memo(cache, key, eval_inputs, labels, "top1")
    assert same.recall(_plan(ir, 0.5)) == 0.0123456789 and same.recall(_plan(ir, 0.6)) is None
    others = {
        "metric": sensitivity_store.validation_memo(cache, key, eval_inputs, labels, "cosine"),
        "labels": sensitivity_store.validation_memo(cache, key, eval_inputs, None, "top1"),
        "eval data": sensitivity_store.validation_memo(cache, key, {k: v + 1 for k, v in eval_inputs.items()}, labels,
                                                       "top1"),
        "reconstruction": sensitivity_store.validation_memo(cache, key, eval_inputs, labels, "top1",
                                                            reconstructed_on=calib),
    }
    bias = next(t.name for t in ir.source.graph.initializer if t.name not in ir.weights)  # not pruned, still read
    for changed in (next(iter(ir.weights)), bias):
        others[changed] = sensitivity_store.validation_memo(cache, sensitivity_store.model_digest(_changed(ir, changed)),
                                                            eval_inputs, labels, "top1")
    assert {name: other.recall(_plan(ir, 0.5)) for name, other in others.items()} == dict.fromkeys(others)


def test_a_damaged_validation_record_is_validated_again(setting):
    ir, _, cache = setting
    memo = sensitivity_store.validation_memo(cache, "model", {}, None, "cosine")
    memo.remember(_plan(ir, 0.5), 0.25)
    for key, in cache._execute("SELECT key FROM records WHERE kind=?", (sensitivity_store.VALIDATION_KIND,)):
        cache.put_record(sensitivity_store.VALIDATION_KIND, key, "not a loss")
    assert memo.recall(_plan(ir, 0.5)) is None


def test_a_layer_probe_is_measured_once_per_model_and_calibration_data(setting):
    ir, calib, cache = setting
    key = sensitivity_store.model_digest(ir)
    node = ir.prunable_nodes()[0]
    calls = []

    def probe(name, block, sparsities):
        calls.append((name, block, *sparsities))
        return [0.25 * s for s in sparsities]

    stored = sensitivity_store.stored_probe(cache, key, calib, probe)
    assert stored(node, (4, 4), [0.5, 0.75]) == [0.125, 0.1875] and len(calls) == 2
    again = sensitivity_store.stored_probe(cache, key, calib, probe)
    assert again(node, (4, 4), [0.75, 0.5, 0.25]) == [0.1875, 0.125, 0.0625]
    assert calls[2:] == [(node, (4, 4), 0.25)]  # only the new one was measured
    sensitivity_store.stored_probe(cache, key, {k: v + 1 for k, v in calib.items()}, probe)(node, (4, 4), [0.5])
    sensitivity_store.stored_probe(cache, "another model", calib, probe)(node, (4, 4), [0.5])
    again(node, (8, 8), [0.5])
    assert calls[3:] == [(node, (4, 4), 0.5)] * 2 + [(node, (8, 8), 0.5)]
