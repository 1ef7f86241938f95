"""The proxy: pruned energy shares against explicit masks, sensitivities against a direct measurement."""
from __future__ import annotations

import numpy as np
import pytest

import zoo
from pruneaug.ir.graph import lift, lower
from pruneaug.ir.layer import BlockSpec
from pruneaug.passes import blockmask, importance, ort_run
from pruneaug.passes.proxy import (PROBE_SHARES, Sensitivity, SingleLayerProbe, measure_sensitivities, probe_sparsity,
                                   proxy_loss, proxy_losses, pruned_energy_shares, refit_probe, relative_sq_error)
from pruneaug.passes.reconstruct import reconstructor

SPARSITIES = [0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.95]


@pytest.mark.parametrize("block", [(1, 1), (4, 4), (3, 5), (16, 2)])
@pytest.mark.parametrize("pool", ["l2", "max"])
@pytest.mark.parametrize("shape, ties", [((10, 13), False), ((48, 60), False), ((48, 60), True)])
def test_energy_share_is_that_of_the_mask_apply_masks_builds(block, pool, shape, ties):
    # 10x13: ragged for every block but 1x1; 48x60: whole blocks; ties: many equal scores
    rng = np.random.default_rng(1)
    importance_ = rng.integers(0, 3, shape).astype(np.float64) if ties else np.abs(rng.standard_normal(shape))
    shares = pruned_energy_shares(importance_, block, SPARSITIES, pool)
    for sparsity, share in zip(SPARSITIES, shares):
        kept = blockmask.layer_mask(importance_, BlockSpec(*block, sparsity), pool)
        assert share == pytest.approx(np.sum(importance_[~kept] ** 2) / np.sum(importance_**2), abs=1e-12)
    assert shares[0] == 0 and np.all(np.diff(shares) >= 0)


def test_all_zero_importance_has_no_share():
    assert np.all(pruned_energy_shares(np.zeros((4, 4)), (2, 2), [0.5, 0.9]) == 0)


