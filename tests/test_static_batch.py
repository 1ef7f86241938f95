"""Models exported with a fixed batch dimension (torch.onnx.export without dynamic_axes): data holding any
multiple of the batch is accepted, every onnxruntime pass runs it in chunks of the batch, and the results
equal per-sample runs and those of the same model with a dynamic batch axis."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from pruneaug.calib import fixed_batch, load_dataset
from pruneaug.compile import main
from pruneaug.errors import CalibrationError
from pruneaug.ir.graph import lift, lower
from pruneaug.ir.layer import BlockSpec
from pruneaug.passes import blockmask, importance, ort_run, proxy
from pruneaug.passes.reconstruct import reconstruct
from pruneaug.passes.validate import cosine_loss, make_validator

SAMPLES = 16


def mlp(batch: int | str, features: int = 8, hidden: int = 16, classes: int = 5) -> onnx.ModelProto:
    """x[batch, features] -> MatMul -> Relu -> Gemm(transB=1) -> y[batch, classes], most 8x8 blocks of its
    weights small (so that a search finds plans within a budget)."""
    rng = np.random.default_rng(1)

    def weight(shape: tuple[int, int], name: str) -> onnx.TensorProto:
        scale = np.kron(np.where(rng.random((-(-shape[0] // 8), -(-shape[1] // 8))) < 0.3, 1.0, 0.01), np.ones((8, 8)))
        return numpy_helper.from_array((rng.standard_normal(shape) * scale[:shape[0], :shape[1]]).astype(np.float32),
                                       name)

    w1, w2 = weight((features, hidden), "w1"), weight((classes, hidden), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def cnn(batch: int | str) -> onnx.ModelProto:
    """x[batch, 3, 6, 6] -> Conv 3x3 pad 1 -> Relu -> Flatten -> MatMul -> y[batch, 4]."""
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.w")
    fc = numpy_helper.from_array(rng.standard_normal((4 * 6 * 6, 4)).astype(np.float32), "fc.w")
    nodes = [helper.make_node("Conv", ["x", "conv.w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fc.w"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], [w, fc])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def two_inputs(batch: int) -> onnx.ModelProto:
    """x[batch, 8] + z[batch, 8] -> MatMul -> y[batch, 3]."""
    w = numpy_helper.from_array(np.ones((8, 3), np.float32), "w")
    nodes = [helper.make_node("Add", ["x", "z"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["y"], name="fc")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, 8]) for n in ("x", "z")]
    graph = helper.make_graph(nodes, "two", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
                              [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


MODELS = {"mlp": mlp, "cnn": cnn}


def samples(model: onnx.ModelProto, count: int = SAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """`count` random samples of every input (the inputs' other dims are static)."""
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal((count, *[d.dim_value for d in v.type.tensor_type.shape.dim[1:]]))
            .astype(np.float32) for v in model.graph.input}


