"""The bundled examples (written by tools/make_examples.py) load, run and keep their accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Test accuracy in onnxruntime that tools/make_examples.py printed when it wrote the committed files.
RECORDED_ACCURACY = {"mlp": 0.975, "cnn": 0.975, "encoder": 0.988}
MARGIN = 0.01


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _input_signature(model: onnx.ModelProto) -> dict[str, tuple[list[int | None], np.dtype]]:
    """Input name -> (shape with None for a dynamic dimension, numpy dtype)."""
    return {
        value.name: ([d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim],
                     onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        for value in model.graph.input
    }


def _matches(array: np.ndarray, shape: list[int | None], dtype: np.dtype) -> bool:
    return array.dtype == dtype and len(array.shape) == len(shape) and all(
        want is None or got == want for got, want in zip(array.shape, shape))


@pytest.mark.parametrize("name", sorted(RECORDED_ACCURACY))
def test_example_keeps_its_accuracy(name: str) -> None:
    model = onnx.load(EXAMPLES / name / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    data = _load_npz(EXAMPLES / name / "eval.npz")
    labels = data.pop("labels")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, data)
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    assert accuracy >= RECORDED_ACCURACY[name] - MARGIN


@pytest.mark.parametrize("name", sorted(RECORDED_ACCURACY))
def test_npz_files_fit_the_model_inputs(name: str) -> None:
    signature = _input_signature(onnx.load(EXAMPLES / name / "model.onnx"))
    assert [shape[0] for shape, _ in signature.values()] == [None] * len(signature)  # dynamic batch
    calib = _load_npz(EXAMPLES / name / "calib.npz")
    evaluation = _load_npz(EXAMPLES / name / "eval.npz")
    labels = evaluation.pop("labels")
    for arrays in (calib, evaluation):
        assert set(arrays) == set(signature)
        assert all(_matches(arrays[key], *signature[key]) for key in signature)
    assert 100 <= len(next(iter(calib.values()))) <= 1000
    assert labels.dtype == np.int64 and labels.shape == (len(next(iter(evaluation.values()))),)
    classes = onnx.load(EXAMPLES / name / "model.onnx").graph.output[0].type.tensor_type.shape.dim[1].dim_value
    assert set(np.unique(labels)) == set(range(classes))


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_mlp_has_matmul_and_both_gemm_layouts() -> None:
    nodes = onnx.load(EXAMPLES / "mlp" / "model.onnx").graph.node
    assert any(n.op_type == "MatMul" for n in nodes)
    assert {_attributes(n).get("transB", 0) for n in nodes if n.op_type == "Gemm"} == {0, 1}


def test_cnn_has_pointwise_dense_and_depthwise_convs() -> None:
    graph = onnx.load(EXAMPLES / "cnn" / "model.onnx").graph
    weights = {init.name: init.dims for init in graph.initializer}
    convs = {(tuple(_attributes(n)["kernel_shape"]), _attributes(n)["group"] == weights[n.input[1]][0])
             for n in graph.node if n.op_type == "Conv"}
    assert convs >= {((1, 1), False), ((3, 3), False), ((3, 3), True)}
    assert any(n.op_type == "Gemm" for n in graph.node)


def test_encoder_is_a_transformer_with_attention_gelu_and_layer_norm() -> None:
    ops = {n.op_type for n in onnx.load(EXAMPLES / "encoder" / "model.onnx").graph.node}
    assert {"MatMul", "Softmax", "Erf", "LayerNormalization", "ReduceMean", "Gemm"} <= ops


def test_examples_stay_small() -> None:
    assert sum(f.stat().st_size for f in EXAMPLES.rglob("*") if f.is_file()) < 4 * 1024 * 1024


def test_a_wider_encoder_is_trained_and_written_with_the_widths_asked(tmp_path, monkeypatch) -> None:
    """tools/make_examples.py --hidden/--ffn (for benchmarks on an encoder wider than the bundled one): the
    written graph has those widths and computes what the trained torch model does (the script checks it)."""
    pytest.importorskip("torch")  # the `train` extra
    from tool_module import TOOLS, load_tool

    monkeypatch.syspath_prepend(str(TOOLS))  # (make_examples imports encoder_graph beside it)
    make_examples = load_tool("make_examples")
    accuracy = make_examples.make_encoder(tmp_path, train_samples=64, eval_samples=32, epochs=1, hidden=32, ffn=48)
    assert 0.0 <= accuracy <= 1.0
    weights = {t.name: list(t.dims) for t in onnx.load(tmp_path / "encoder" / "model.onnx").graph.initializer}
    assert weights["layer0.ffn1.weight"] == [32, 48] and weights["layer0.ffn2.weight"] == [48, 32]