@pytest.mark.parametrize("block", [(1, 1), (2, 3)])
def test_probe_sparsity_is_the_least_that_removes_the_share(block):
    importance_ = np.abs(np.random.default_rng(4).standard_normal((12, 10)))
    importance_[:, :6] *= 1e-30  # 60% of the weights are (near) zero already, as in a model trained with L1
    sparsity = probe_sparsity(importance_, block, 0.05)
    n_blocks = np.prod([-(-d // b) for d, b in zip(importance_.shape, block)])
    shares = pruned_energy_shares(importance_, block, [sparsity, sparsity - 1 / n_blocks])
    assert sparsity > 0.5 and shares[0] >= 0.05 > shares[1]


@pytest.fixture(scope="module")
def mlp():
    model = zoo.mlp()
    calib = zoo.random_inputs(model, batch=64, seed=2)
    return model, calib, measure_sensitivities(importance.magnitude(lift(model)), calib)


def test_sensitivity_holds_the_measured_error_at_each_probe(mlp):
    model, calib, ir = mlp
    dense = ort_run.run(model, calib)
    for node in ir.prunable_nodes():
        importance_ = ir.graph.nodes[node]["importance"]
        sensitivity = ir.graph.nodes[node]["sensitivity"]
        assert len(sensitivity.shares) == len(PROBE_SHARES)
        for target, share, measured in zip(PROBE_SHARES, sensitivity.shares, sensitivity.errors):
            sparsity = probe_sparsity(importance_, (1, 1), target)
            probe = blockmask.apply_masks(blockmask.assign_blocks(ir, {node: BlockSpec(1, 1, sparsity)}))
            outputs = ort_run.run(lower(probe), calib)
            error = sum(np.sum((o.astype(np.float64) - d) ** 2) for o, d in zip(outputs, dense)) / sum(
                np.sum(d.astype(np.float64) ** 2) for d in dense)
            assert share == pytest.approx(pruned_energy_shares(importance_, (1, 1), [sparsity])[0])
            assert measured == pytest.approx(error, rel=1e-5)
            assert relative_sq_error(dense, outputs) == pytest.approx(error, rel=1e-9)
            # the proxy at a probe point is the error measured there
            assert proxy_loss(ir, node, (1, 1), sparsity) == pytest.approx(error, rel=1e-5)


def test_sensitivity_curve_interpolates_extrapolates_and_never_decreases():
    curve = Sensitivity(shares=(0.1, 0.2, 0.4), errors=(0.01, 0.005, 0.05))
    np.testing.assert_allclose(curve(np.array([0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6])),
                               [0.0, 0.005, 0.01, 0.01, 0.01, 0.03, 0.05, 0.09])
    assert np.all(Sensitivity((), ())(np.array([0.0, 0.5])) == 0)


def test_proxy_is_monotone_in_sparsity_and_zero_when_dense(mlp):
    _, _, ir = mlp
    for node in ir.prunable_nodes():
        for block in [(1, 1), (4, 4), (8, 2)]:
            losses = proxy_losses(ir, node, block, SPARSITIES)
            assert losses[0] == 0 and np.all(np.diff(losses) >= 0) and losses[-1] > 0
            assert [proxy_loss(ir, node, block, s) for s in SPARSITIES] == pytest.approx(list(losses))


def test_summed_proxy_tracks_the_error_of_pruning_every_layer(mlp):
    """Additive by construction; this checks the sum predicts the joint error to within a small factor."""
    model, calib, ir = mlp
    dense = ort_run.run(model, calib)
    for sparsity in (0.2, 0.4):
        plan = {n: BlockSpec(4, 4, sparsity) for n in ir.prunable_nodes()}
        pruned = blockmask.apply_masks(blockmask.assign_blocks(ir, plan))
        measured = relative_sq_error(dense, ort_run.run(lower(pruned), calib))
        predicted = sum(proxy_loss(ir, n, (4, 4), sparsity) for n in ir.prunable_nodes())
        assert 1 / 3 < predicted / measured < 3, (sparsity, predicted, measured)


def test_proxy_needs_sensitivities():
    ir = importance.magnitude(lift(zoo.mlp()))
    with pytest.raises(AssertionError, match="measure_sensitivities"):
        proxy_loss(ir, ir.prunable_nodes()[0], (1, 1), 0.5)


def test_block_scale_is_the_block_probe_error_over_the_curve(mlp):
    model, calib, ir = mlp
    scaled = measure_sensitivities(ir, calib, blocks=[(1, 1), (4, 4), (512, 1)])
    dense = ort_run.run(model, calib)
    for node in ir.prunable_nodes():
        sensitivity = scaled.graph.nodes[node]["sensitivity"]
        assert set(sensitivity.block_scales) == {(4, 4)}  # 1x1 is the curve itself; 512x1 fits no layer
        importance_ = ir.graph.nodes[node]["importance"]
        sparsity = probe_sparsity(importance_, (4, 4), PROBE_SHARES[1])
        probe = blockmask.apply_masks(blockmask.assign_blocks(ir, {node: BlockSpec(4, 4, sparsity)}))
        error = relative_sq_error(dense, ort_run.run(lower(probe), calib))
        share = pruned_energy_shares(importance_, (4, 4), [sparsity])[0]
        assert sensitivity.block_scales[(4, 4)] == pytest.approx(error / sensitivity(np.array([share]))[0], rel=1e-5)
        assert proxy_loss(scaled, node, (4, 4), sparsity) == pytest.approx(error, rel=1e-5)
        assert proxy_loss(scaled, node, (8, 2), 0.5) == pytest.approx(proxy_loss(ir, node, (8, 2), 0.5))


@pytest.mark.parametrize("refit", [False, True])
def test_a_single_layer_probe_is_the_error_of_that_layer_alone_pruned_and_finished(mlp, refit):
    model, calib, ir = mlp
    finish = reconstructor(ir, calib) if refit else None
    assert (refit_probe(ir, calib, finish) is not None) == refit  # the search probes only where a re-fit follows
    probe = SingleLayerProbe(ir, calib, finish)
    assert "_session" not in vars(probe)  # no onnxruntime session until the first probe
    dense = ort_run.run(model, calib)
    node = ir.prunable_nodes()[1]
    spec = BlockSpec(4, 4, 0.7)
    pruned = blockmask.apply_masks(blockmask.assign_blocks(ir, {node: spec}))
    pruned = finish(pruned) if finish else pruned
    expected = relative_sq_error(dense, ort_run.run(lower(pruned), calib))
    assert probe(node, spec) == pytest.approx(expected, rel=1e-5)
    assert probe.losses(node, (4, 4), [0.7, 0.9]) == pytest.approx([expected, probe(node, BlockSpec(4, 4, 0.9))])
    assert probe.runs == 4
    if refit:  # the refit layer's own output changes least, and here so does the model's
        assert expected < SingleLayerProbe(ir, calib)(node, spec)
