"""The compile writes a checked TVM artifact next to pruned.onnx; a model TVM cannot import still gets the rest."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pruneaug
from pruneaug.compile import main
from pruneaug.cost_model.targets import resolve_target
from pruneaug.passes import ort_run
from pruneaug.pick import PICK_TIMINGS
from pruneaug.timing import Competitor, time_interleaved

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
def test_fixed_plan_artifact_matches_pruned_onnx_and_is_measured(tmp_path):
    calib = EXAMPLES / "cnn" / "calib.npz"
    result = pruneaug.compile(EXAMPLES / "cnn" / "model.onnx", block="8x8", sparsity=0.8, calib=calib, batch=4,
                              measure="none", out=tmp_path / "out")
    assert result.artifact == tmp_path / "out" / "model.x86.so" and result.artifact.is_file()
    with np.load(calib) as data:
        x = data["input"][:4]
    got = pruneaug.load(result.artifact).run({"input": x})[0]
    (want,) = ort_run.make_session(onnx.load(result.pruned_model)).run(None, {"input": x})
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    latency = result.plan["model_latency"]
    assert latency["threads"] >= 1 and latency["repeat"] >= 10
    for key in ("onnxruntime_dense_s", "onnxruntime_pruned_s", "tvm_pruned_s"):  # each in its own process
        assert 0 < latency["p10_s"][key] <= latency[key] <= latency["p90_s"][key]
    assert "errors" not in latency and "own process" in latency["note"]
    assert result.plan["input_shapes"] == {"input": [4, 1, 8, 8]}
    alone = time_interleaved([Competitor("function", "artifact-vm", result.artifact)], {"input": x}, threads=1,
                             rounds=1, runs=3).results["function"]
    assert alone.error is None and len(alone.seconds) == 3 and min(alone.seconds) > 0
    report = result.report.read_text()
    assert "Whole model, measured" in report and "pruneaug artifact" in report
    threading = result.plan["threading"]  # the serial twin built and timed beside it, one of them kept
    if resolve_target("x86").cores > 1:
        assert threading["kept"] in ("parallel", "serial") and "Threads: parallel kernels or" in report
        assert all(seconds > 0 for key in ("median_s", "p10_s") for seconds in threading[key].values())
        assert len(threading["timings_median_s"]) == PICK_TIMINGS
    else:
        assert "one core" in threading["skipped"]
    assert sorted(p.name for p in result.out_dir.glob("model.*")) == ["model.x86.so", "model.x86.so.json"]


@pytest.mark.slow
def test_arm64_artifact_is_cross_compiled_or_an_object_tar(tmp_path):
    result = pruneaug.compile(EXAMPLES / "mlp" / "model.onnx", target="arm64", block="4x1", sparsity=0.5,
                              out=tmp_path / "out")
    assert result.artifact is not None and result.artifact.suffix in (".so", ".tar")
    if result.artifact.suffix == ".so":
        assert result.artifact.read_bytes()[:4] == b"\x7fELF" and result.artifact.read_bytes()[18] == 183  # EM_AARCH64
    assert "model_latency" not in result.plan  # nothing measured that did not run here
    unchecked = result.plan["artifact_unchecked"]  # and nothing gated: the user is told how to check it there
    assert unchecked.startswith(f"{result.artifact.name} is not checked against onnxruntime: arm64")
    assert "tools/check_artifact.py" in unchecked and unchecked in result.warnings
    assert f"Written unchecked: {unchecked}" in result.report.read_text()


def matmul_model(then_an_op_tvm_lacks: bool = False) -> onnx.ModelProto:
    """x[2, 16] -> MatMul "fc" -> y[2, 8], optionally through a com.example FancyOp after it."""
    weight = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h" if then_an_op_tvm_lacks else "y"], name="fc")]
    opsets = [helper.make_opsetid("", 17)]
    if then_an_op_tvm_lacks:
        nodes.append(helper.make_node("FancyOp", ["h"], ["y"], name="fancy", domain="com.example"))
        opsets.append(helper.make_opsetid("com.example", 1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=opsets)


def compile_without_artifact(model: onnx.ModelProto, tmp_path: Path, capsys) -> str:
    """Compile a fixed plan that gets no artifact; check that the rest is written whole. Returns stderr."""
    onnx.save(model, tmp_path / "model.onnx")
    code = main([str(tmp_path / "model.onnx"), "--block", "4x4", "--sparsity", "0.5", "--measure", "none",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0 and "no compiled artifact" in err
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"pruned.onnx", "masks.npz", "plan.json", "report.md"} <= files
    assert not any(name.startswith(("model.", ".model.")) for name in files)  # nor a half-written one
    return err


def test_an_artifact_that_fails_the_gate_is_not_written(tmp_path, capsys, monkeypatch):
    """The gate runs the exported file itself; a mismatch deletes it (and its sidecar) and names the layer."""
    from pruneaug.runtime import LoadedModel

    honest_run = LoadedModel.run
    monkeypatch.setattr(LoadedModel, "run", lambda self, inputs: [y + 1 for y in honest_run(self, inputs)])
    err = compile_without_artifact(matmul_model(), tmp_path, capsys)
    assert "differs from onnxruntime at layer 'fc'" in err


def test_op_tvm_cannot_import_still_writes_the_rest(tmp_path, capsys):
    err = compile_without_artifact(matmul_model(then_an_op_tvm_lacks=True), tmp_path, capsys)
    assert "FancyOp" in err
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert "FancyOp" in plan["artifact_error"]
    assert "FancyOp" in (tmp_path / "out" / "report.md").read_text()


def test_the_gate_waits_for_pruned_onnx_written_beside_the_build(tmp_path, monkeypatch):
    """pruned.onnx and masks.npz are written by a forked child while the artifact builds: the gate reads the
    finished file, and a failure to write them fails the compile and leaves no output folder."""
    import os
    import threading
    import time

    from pruneaug import compile as compile_module
    from pruneaug import gate
    from pruneaug.codegen import relax_build
    from pruneaug.errors import ModelError

    built, writer_pid = tmp_path / "built", tmp_path / "writer.pid"
    build, saved = relax_build.build_model, compile_module.save_model
    references, reference = [], gate.onnxruntime_outputs

    def build_then_say_so(*args, **kwargs):
        try:
            return build(*args, **kwargs)
        finally:
            built.touch()

    def save_once_built(model, path):  # pruned.onnx appears only after the build: the gate must wait for it
        deadline = time.monotonic() + 120
        while not built.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        writer_pid.write_text(str(os.getpid()))
        saved(model, path)

    def recorded(model, inputs):
        references.append((model, threading.current_thread().name))
        return reference(model, inputs)

    def unexpected(*args):
        raise AssertionError("the gate ran onnxruntime itself instead of taking the reference computed beside the build")

    monkeypatch.setattr(relax_build, "build_model", build_then_say_so)
    monkeypatch.setattr(compile_module, "save_model", save_once_built)
    monkeypatch.setattr(gate, "onnxruntime_outputs", recorded)
    monkeypatch.setattr(relax_build, "onnxruntime_outputs", unexpected)
    result = pruneaug.compile(matmul_model(), block="4x4", sparsity=0.5, measure="none", out=tmp_path / "out")
    assert result.artifact is not None and result.pruned_model.is_file() and result.masks.is_file()
    assert int(writer_pid.read_text()) != os.getpid()  # written in another process: no GIL shared with the build
    [(file, thread)] = references  # from the written file, on the writer's thread
    assert file.name == "pruned.onnx" and thread.startswith("pruneaug-write")
    with np.load(result.masks) as masks:
        assert masks["w"].mean() == 0.5

    checked = compile_module.check_model

    def failing_check(model, where):  # (raised in the writer's process, raised again here)
        if where != "pruned.onnx":
            return checked(model, where)
        raise ModelError(f"{where}: fails onnx.checker: broken on purpose")

    monkeypatch.setattr(compile_module, "check_model", failing_check)
    with pytest.raises(ModelError, match="pruned.onnx: fails onnx.checker: broken on purpose"):
        pruneaug.compile(matmul_model(), block="4x4", sparsity=0.5, measure="none", out=tmp_path / "failed")
    # no output folder, no staging folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built", "out", "writer.pid"]


def test_a_gate_that_cannot_run_onnxruntime_leaves_the_other_outputs(tmp_path, monkeypatch):
    from pruneaug import gate

    def broken(model, inputs):
        raise RuntimeError("onnxruntime fell over")

    monkeypatch.setattr(gate, "onnxruntime_outputs", broken)
    result = pruneaug.compile(matmul_model(), block="4x4", sparsity=0.5, measure="none", out=tmp_path / "out")
    assert result.artifact is None and result.pruned_model.is_file()
    assert result.plan["artifact_error"] == ("the correctness gate could not run the artifact for x86: RuntimeError: "
                                             "onnxruntime fell over")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("model.")) == []  # removed


def test_a_float16_model_stays_dense_and_its_artifact_passes_the_half_precision_gate(tmp_path):
    """The kernels are float32: a float16 model is compiled dense by TVM, whose float16 sums round otherwise
    than onnxruntime's (1.5e-3 apart): its gate allows `gate.HALF_RTOL`, float32 outputs keep `GATE_RTOL`."""
    from pruneaug.gate import GATE_RTOL, HALF_RTOL, close

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) / 8).astype(np.float16), name)
               for name, shape in (("w1", (64, 128)), ("w2", (128, 10)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 10])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "half.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 64)).astype(np.float16))
    result = pruneaug.compile(tmp_path / "half.onnx", block="4x4", sparsity=0.5, calib=tmp_path / "calib.npz",
                              measure="none", out=tmp_path / "out")
    assert result.artifact is not None and result.plan["layers"] == []
    assert {e["reason"] for e in result.plan["kept_dense"]} == {
        "its weight is float16; the block-sparse kernels are float32"}
    checked = _check_artifact(tmp_path / "out", tmp_path / "calib.npz")
    assert checked.returncode == 0 and "matches onnxruntime (rtol 0.01)" in checked.stdout, checked.stderr
    x = rng.standard_normal((1, 64)).astype(np.float16)
    got = pruneaug.load(result.artifact).run({"x": x})[0]
    (want,) = ort_run.make_session(onnx.load(result.pruned_model)).run(None, {"x": x})
    assert got.dtype == np.float16 and close(got, want, GATE_RTOL)
    one_half_ulp_off = np.full(4, 1 + 2.0 ** -10)  # float16's next number after 1, ~10 GATE_RTOL away
    assert not close(one_half_ulp_off.astype(np.float32), np.ones(4, np.float32), GATE_RTOL)
    assert close(one_half_ulp_off.astype(np.float16), np.ones(4, np.float16), GATE_RTOL)
    assert not close(np.float16(1 + 2 * HALF_RTOL) * np.ones(4, np.float16), np.ones(4, np.float16), GATE_RTOL)


