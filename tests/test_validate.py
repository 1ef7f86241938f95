"""Validation metrics against numpy, and the Validator against onnxruntime runs of the same models."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

import zoo
from pruneaug.compile import main
from pruneaug.errors import CalibrationError, OptionError
from pruneaug.ir.graph import lift, lower
from pruneaug.ir.layer import BlockSpec
from pruneaug.passes import blockmask, importance, ort_run
from pruneaug.passes.validate import cosine_loss, make_validator, relerr_loss, top1_loss

RNG = np.random.default_rng(0)
DENSE = RNG.standard_normal((50, 7))
PRUNED = DENSE + 0.5 * RNG.standard_normal((50, 7))
LABELS = RNG.integers(0, 7, 50)


def test_top1_with_labels_is_the_accuracy_drop():
    dense_acc = np.mean([np.argmax(row) == label for row, label in zip(DENSE, LABELS)])
    pruned_acc = np.mean([np.argmax(row) == label for row, label in zip(PRUNED, LABELS)])
    assert top1_loss(DENSE, PRUNED, LABELS) == pytest.approx(dense_acc - pruned_acc)


def test_top1_without_labels_is_disagreement_with_dense():
    agree = np.mean(np.argmax(DENSE, axis=1) == np.argmax(PRUNED, axis=1))
    assert top1_loss(DENSE, PRUNED, None) == pytest.approx(1 - agree)
    assert top1_loss(DENSE, DENSE, None) == 0


def test_cosine_and_relerr_against_numpy():
    cosines = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(DENSE, PRUNED)]
    assert cosine_loss(DENSE, PRUNED) == pytest.approx(1 - np.mean(cosines))
    assert relerr_loss(DENSE, PRUNED) == pytest.approx(np.linalg.norm(PRUNED - DENSE) / np.linalg.norm(DENSE))
    assert cosine_loss(DENSE, DENSE) == pytest.approx(0, abs=1e-12)
    assert cosine_loss(np.zeros((2, 3)), np.zeros((2, 3))) == 0


@pytest.fixture(scope="module")
def mlp():
    ir = importance.magnitude(lift(zoo.mlp()))
    pruned = blockmask.apply_masks(blockmask.assign_blocks(ir, {n: BlockSpec(4, 4, 0.6) for n in ir.prunable_nodes()}))
    return ir, pruned, zoo.random_inputs(zoo.mlp(), batch=40, seed=1)


@pytest.mark.parametrize("metric", ["top1", "cosine", "relerr"])
def test_validator_matches_onnxruntime_outputs(mlp, metric):
    ir, pruned, inputs = mlp
    dense_out = ort_run.run(lower(ir), inputs)[0]
    pruned_out = ort_run.run(lower(pruned), inputs)[0]
    labels = np.argmax(dense_out, axis=1)[::-1].copy() if metric == "top1" else None
    validate = make_validator(ir, inputs, labels, metric)
    expected = {"top1": top1_loss(dense_out, pruned_out, labels), "cosine": cosine_loss(dense_out, pruned_out),
                "relerr": relerr_loss(dense_out, pruned_out)}[metric]
    assert validate(pruned) == pytest.approx(expected, rel=1e-6)
    assert validate(ir) == pytest.approx(0, abs=1e-7)
    assert validate(pruned) > 0 or metric == "top1"


def test_note_says_top1_without_labels_is_agreement(mlp):
    ir, _, inputs = mlp
    assert "dense model's argmax" in make_validator(ir, inputs, None, "top1").note
    assert make_validator(ir, inputs, np.zeros(40, np.int64), "top1").note == ""


def test_unknown_metric_is_an_option_error(mlp):
    ir, _, inputs = mlp
    with pytest.raises(OptionError, match="--metric 'top5'"):
        make_validator(ir, inputs, None, "top5")


def test_cosine_and_relerr_take_the_worst_output():
    model = zoo.multi_output()
    ir = importance.magnitude(lift(model))
    inputs = zoo.random_inputs(model, batch=16)
    pruned = blockmask.apply_masks(blockmask.assign_blocks(ir, {ir.prunable_nodes()[-1]: BlockSpec(1, 1, 0.5)}))
    dense_outs, pruned_outs = ort_run.run(lower(ir), inputs), ort_run.run(lower(pruned), inputs)
    expected = max(relerr_loss(d, p) for d, p in zip(dense_outs, pruned_outs))
    assert make_validator(ir, inputs, metric="relerr")(pruned) == pytest.approx(expected, rel=1e-6)


def test_cosine_counts_an_output_pruned_to_zero_as_dissimilar():
    zeroed = PRUNED.copy()
    zeroed[:10] = 0
    cosines = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(DENSE[10:], PRUNED[10:])]
    assert cosine_loss(DENSE, zeroed) == pytest.approx(1 - np.sum(cosines) / 50)
    assert cosine_loss(DENSE, np.zeros_like(DENSE)) == 1.0


def dense_predictions(ir, inputs) -> np.ndarray:
    return np.argmax(ort_run.run(lower(ir), inputs)[0], axis=1)


@pytest.mark.parametrize("bad,shown", [(10, "10"), (-1, "-1"), (2.5, "2.5"), (np.nan, "nan")])
def test_labels_outside_the_classes_are_an_error_naming_file_value_and_classes(mlp, bad, shown):
    ir, _, inputs = mlp
    labels = dense_predictions(ir, inputs).astype(np.float64 if isinstance(bad, float) else np.int64)
    labels[7] = bad
    with pytest.raises(CalibrationError) as err:
        make_validator(ir, inputs, labels, "top1", labels_file="data/eval.npz")
    assert str(err.value).startswith(f"data/eval.npz: 'labels' holds {shown}, not a class of the model's output")
    assert "10 classes" in str(err.value) and "[0, 9]" in str(err.value)
    make_validator(ir, inputs, labels, "cosine")  # labels are not read by the other metrics


def test_labels_of_another_shape_are_an_error(mlp):
    ir, _, inputs = mlp
    with pytest.raises(CalibrationError, match=r"eval.npz: 'labels' has shape \(40, 3\): the model's output \(40, "):
        make_validator(ir, inputs, np.zeros((40, 3), np.int64), "top1", labels_file="eval.npz")


def test_whole_float_and_one_hot_labels_score_as_class_indices(mlp):
    ir, pruned, inputs = mlp
    labels = dense_predictions(ir, inputs)
    labels[::3] = (labels[::3] + 1) % 10  # some wrong, so that the accuracies are not 1
    expected = make_validator(ir, inputs, labels, "top1")(pruned)
    assert expected != 0
    assert make_validator(ir, inputs, labels.astype(np.float32), "top1")(pruned) == expected
    assert make_validator(ir, inputs, np.eye(10, dtype=np.float32)[labels], "top1")(pruned) == expected


def test_a_dense_accuracy_no_better_than_chance_warns_naming_the_file(mlp):
    ir, _, inputs = mlp
    predictions = dense_predictions(ir, inputs)
    with pytest.warns(UserWarning, match=r"eval.npz: 'labels': the dense model's own top1 accuracy on them is 0\.000, "
                                         r"no better than chance \(1/10\)"):
        make_validator(ir, inputs, (predictions + 1) % 10, "top1", labels_file="eval.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_validator(ir, inputs, predictions, "top1", labels_file="eval.npz")


def test_cli_refuses_labels_outside_the_classes_in_one_line(tmp_path, capsys):
    model = zoo.mlp()
    onnx.save(model, tmp_path / "model.onnx")
    inputs = zoo.random_inputs(model, batch=12, seed=3)
    np.savez(tmp_path / "eval.npz", **inputs, labels=np.arange(12))  # 10 and 11: the model has 10 classes
    code = main([str(tmp_path / "model.onnx"), "--target", "x86", "--eval", str(tmp_path / "eval.npz"),
                 "--measure", "none", "--no-artifact", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{tmp_path / 'eval.npz'}: 'labels' holds 10, not a class of the model's output: its last axis has 10 classes" in err
    assert not (tmp_path / "out").exists()