def per_sample_outputs(model: onnx.ModelProto, inputs: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """The first output, one onnxruntime run per `batch` rows, stacked: what the chunked runs must equal."""
    session = ort_run.make_session(model)
    total = len(next(iter(inputs.values())))
    return np.concatenate([session.run(None, {k: v[i:i + batch] for k, v in inputs.items()})[0]
                           for i in range(0, total, batch)])


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_fixed_batch_is_the_shared_static_first_dimension():
    assert fixed_batch(mlp(1)) == 1 and fixed_batch(cnn(2)) == 2 and fixed_batch(two_inputs(2)) == 2
    assert fixed_batch(mlp("n")) is None
    assert fixed_batch(zoo.gemm_variants()) is None  # a[32, batch]: axis 0 is features, the output's batch is dynamic
    mixed = two_inputs(2)
    mixed.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 3
    assert fixed_batch(mixed) is None


def test_an_output_exported_with_a_symbolic_batch_has_the_one_its_shape_computations_give():
    """Swin-T's logits came out of torch's export as [Gemmlogits_dim_0, 1000]: its batch is a Reshape by sizes
    computed from a Shape (here Gather, Mod, Concat), which only folding them at the inputs' shapes resolves."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["b"]),
             helper.make_node("Mod", ["b", "hundred"], ["kept"]), helper.make_node("Concat", ["kept", "minus_one"],
                                                                               ["to"], axis=0),
             helper.make_node("Reshape", ["x", "to"], ["y"])]
    constants = [numpy_helper.from_array(np.array(v, np.int64), n)
                 for n, v in (("zero", 0), ("hundred", [100]), ("minus_one", [-1]))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert fixed_batch(model) == 2
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 150  # 150 % 100: the output's 50 is no batch
    assert fixed_batch(model) is None


@pytest.mark.parametrize("name,batch", [("mlp", 1), ("mlp", 2), ("cnn", 1), ("cnn", 2)])
def test_chunked_runs_equal_per_sample_runs_and_the_dynamic_model(tmp_path, name, batch):
    model = MODELS[name](batch)
    data = load_dataset(save_npz(tmp_path / "d.npz", **samples(model)), model)
    assert ort_run.chunk_rows(model, 256) == batch
    outputs = ort_run.run(model, data.inputs)[0]
    assert outputs.shape[0] == SAMPLES
    np.testing.assert_array_equal(outputs, per_sample_outputs(model, data.inputs, batch))
    np.testing.assert_allclose(outputs, ort_run.run(MODELS[name]("n"), data.inputs)[0], rtol=1e-5, atol=1e-5)


def test_chunked_outputs_match_numpy():
    model = mlp(1)
    x = samples(model)["x"]
    w1, w2 = (numpy_helper.to_array(t) for t in model.graph.initializer)
    np.testing.assert_allclose(ort_run.run(model, {"x": x})[0], np.maximum(x @ w1, 0) @ w2.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,batch", [("mlp", 1), ("cnn", 2)])
def test_importance_reconstruction_probes_and_validation_as_with_a_dynamic_batch(name, batch):
    static, dynamic = (lift(MODELS[name](b)) for b in (batch, "n"))
    calib = samples(MODELS[name](batch))
    scored = importance.activation(static, calib)
    reference = importance.activation(dynamic, calib)
    for node in scored.prunable_nodes():
        np.testing.assert_allclose(scored.graph.nodes[node]["importance"], reference.graph.nodes[node]["importance"],
                                   rtol=1e-5)
    plan = {n: BlockSpec(1, 1, 0.5) for n in scored.prunable_nodes()}
    masked = blockmask.apply_masks(blockmask.assign_blocks(scored, plan))
    refitted = reconstruct(masked, calib)
    expected = reconstruct(blockmask.apply_masks(blockmask.assign_blocks(reference, plan)), calib)
    for node in scored.prunable_nodes():
        np.testing.assert_allclose(refitted.canonical_weight(node), expected.canonical_weight(node), rtol=1e-4,
                                   atol=1e-5)
    probed = proxy.measure_sensitivities(scored, calib)
    probed_dynamic = proxy.measure_sensitivities(reference, calib)
    for node in scored.prunable_nodes():
        np.testing.assert_allclose(probed.graph.nodes[node]["sensitivity"].errors,
                                   probed_dynamic.graph.nodes[node]["sensitivity"].errors, rtol=1e-4)
    validate = make_validator(scored, calib, metric="cosine")
    pruned_out = per_sample_outputs(lower(refitted), calib, batch)
    dense_out = per_sample_outputs(lower(scored), calib, batch)
    assert validate(refitted) == pytest.approx(cosine_loss(dense_out, pruned_out), rel=1e-6) and validate(refitted) > 0


def test_labels_rows_follow_the_samples_of_a_fixed_batch_model(tmp_path):
    model = mlp(1)
    inputs = samples(model)
    labels = np.arange(SAMPLES) % 5
    data = load_dataset(save_npz(tmp_path / "e.npz", **inputs, labels=labels), model, "--eval")
    np.testing.assert_array_equal(data.labels, labels)
    with pytest.raises(CalibrationError, match=r"'labels' has 15 rows, inputs have 16"):
        load_dataset(save_npz(tmp_path / "bad.npz", **inputs, labels=labels[:15]), model, "--eval")


def test_axis_0_no_multiple_of_the_fixed_batch_is_an_error(tmp_path):
    model = cnn(2)
    path = save_npz(tmp_path / "odd.npz", x=samples(model, count=15)["x"])
    with pytest.raises(CalibrationError) as err:
        load_dataset(path, model, "--calib")
    message = str(err.value)
    assert message.startswith(f"--calib {path}: input 'x' has 15 rows on axis 0")
    assert "fixed batch of 2" in message and "multiple of 2" in message and "dynamic batch axis" in message
    with pytest.raises(CalibrationError, match="fixed batch of 2"):
        load_dataset(save_npz(tmp_path / "empty.npz", x=np.zeros((0, 3, 6, 6), np.float32)), model)
    with pytest.raises(CalibrationError, match=r"has shape \(4, 3, 5, 6\), the model wants \(2, 3, 6, 6\)"):
        load_dataset(save_npz(tmp_path / "shape.npz", x=np.zeros((4, 3, 5, 6), np.float32)), model)


def test_inputs_must_hold_the_same_number_of_samples(tmp_path):
    model = two_inputs(2)
    x, z = np.zeros((4, 8), np.float32), np.zeros((6, 8), np.float32)
    with pytest.raises(CalibrationError, match=r"input 'z' has 6 rows on axis 0, input 'x' 4: every input needs"):
        load_dataset(save_npz(tmp_path / "d.npz", x=x, z=z), model)
    data = load_dataset(save_npz(tmp_path / "ok.npz", x=x + 1, z=z[:4] + 2), model)
    np.testing.assert_array_equal(ort_run.run(model, data.inputs)[0], np.full((4, 3), 24, np.float32))


def test_a_dynamic_model_still_needs_its_static_dims(tmp_path):
    model = mlp("n")
    with pytest.raises(CalibrationError, match=r"has shape \(3, 7\), the model wants \('n', 8\)"):
        load_dataset(save_npz(tmp_path / "d.npz", x=np.zeros((3, 7), np.float32)), model)


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--pruner", "activation", "--reconstruct"]])
def test_cli_searches_a_batch_1_model_on_16_samples(tmp_path, capsys, extra):
    model = mlp(1, features=64, hidden=128, classes=10)
    onnx.save(model, tmp_path / "model.onnx")
    calib = save_npz(tmp_path / "calib.npz", **samples(model, seed=1))
    evaluation = save_npz(tmp_path / "eval.npz", **samples(model, seed=2))
    out = tmp_path / "out"
    code, err = run_cli(capsys, tmp_path / "model.onnx", "--target", "x86", "--calib", calib, "--eval", evaluation,
                        "--budget", "0.05", "--metric", "cosine", "--measure", "none", "--no-artifact", "--out", out,
                        *extra)
    assert code == 0, err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["input_shapes"] == {"x": [1, 64]} and plan["totals"]["weight_sparsity"] > 0.2
    assert (plan["search"]["layer_probes"] > 0) == ("--reconstruct" in extra)  # re-fit losses measured, not guessed
    loss = plan["search"]["metric_loss"]
    assert 0 < loss <= 0.05
    x = samples(model, seed=2)
    measured = cosine_loss(per_sample_outputs(model, x, 1), per_sample_outputs(onnx.load(out / "pruned.onnx"), x, 1))
    assert measured == pytest.approx(loss, rel=1e-5, abs=1e-7)


def test_cli_rejects_a_non_multiple_in_one_line(tmp_path, capsys):
    model = mlp(2)
    onnx.save(model, tmp_path / "model.onnx")
    evaluation = save_npz(tmp_path / "eval.npz", x=samples(model, count=7)["x"])
    code, err = run_cli(capsys, tmp_path / "model.onnx", "--target", "x86", "--eval", evaluation, "--measure", "none",
                        "--no-artifact", "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1
    assert f"--eval {evaluation}: input 'x' has 7 rows on axis 0; the model has a fixed batch of 2" in err


def test_cli_refuses_a_batch_other_than_the_models_fixed_one(tmp_path, capsys):
    model = mlp(1)
    onnx.save(model, tmp_path / "model.onnx")
    code, err = run_cli(capsys, tmp_path / "model.onnx", "--target", "x86", "--block", "4x4", "--sparsity", "0.5",
                        "--batch", "4", "--no-artifact", "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1
    assert "--batch 4: the model's input 'x' has a fixed batch of 1; export it with a dynamic batch axis" in err
    code, err = run_cli(capsys, tmp_path / "model.onnx", "--target", "x86", "--block", "4x4", "--sparsity", "0.5",
                        "--batch", "1", "--no-artifact", "--out", tmp_path / "out")
    assert code == 0, err