def _check_artifact(folder: Path, calib: Path):
    """tools/check_artifact.py on a compile's output folder, as a deploying user runs it."""
    import subprocess
    import sys

    tool = Path(__file__).resolve().parent.parent / "tools" / "check_artifact.py"
    return subprocess.run([sys.executable, str(tool), str(folder), "--calib", str(calib), "--repeat", "5"],
                          capture_output=True, text=True, timeout=300)


def test_check_artifact_passes_a_compiles_artifact_and_names_the_output_that_differs(tmp_path):
    """The deployment check: the artifact against pruned.onnx in onnxruntime at the gate's tolerance."""
    calib = EXAMPLES / "mlp" / "calib.npz"
    result = pruneaug.compile(EXAMPLES / "mlp" / "model.onnx", block="4x4", sparsity=0.5, calib=calib,
                              measure="none", out=tmp_path / "out")
    checked = _check_artifact(tmp_path / "out", calib)
    assert checked.returncode == 0 and "matches onnxruntime (rtol 0.0001)" in checked.stdout, checked.stderr
    assert "random" not in checked.stderr
    (name, rows), = np.load(calib).items()
    np.savez(tmp_path / "other.npz", **{name: rows[:, :-1]})  # rows the artifact cannot take: said, then random
    checked = _check_artifact(tmp_path / "out", tmp_path / "other.npz")
    assert checked.returncode == 0 and "matches onnxruntime" in checked.stdout, checked.stderr
    assert f"other.npz has no rows of {name} {result.plan['input_shapes'][name]}" in checked.stderr
    assert "checking on seeded random values instead" in checked.stderr
    pruned = onnx.load(result.pruned_model)  # a pruned.onnx that no longer is what was compiled
    weight = next(t for t in pruned.graph.initializer if t.name == result.plan["layers"][0]["weight"])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2, weight.name))
    onnx.save(pruned, result.pruned_model)
    checked = _check_artifact(tmp_path / "out", calib)
    output = onnx.load(result.pruned_model).graph.output[0].name
    assert checked.returncode != 0
    assert f"output {output!r} differs from onnxruntime's: relative error" in checked.stderr
    assert checked.stderr.rstrip().endswith("> 0.0001")



