"""--shape: the static shape each input is compiled for, and what the compile says when it takes a dynamic
axis's size from the calibration data instead."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest

import zoo
from pruneaug.compile import compile_model, main
from pruneaug.errors import OptionError
from pruneaug.options import parse_shapes
from pruneaug.runtime import load


def dynamic_tokens():
    """zoo.transformer_block (hidden 64) with its token axis dynamic: x[batch, seq, 64]."""
    model = zoo.transformer_block()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[1].dim_param = "seq"
    return model


@pytest.fixture(scope="module")
def model_and_calib(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    model = dynamic_tokens()
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(folder / "calib.npz", x=np.random.default_rng(0).standard_normal((4, 16, 64)).astype(np.float32))
    return path, folder / "calib.npz"


@pytest.mark.slow
def test_shape_compiles_the_artifact_for_another_sequence_length(model_and_calib, tmp_path):
    path, calib = model_and_calib
    result = compile_model(path, out=tmp_path / "out", calib=calib, block="8x8", sparsity=0.5,
                           shapes={"x": [2, 40, 64]})
    assert result.plan["input_shapes"] == {"x": [2, 40, 64]}
    assert not any("axis 1" in note for note in result.warnings)
    x = np.random.default_rng(1).standard_normal((2, 40, 64)).astype(np.float32)
    (got,) = load(result.artifact).run({"x": x})
    (expected,) = onnxruntime.InferenceSession(str(result.pruned_model)).run(None, {"x": x})
    assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))
    m = {layer["m"] for layer in result.plan["layers"]}
    assert m == {80}  # costed at batch x tokens of the shape asked for, not the calibration data's 16 tokens


def test_a_dynamic_axis_sized_by_the_data_is_said(model_and_calib, tmp_path, capsys):
    path, calib = model_and_calib
    assert main([str(path), "--calib", str(calib), "--block", "8x8", "--sparsity", "0.5", "--no-artifact",
                 "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"input 'x' axis 1 (seq) is 16 in the artifact, as in {calib}; --shape x=DIMS" in err
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["input_shapes"] == {"x": [1, 16, 64]}


@pytest.mark.parametrize("shape, batch, message", [
    ({"y": [1, 16, 64]}, None, r"--shape y: not an input of the model \(its inputs: x\)"),
    ({"x": [1, 16]}, None, r"--shape x=1x16: the model's input 'x' has 3 axes, not 2"),
    ({"x": [1, 16, 32]}, None, r"--shape x=1x16x32: axis 2 of the model's input 'x' is fixed at 64"),
    ({"x": [2, 16, 64]}, 4, r"--shape x=2x16x64 and --batch 4 disagree on the batch"),
])
def test_shapes_the_model_cannot_take_are_refused_before_any_work(model_and_calib, tmp_path, shape, batch, message):
    path, calib = model_and_calib
    with pytest.raises(OptionError, match=message):
        compile_model(path, out=tmp_path / "out", calib=calib, block="8x8", sparsity=0.5, shapes=shape, batch=batch)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("texts, message", [
    (["x"], r"--shape 'x': expected NAME=DIMS"),
    (["x=1x?x64"], r"--shape 'x=1x\?x64': dimensions are positive integers joined by 'x'"),
    (["x=1x0x64"], r"--shape x=1x0x64: dimensions are positive integers"),
])
def test_shape_text_errors(texts, message):
    with pytest.raises(OptionError, match=message):
        parse_shapes(texts)


def test_shape_texts_parse_per_input():
    assert parse_shapes(["ids=1x128", "mask=1X128", "a=b=2"]) == {"ids": [1, 128], "mask": [1, 128], "a=b": [2]}
    assert parse_shapes({"x": (2, 3)}) == {"x": [2, 3]} and parse_shapes(None) == {}


def test_cli_shape_error_is_one_line(model_and_calib, tmp_path, capsys):
    path, calib = model_and_calib
    assert main([str(path), "--calib", str(calib), "--block", "8x8", "--sparsity", "0.5",
                 "--shape", "x=1x16", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "pruneaug: error: --shape x=1x16: the model's input 'x' has 3 axes, not 2")
