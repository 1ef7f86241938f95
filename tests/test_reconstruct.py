"""Reconstruction: im2col against the explicit reference, the ridge fit against numpy least squares,
and the same plan more accurate on held-out data with every pruned weight still zero."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import zoo
from reference import im2col as reference_im2col
from test_importance import conv_model
from pruneaug.ir.graph import lift, lower
from pruneaug.ir.layer import BlockSpec
from pruneaug.passes import blockmask, importance, ort_run
from pruneaug.passes.activations import im2col, resolve_pads
from pruneaug.passes.reconstruct import input_grams, reconstruct, reconstructor, refit
from pruneaug.passes.validate import relerr_loss

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("kernel,attrs", [
    ((1, 1), {}),
    ((3, 3), {"pads": [1, 1, 1, 1]}),
    ((3, 3), {"strides": [2, 2], "pads": [1, 0, 0, 1]}),
    ((3, 2), {"dilations": [2, 1], "auto_pad": "SAME_UPPER"}),
    ((2, 3), {"strides": [2, 1], "auto_pad": "SAME_LOWER"}),
])
def test_im2col_matches_the_explicit_reference(kernel, attrs):
    ir = lift(conv_model(kernel, **attrs))
    conv = ir.layer(ir.prunable_nodes()[0]).conv
    x = np.random.default_rng(0).standard_normal((2, 4, 11, 9))
    expected = reference_im2col(x, conv.kernel, conv.strides, resolve_pads(conv, x.shape[2:]), conv.dilations)
    np.testing.assert_array_equal(im2col(x, conv), expected)


def test_refit_is_least_squares_on_the_kept_columns():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 12))
    dense = rng.standard_normal((6, 12))
    mask = rng.random((6, 12)) > 0.5
    mask[2] = mask[3]  # two rows sharing a mask are solved together
    fitted = refit(x.T @ x, dense, mask, ridge=0.0)
    for row in range(6):
        kept = np.flatnonzero(mask[row])
        expected, *_ = np.linalg.lstsq(x[:, kept], x @ dense[row], rcond=None)
        np.testing.assert_allclose(fitted[row, kept], expected, rtol=1e-8, atol=1e-10)
        assert np.all(fitted[row, ~mask[row]] == 0)


def test_ridge_pulls_towards_the_masked_dense_weights():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 8)) @ rng.standard_normal((8, 8))  # correlated inputs: the fit moves the weights
    dense, mask = rng.standard_normal((3, 8)), rng.random((3, 8)) > 0.4
    distances = [np.linalg.norm(refit(x.T @ x, dense, mask, ridge) - dense * mask) for ridge in (0.0, 0.1, 10.0, 1e6)]
    assert distances[0] > distances[1] > distances[2] > distances[3] and distances[3] < 1e-4


def test_grams_of_a_shared_weight_sum_its_readers():
    model = zoo.shared_weight()
    ir = lift(model)
    inputs = zoo.random_inputs(model, batch=8)
    node = ir.prunable_nodes()[0]
    tensors = [ir.graph.nodes[r]["proto"].input[0] for r in ir.layer(node).nodes]
    xs = dict(zip(tensors, ort_run.make_session(ort_run.with_outputs(model, tensors)).run(tensors, inputs)))
    expected = sum(x.astype(np.float64).T @ x for x in xs.values())
    np.testing.assert_allclose(input_grams(ir, inputs, [node])[node], expected, rtol=1e-6)


def held_out_errors(model: onnx.ModelProto, calib, held_out, plan_block: BlockSpec):
    """Relative L2 output error on held-out data of the masked model, without and with reconstruction."""
    ir = importance.magnitude(lift(model))
    pruned = blockmask.apply_masks(blockmask.assign_blocks(ir, {n: plan_block for n in ir.prunable_nodes()}))
    rebuilt = reconstruct(pruned, calib)
    for node in ir.prunable_nodes():
        mask = pruned.graph.nodes[node]["mask"]
        np.testing.assert_array_equal(rebuilt.graph.nodes[node]["mask"], mask)
        assert np.all(rebuilt.canonical_weight(node)[~mask] == 0)
    dense = ort_run.run(model, held_out)[0]
    return (relerr_loss(dense, ort_run.run(lower(pruned), held_out)[0]),
            relerr_loss(dense, ort_run.run(lower(rebuilt), held_out)[0]))


@pytest.mark.parametrize("example,block,improvement", [
    ("mlp", BlockSpec(1, 1, 0.8), 4.0),  # measured 0.58 -> 0.086
    ("mlp", BlockSpec(4, 4, 0.7), 2.5),  # 0.86 -> 0.25
    ("cnn", BlockSpec(4, 4, 0.7), 1.3),  # 0.71 -> 0.48
])
def test_reconstruction_improves_held_out_error_on_the_examples(example, block, improvement):
    model = onnx.load(EXAMPLES / example / "model.onnx")
    calib, held_out = (dict(np.load(EXAMPLES / example / f"{name}.npz")) for name in ("calib", "eval"))
    held_out.pop("labels")
    masked, rebuilt = held_out_errors(model, calib, held_out, block)
    assert rebuilt * improvement < masked, (masked, rebuilt)


@pytest.mark.parametrize("builder,improvement", [
    (zoo.cnn, 5.0),  # measured 0.55 -> 0.04: im2col columns of neighbouring pixels are strongly correlated
    (zoo.transformer_block, 1.05),  # 0.445 -> 0.409: random weights on iid inputs leave little to re-fit
])
def test_reconstruction_improves_held_out_error_on_zoo_models(builder, improvement):
    model = builder()
    calib = zoo.random_inputs(model, batch=64, seed=1)
    held_out = zoo.random_inputs(model, batch=32, seed=2)
    masked, rebuilt = held_out_errors(model, calib, held_out, BlockSpec(2, 2, 0.5))
    assert rebuilt * improvement < masked, (masked, rebuilt)


def test_nothing_masked_is_left_alone():
    ir = importance.magnitude(lift(zoo.mlp()))
    rebuilt = reconstruct(blockmask.apply_masks(ir), zoo.random_inputs(zoo.mlp()))
    for node in ir.prunable_nodes():
        np.testing.assert_array_equal(rebuilt.canonical_weight(node), ir.canonical_weight(node))


def test_reconstructor_reuses_grams_and_gives_the_same_weights():
    model = zoo.cnn()
    ir = importance.magnitude(lift(model))
    calib = zoo.random_inputs(model, batch=8)
    finish = reconstructor(ir, calib)
    for block in (BlockSpec(1, 1, 0.5), BlockSpec(4, 4, 0.7)):
        pruned = blockmask.apply_masks(blockmask.assign_blocks(ir, {n: block for n in ir.prunable_nodes()}))
        once, reused = reconstruct(pruned, calib), finish(pruned)
        for node in ir.prunable_nodes():
            np.testing.assert_allclose(reused.canonical_weight(node), once.canonical_weight(node), rtol=1e-6, atol=1e-9)