def test_dense_layers_run_in_the_block_shape_their_kernels_measured_faster(tmp_path, monkeypatch):
    """32x16 dense kernels in the cache at a fifth of the default's time, for two of the MLP's three layers:
    the plan records them, codegen builds those two in 32x16 blocks (every block kept) and the third in the
    default's, and the artifact matches onnxruntime."""
    import zoo
    from pruneaug.codegen import bsr, schedule
    from pruneaug.cost_model.cache import DENSE_BLOCK, Measurement, open_cache
    from pruneaug.cost_model.measured import running_profile

    wide = schedule.WIDE_DENSE_BLOCK
    faster = {(128, 64, 1), (10, 96, 1)}  # fc1 and fc3 (out, in, m); fc2 (96, 128) keeps the default
    rows = [Measurement(*shape, DENSE_BLOCK, 1.0, 10e-6) for shape in [*faster, (96, 128, 1)]]
    rows += [Measurement(*shape, wide, 1.0, 2e-6 if shape in faster else 9.9e-6) for shape in [*faster, (96, 128, 1)]]
    open_cache().put_many(running_profile(resolve_target("x86")).cache_key, rows)
    built = []
    to_bsr = bsr.to_bsr
    monkeypatch.setattr(bsr, "to_bsr", lambda w, block: built.append((w.shape, tuple(block))) or to_bsr(w, block))
    result = pruneaug.compile(zoo.mlp(), sparsity=0.0, block="4x4", measure="none", out=tmp_path / "o")
    by_shape = {tuple(layer["shape"]): layer for layer in result.plan["layers"]}
    assert {shape: tuple(layer["dense_block"]) for shape, layer in by_shape.items()} == {
        (128, 64): wide, (96, 128): schedule.DENSE_BLOCK, (10, 96): wide}
    assert by_shape[(128, 64)]["dense_latency_s"] == pytest.approx(2e-6)
    assert by_shape[(96, 128)]["dense_latency_s"] == pytest.approx(10e-6)
    report = (tmp_path / "o" / "report.md").read_text()
    assert report.count("µs (32x16 kernel)") == 2 and "(16x32 kernel)" not in report
    assert {(shape, block) for shape, block in built} >= {((128, 64), wide), ((96, 128), schedule.DENSE_BLOCK),
                                                          ((10, 96), wide)}
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    (want,) = ort_run.make_session(onnx.load(result.pruned_model)).run(None, {"x": x})
    (got,) = pruneaug.load(result.artifact).run({"x": x})
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
