"""The compile CLI and Python API on the fixed-plan path: outputs, --keep-sparsity, and every bad input."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pruneaug
import zoo
from pruneaug.compile import main
from pruneaug.errors import OptionError
from pruneaug.ir.graph import lift
from pruneaug.passes import ort_run
from pruneaug.passes.blockmask import block_grid


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_cli(capsys, *argv, artifact: bool = False) -> tuple[int, str, str]:
    """The CLI in-process; without `artifact` it skips the TVM compile (tests of it live in test_compile_artifact.py)."""
    code = main([str(a) for a in argv] + ([] if artifact else ["--no-artifact"]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer_block", "shared_weight", "with_subgraph", "multi_output"])
def test_fixed_plan_writes_consistent_outputs(tmp_path, capsys, name):
    model = zoo.ALL[name]()
    source = save(model, tmp_path / "model.onnx")
    before = digest(tmp_path)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, source, "--target", "x86", "--block", "8x8", "--sparsity", "0.8", "--out", out)
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == {"pruned.onnx", "masks.npz", "plan.json", "report.md", "report.html"}
    plan = json.loads((out / "plan.json").read_text())
    pruned = onnx.load(out / "pruned.onnx")
    onnx.checker.check_model(pruned, full_check=True)
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    ir = lift(pruned)
    with np.load(out / "masks.npz", allow_pickle=False) as masks:
        assert set(masks.files) == {entry["weight"] for entry in plan["layers"]}
        for entry in plan["layers"]:
            mask = masks[entry["weight"]]
            assert mask.shape == weights[entry["weight"]].shape
            assert np.array_equal(weights[entry["weight"]] != 0, mask)
            grid = block_grid(tuple(entry["shape"]), (8, 8))
            assert entry["blocks"] == grid[0] * grid[1]
            assert entry["nnz_blocks"] == entry["blocks"] - min(int(np.floor(0.8 * entry["blocks"] + 0.5)), entry["blocks"] - 1)
            assert entry["block"] == [8, 8] and entry["sparsity"] == 0.8
            canonical = ir.canonical_weight(entry["node"])
            assert canonical.shape == tuple(entry["shape"])
    assert plan["schema"] == 1 and plan["target"] == "x86"
    assert plan["versions"]["onnx"] == onnx.__version__
    inputs = zoo.random_inputs(model)
    outputs = ort_run.make_session(pruned).run(None, inputs)
    assert [o.shape for o in outputs] == [o.shape for o in ort_run.make_session(model).run(None, inputs)]
    assert digest(tmp_path) == before  # the input is never modified


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer_block"])
def test_nothing_pruned_keeps_outputs(tmp_path, capsys, name):
    model = zoo.ALL[name]()
    source = save(model, tmp_path / "model.onnx")
    code, _, stderr = run_cli(capsys, source, "--block", "1x1", "--sparsity", "0", "--out", tmp_path / "out")
    assert code == 0, stderr
    inputs = zoo.random_inputs(model, batch=3)
    got = ort_run.make_session(onnx.load(tmp_path / "out" / "pruned.onnx")).run(None, inputs)
    for a, b in zip(got, ort_run.make_session(model).run(None, inputs), strict=True):
        assert np.max(np.abs(a - b), initial=0.0) <= 1e-5


def test_activation_pruner_differs_from_magnitude(tmp_path):
    model = zoo.mlp()
    source = save(model, tmp_path / "model.onnx")
    calib = tmp_path / "calib.npz"
    x = zoo.random_inputs(model, batch=64)["x"]
    x[:, :8] *= 50.0  # inputs whose first columns dominate: activation-aware keeps their weights
    np.savez(calib, x=x)
    magnitude = pruneaug.compile(source, block="1x1", sparsity=0.5, out=tmp_path / "a", artifact=False)
    activation = pruneaug.compile(source, block="1x1", sparsity=0.5, out=tmp_path / "b", pruner="activation", calib=calib, artifact=False)
    first = magnitude.plan["layers"][0]["weight"]
    with np.load(magnitude.masks) as m, np.load(activation.masks) as a:
        kept_hot_magnitude, kept_hot_activation = m[first][:8].mean(), a[first][:8].mean()
    assert kept_hot_activation > 0.95 and kept_hot_magnitude < 0.7  # magnitude keeps about half of them


def test_keep_sparsity_reads_the_plan_back(tmp_path):
    model = zoo.mlp()
    first = pruneaug.compile(save(model, tmp_path / "model.onnx"), block="8x8", sparsity=0.75, out=tmp_path / "a", artifact=False)
    again = pruneaug.compile(first.pruned_model, keep_sparsity=True, out=tmp_path / "b", artifact=False)
    for before, after in zip(first.plan["layers"], again.plan["layers"], strict=True):
        assert after["block"] == [8, 8]
        assert after["nnz_blocks"] == before["nnz_blocks"]
        assert after["sparsity"] == pytest.approx(before["sparsity"], abs=0.5 / before["blocks"])
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(first.pruned_model).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(again.pruned_model).graph.initializer}
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_given_plans_layer_whose_sparse_kernel_is_slower_runs_dense_with_its_zeros(tmp_path):
    """Random zeros read back as 1x1 blocks at 30%: the block-sparse kernel is predicted slower than dense
    (measure none: the analytical model, the same on every machine), so the artifact runs that layer
    dense; the zeros stay in pruned.onnx, and the plan, the report and a warning say so."""
    model = zoo.mlp()
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        weight = numpy_helper.to_array(tensor)
        if weight.ndim == 2:
            tensor.CopyFrom(numpy_helper.from_array(np.where(rng.random(weight.shape) < 0.3, 0, weight)
                                                    .astype(np.float32), tensor.name))
    result = pruneaug.compile(save(model, tmp_path / "model.onnx"), keep_sparsity=True, measure="none",
                              out=tmp_path / "o")
    runs_dense = [layer for layer in result.plan["layers"] if layer["kernel"] == "dense"]
    assert runs_dense, result.plan["layers"]
    for layer in result.plan["layers"]:
        assert layer["block"] == [1, 1] and 0.2 < layer["sparsity"] < 0.4
        if layer["kernel"] == "dense":  # costed as it runs, with the slower kernel's figure beside it
            assert layer["predicted_latency_s"] == layer["dense_latency_s"] < layer["block_sparse_latency_s"]
        else:
            assert layer["block_sparse_latency_s"] is None and layer["predicted_latency_s"] < layer["dense_latency_s"]
    warning = next(w for w in result.warnings if "run dense in the artifact" in w)
    assert all(f"{layer['node']} (1x1 at " in warning for layer in runs_dense)
    assert "runs dense (block-sparse:" in (tmp_path / "o" / "report.md").read_text()
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(result.pruned_model).graph.initializer}
    assert all(np.mean(pruned[layer["weight"]] == 0) > 0.2 for layer in runs_dense)  # zeros kept
    x = rng.standard_normal((1, 64)).astype(np.float32)
    (want,) = ort_run.make_session(onnx.load(result.pruned_model)).run(None, {"x": x})
    (got,) = pruneaug.load(result.artifact).run({"x": x})
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    from pruneaug import deploy
    from pruneaug.cost_model import cost_model
    from pruneaug.cost_model.targets import resolve_target
    from pruneaug.ir.layer import BlockSpec
    from pruneaug.passes import blockmask, importance, latency

    ir = importance.from_zeros(lift(model, {"x": [1, 64]}))
    ir = blockmask.apply_masks(blockmask.assign_blocks(ir, {n: BlockSpec(1, 1, 0.3) for n in ir.prunable_nodes()}))
    costs = cost_model(resolve_target("x86"), "none")
    as_planned = deploy.sparse_weights(latency.annotate(ir, costs))
    given = latency.annotate(ir, costs, dense_where_faster=True)
    assert set(as_planned) == {layer["weight"] for layer in result.plan["layers"]}  # a search's plan: as planned
    assert set(deploy.sparse_weights(given)) == set(as_planned) - {layer["weight"] for layer in runs_dense}


def test_python_api_returns_a_result(tmp_path):
    result = pruneaug.compile(zoo.cnn(), target="arm64", block="4x4", sparsity=0.5, out=tmp_path / "o", artifact=False)
    assert result.plan_file.is_file() and result.pruned_model.is_file() and result.masks.is_file()
    assert result.plan["target"].startswith("arm64")
    assert json.loads(result.plan_file.read_text()) == result.plan


def test_no_prunable_node_is_a_warning(tmp_path, capsys):
    source = save(zoo.no_prunable(), tmp_path / "model.onnx")
    code, _, stderr = run_cli(capsys, source, "--block", "8x8", "--sparsity", "0.5", "--out", tmp_path / "o")
    assert code == 0
    assert "warning" in stderr and "no prunable" in stderr
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["layers"] == []


def test_external_data_model_compiles(tmp_path, capsys):
    zoo.save_with_external_data(zoo.mlp(), tmp_path / "model.onnx")
    code, _, stderr = run_cli(capsys, tmp_path / "model.onnx", "--block", "4x4", "--sparsity", "0.5", "--out", tmp_path / "o")
    assert code == 0, stderr


def test_rerun_into_existing_folder_replaces_files(tmp_path):
    source = save(zoo.mlp(), tmp_path / "model.onnx")
    pruneaug.compile(source, block="4x4", sparsity=0.5, out=tmp_path / "o", artifact=False)
    (tmp_path / "o" / "keep.txt").write_text("mine")
    result = pruneaug.compile(source, block="4x4", sparsity=0.9, out=tmp_path / "o", artifact=False)
    assert json.loads(result.plan_file.read_text())["layers"][0]["sparsity"] == 0.9
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def nan_model() -> onnx.ModelProto:
    model = zoo.mlp()
    tensor = model.graph.initializer[0]
    array = numpy_helper.to_array(tensor).copy()
    array.flat[3] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return model


def checker_failing_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="bad", alpha=1.0)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def bad_inputs(tmp_path: Path):
    """(name, argv, text that the one-line message must hold)."""
    good = save(zoo.mlp(), tmp_path / "good.onnx")
    (tmp_path / "notonnx.onnx").write_text("this is not an onnx model\n" * 20)
    data = good.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    save(checker_failing_model(), tmp_path / "checker.onnx")
    save(nan_model(), tmp_path / "nan.onnx")
    (tmp_path / "ext").mkdir()
    zoo.save_with_external_data(zoo.mlp(), tmp_path / "ext" / "model.onnx")
    (tmp_path / "ext" / "model.onnx.data").unlink()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "wrong_name.npz", z=rng.standard_normal((4, 64)).astype(np.float32))
    np.savez(tmp_path / "wrong_shape.npz", x=rng.standard_normal((4, 63)).astype(np.float32))
    np.savez(tmp_path / "wrong_dtype.npz", x=rng.standard_normal((4, 64)))
    np.savez(tmp_path / "pickle.npz", x=np.array([{"a": 1}], dtype=object))
    (tmp_path / "infolder").mkdir()
    save(zoo.mlp(), tmp_path / "infolder" / "pruned.onnx")
    (tmp_path / "afile").write_text("x")
    fixed = ["--block", "8x8", "--sparsity", "0.5"]
    return [
        ("missing file", [tmp_path / "nope.onnx", *fixed], "nope.onnx: no such file"),
        ("not onnx", [tmp_path / "notonnx.onnx", *fixed], "notonnx.onnx: not"),
        ("truncated", [tmp_path / "truncated.onnx", *fixed], "truncated.onnx"),
        ("checker", [tmp_path / "checker.onnx", *fixed], "checker.onnx: fails onnx.checker"),
        ("missing external data", [tmp_path / "ext" / "model.onnx", *fixed], "external data file 'model.onnx.data' not found"),
        ("nan weights", [tmp_path / "nan.onnx", *fixed], "NaN or Inf"),
        ("unknown target", [good, "--target", "riscv", *fixed], "--target 'riscv': unknown target"),
        ("block 0x4", [good, "--block", "0x4", "--sparsity", "0.5"], "--block '0x4'"),
        ("block 4x", [good, "--block", "4x", "--sparsity", "0.5"], "--block '4x'"),
        ("block abc", [good, "--block", "abc", "--sparsity", "0.5"], "--block 'abc'"),
        ("sparsity 1", [good, "--block", "8x8", "--sparsity", "1"], "--sparsity '1': must be in [0, 1)"),
        ("sparsity negative", [good, "--block", "8x8", "--sparsity", "-0.1"], "--sparsity '-0.1'"),
        ("sparsity nan", [good, "--block", "8x8", "--sparsity", "nan"], "--sparsity 'nan'"),
        ("sparsity text", [good, "--block", "8x8", "--sparsity", "lots"], "--sparsity 'lots': not a number"),
        ("calib names", [good, *fixed, "--calib", tmp_path / "wrong_name.npz"], "no array for model input(s) x"),
        ("calib shape", [good, *fixed, "--calib", tmp_path / "wrong_shape.npz"], "input 'x' has shape (4, 63)"),
        ("calib dtype", [good, *fixed, "--calib", tmp_path / "wrong_dtype.npz"], "input 'x' is float64"),
        ("calib pickle", [good, *fixed, "--calib", tmp_path / "pickle.npz"], "need pickle"),
        ("calib missing", [good, *fixed, "--calib", tmp_path / "nope.npz"], "nope.npz: no such file"),
        ("out clashes with input", [tmp_path / "infolder" / "pruned.onnx", *fixed, "--out", tmp_path / "infolder"],
         "would overwrite the input model"),
        ("out not writable", [good, *fixed, "--out", tmp_path / "afile" / "out"], "cannot write there"),
        ("out is a file", [good, *fixed, "--out", tmp_path / "afile"], "exists and is not a folder"),
        ("pruner", [good, *fixed, "--pruner", "random"], "--pruner 'random'"),
        ("activation without calib", [good, *fixed, "--pruner", "activation"], "needs --calib"),
        ("no plan, no data", [good], "give --eval"),
        ("block without sparsity", [good, "--block", "8x8"], "a fixed plan needs both --block RxC and --sparsity S"),
        ("keep-sparsity with a block", [good, "--keep-sparsity", "--block", "8x8"], "drop --block and --sparsity"),
        ("unknown option", [good, *fixed, "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ]


def test_bad_inputs_get_one_line_and_exit_2(tmp_path, capsys):
    for name, argv, message in bad_inputs(tmp_path):
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        if "--out" not in [str(a) for a in argv]:
            argv = [*argv, "--out", out]
        before = sorted(p.name for p in tmp_path.iterdir())
        code, _, stderr = run_cli(capsys, *argv)
        assert code == 2, name
        assert message in stderr, (name, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("pruneaug: error: "), (name, stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name  # no output folder, no staging left
    # the model that --out would have overwritten is intact
    assert (tmp_path / "infolder" / "pruned.onnx").read_bytes() == (tmp_path / "good.onnx").read_bytes()


def test_cli_process_exit_code_and_no_traceback(tmp_path):
    """The real command line: one line on stderr and exit 2, as a user sees it."""
    result = subprocess.run([sys.executable, "-m", "pruneaug.compile", str(tmp_path / "missing.onnx"), "--block", "8x8",
                             "--sparsity", "0.5", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"pruneaug: error: {tmp_path / 'missing.onnx'}: no such file"
    assert not (tmp_path / "o").exists()


def test_api_raises_typed_errors(tmp_path):
    with pytest.raises(OptionError, match=r"--block '8y8'"):
        pruneaug.compile(zoo.mlp(), block="8y8", sparsity=0.5, out=tmp_path / "o", artifact=False)
    assert not (tmp_path / "o").exists()


def test_pruneaugs_own_warnings_reach_the_user(tmp_path, capsys, monkeypatch):
    """A latency cache set aside as unreadable is said on stderr (the CLI once silenced every warning)."""
    cache = tmp_path / "cache.sqlite"
    cache.write_bytes(b"not a database" * 100)
    monkeypatch.setenv("PRUNEAUG_CACHE", str(cache))
    source = save(zoo.mlp(), tmp_path / "model.onnx")
    code, stdout, stderr = run_cli(capsys, source, "--block", "4x4", "--sparsity", "0.5", "--measure", "none",
                                   "--out", tmp_path / "o")
    assert code == 0, stderr
    assert stderr.count(f"pruneaug: warning: latency cache {cache} was unreadable") == 1
    assert "pruned 3 of 3 prunable layers" in stdout
    assert "wrote pruned.onnx, masks.npz, plan.json, report.md, report.html to" in stdout  # every file, no artifact


def test_a_fixed_plan_says_which_search_options_it_did_not_use(tmp_path, capsys):
    model = zoo.mlp()
    source = save(model, tmp_path / "model.onnx")
    np.savez(tmp_path / "eval.npz", **zoo.random_inputs(model, batch=8))
    code, _, stderr = run_cli(capsys, source, "--block", "4x4", "--sparsity", "0.5", "--eval", tmp_path / "eval.npz",
                              "--budget", "0.02", "--out", tmp_path / "o")
    assert code == 0, stderr
    assert "--eval and --budget not used: the plan is given, so nothing is searched or validated" in stderr
    code, _, stderr = run_cli(capsys, source, "--block", "4x4", "--sparsity", "0.5", "--out", tmp_path / "p")
    assert code == 0 and "not used" not in stderr


def test_the_summary_counts_only_layers_that_lost_blocks(tmp_path, capsys):
    """At 0.05 a layer of few large blocks loses none: it is prunable but not pruned, and its row says so."""
    source = save(zoo.mlp(), tmp_path / "model.onnx")
    code, stdout, stderr = run_cli(capsys, source, "--block", "32x32", "--sparsity", "0.05", "--out", tmp_path / "o")
    assert code == 0, stderr
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    untouched = [e for e in plan["layers"] if e["nnz_blocks"] == e["blocks"]]
    assert untouched and all(e["block_sparsity"] == 0.0 for e in untouched)
    pruned = len(plan["layers"]) - len(untouched)
    assert plan["totals"]["pruned_layers"] == pruned
    assert f"pruned {pruned} of {len(plan['layers'])} prunable layers" in stdout
    assert "0.05 (0.00 of its blocks)" in (tmp_path / "o" / "report.md").read_text()


def test_the_report_lists_the_layers_kept_dense_and_why(tmp_path, capsys):
    source = save(zoo.cnn(), tmp_path / "model.onnx")
    code, _, stderr = run_cli(capsys, source, "--block", "4x4", "--sparsity", "0.5", "--out", tmp_path / "o")
    assert code == 0, stderr
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in zoo.cnn().graph.node
              if n.op_type == "Conv"}
    assert plan["kept_dense"] == [{"node": name, "op_type": "Conv", "reason": f"group {group} (a depthwise or grouped conv)"}
                                  for name, group in groups.items() if group > 1]
    report = (tmp_path / "o" / "report.md").read_text()
    assert "## Layers kept dense" in report
    assert all(f"| {e['node']} | Conv | {e['reason']} |" in report for e in plan["kept_dense"])


def test_outputs_are_written_with_the_usual_file_mode(tmp_path):
    """pruned.onnx was written 0600 (its temporary file's mode) while the other outputs were 0644."""
    import os

    mask = os.umask(0o022)
    try:
        result = pruneaug.compile(save(zoo.mlp(), tmp_path / "model.onnx"), block="4x4", sparsity=0.5,
                                  out=tmp_path / "o", artifact=False)
    finally:
        os.umask(mask)
    assert {p.name: p.stat().st_mode & 0o777 for p in result.out_dir.iterdir()} == {
        name: 0o644 for name in ("pruned.onnx", "masks.npz", "plan.json", "report.md", "report.html")}
