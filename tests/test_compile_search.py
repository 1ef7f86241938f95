"""The full compile: search + report + artifact, on the bundled examples, and the search's bad inputs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import pruneaug
from pruneaug.compile import main
from pruneaug.passes import ort_run
from pruneaug.passes.validate import accuracy

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str) -> tuple[Path, Path, Path]:
    folder = EXAMPLES / name
    return folder / "model.onnx", folder / "calib.npz", folder / "eval.npz"


def eval_accuracy(model_path: Path, eval_path: Path) -> float:
    with np.load(eval_path) as data:
        inputs = {k: data[k] for k in data.files if k != "labels"}
        labels = data["labels"]
    return accuracy(ort_run.run(onnx.load(model_path), inputs)[0], labels)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "cnn", "encoder"])
def test_search_meets_the_budget_on_the_examples(tmp_path, name):
    model, calib, eval_ = example(name)
    result = pruneaug.compile(model, calib=calib, eval=eval_, budget=0.01, measure="none", artifact=False,
                              out=tmp_path / "out")
    search = result.plan["search"]
    assert search["met"] and search["metric_loss"] <= 0.01
    dense, pruned = eval_accuracy(model, eval_), eval_accuracy(result.pruned_model, eval_)
    assert dense - pruned == pytest.approx(search["metric_loss"], abs=1e-9)  # the plan's figure is the real drop
    assert result.plan["totals"]["weight_sparsity"] > 0.1
    assert len(search["trials"]) == search["baselines"]["searched"]["validations"] >= 1
    assert search["validations_total"] == sum(  # "best single" and "single 1x1" name searches listed already
        b["validations"] for name, b in search["baselines"].items() if name not in ("best single", "single 1x1"))
    assert {"dense", "unstructured", "best single"} <= set(search["baselines"])
    assert search["predicted_latency_s"] <= search["baselines"]["dense"]["predicted_latency_s"]
    for entry in result.plan["layers"]:
        assert entry["proxy_loss"] is not None and entry["predicted_latency_s"] > 0
        assert entry["latency_source"] in ("measured", "fitted", "analytical")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Plans compared" in report and "best single" in report
    for entry in result.plan["layers"]:
        assert entry["node"] in report
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_targets_with_other_costs_get_other_plans(tmp_path, monkeypatch):
    from pruneaug.passes import proxy

    partitions = []
    table = proxy.energy_share_table
    monkeypatch.setattr(proxy, "energy_share_table", lambda *args: partitions.append(args) or table(*args))
    model, calib, eval_ = example("mlp")
    plans, sensitivities = {}, []
    for target in ("x86", "arm64:cortex-a55", "cuda:sm_90"):
        result = pruneaug.compile(model, target=target, calib=calib, eval=eval_, budget=0.02, measure="none",
                                  artifact=False, out=tmp_path / target.replace(":", "_"))
        plans[target] = [(e["block"], e["sparsity"]) for e in result.plan["layers"]]
        sensitivities.append(result.plan["search"]["sensitivities"])
    assert len({json.dumps(p) for p in plans.values()}) > 1, plans
    # the probes do not depend on the target: the second and third compiles read the first one's
    assert sensitivities == ["measured", "recalled from the cache", "recalled from the cache"]
    # nor do the proxy's energy shares, where the targets serve the same blocks: partitioned once per set of them
    assert 1 <= len(partitions) == len({json.dumps({n: list(b) for n, b in args[1].items()}) for args in partitions}) < 3


def test_a_compile_again_reads_the_validations_it_ran_before(tmp_path):
    model, calib, eval_ = example("mlp")

    def compile_mlp(out: str, **options):
        options = {"metric": "top1", "reconstruct": False, **options}
        result = pruneaug.compile(model, calib=calib, eval=eval_, budget=0.02, measure="none", artifact=False,
                                  out=tmp_path / out, **options)
        return result, result.plan["search"]

    first, cold = compile_mlp("cold")
    again, warm = compile_mlp("warm")
    assert cold["validations_total"] >= 1  # (a baseline may meet a plan the search validated: recalled)
    assert warm["validations_total"] == 0
    assert warm["recalled_total"] == cold["validations_total"] + cold["recalled_total"]
    assert warm["trials"] == cold["trials"] and warm["layers"] == cold["layers"]
    assert warm["metric_loss"] == cold["metric_loss"]
    weights = [{t.name: numpy_helper.to_array(t) for t in onnx.load(r.pruned_model).graph.initializer}
               for r in (first, again)]
    assert all(np.array_equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert "read from the cache" in (tmp_path / "warm" / "report.md").read_text()
    # another metric, or a reconstruction, gives other losses: validated again
    for out, options in (("cosine", {"metric": "cosine"}), ("refit", {"reconstruct": True})):
        _, other = compile_mlp(out, **options)
        assert other["validations_total"] >= 1 and other["recalled_total"] < warm["recalled_total"], out


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_search_bad_inputs(tmp_path, capsys):
    model, calib, eval_ = example("mlp")
    common = ["--measure", "none", "--no-artifact"]
    cases = [
        ([model, "--calib", calib, "--eval", eval_, "--budget", "0", *common], "--budget '0': must be in (0, 1)"),
        ([model, "--calib", calib, "--eval", eval_, "--budget", "1.5", *common], "--budget '1.5'"),
        ([model, *common], "give --eval"),
        ([model, "--calib", calib, "--eval", eval_, "--blocks", "512x512", *common],
         "--blocks 512x512: no prunable layer can use"),
        ([model, "--calib", calib, "--eval", eval_, "--metric", "f1", *common], "--metric 'f1'"),
        ([model, "--calib", calib, "--eval", eval_, "--sparsities", "0.5:0.1:0.1", *common], "--sparsities"),
        ([model, "--calib", calib, "--eval", eval_, "--measure", "ftp://x", "--no-artifact"], "--measure 'ftp://x'"),
    ]
    for argv, message in cases:
        out = tmp_path / "o"
        code, err = run_cli(capsys, *argv, "--out", out)
        assert code == 2 and message in err, (argv, err)
        assert not out.exists()


def test_eval_falls_back_to_calib_and_top1_without_labels_is_agreement(tmp_path, capsys):
    model, calib, _ = example("mlp")
    code, err = run_cli(capsys, model, "--calib", calib, "--measure", "none", "--no-artifact", "--out", tmp_path / "o")
    assert code == 0, err
    assert "no --eval" in err and "agreement with the dense model" in err


def test_unreachable_budget_returns_the_dense_plan(tmp_path, capsys):
    model, calib, eval_ = example("mlp")
    code, err = run_cli(capsys, model, "--calib", calib, "--eval", eval_, "--metric", "relerr", "--budget", "1e-9",
                        "--blocks", "32x32", "--sparsities", "0.5,0.9", "--measure", "none", "--no-artifact",
                        "--out", tmp_path / "o")
    assert code == 0, err
    assert "dense plan" in err
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert all(entry["sparsity"] == 0 for entry in plan["layers"])
    assert plan["search"]["chosen_from"] == "dense"


def test_a_plan_measured_faster_is_kept_with_its_own_artifact(tmp_path, monkeypatch):
    """The measured pick (pruneaug.pick) with timings that make the last contender built the fastest: pruned.onnx,
    the masks, plan.json, the report and the artifact all become that plan's, and the artifact computes
    what pruned.onnx does."""
    from pruneaug import pick, timing
    from pruneaug.runtime import load

    monkeypatch.setattr(pick, "PICK_MARGIN", 1e9)  # every validated plan contends
    timed = []

    def last_fastest(artifacts, inputs, rounds, runs, pause_s=0.0):
        timed.append(list(artifacts))  # the predicted choice first, built first
        return {name: timing.Timing(name, [1e-5 if name == timed[0][-1] else 3e-5] * runs) for name in artifacts}

    monkeypatch.setattr(timing, "time_side_by_side", last_fastest)
    model, calib, eval_ = example("mlp")
    result = pruneaug.compile(model, calib=calib, eval=eval_, budget=0.01, measure="none", out=tmp_path / "out")
    search = result.plan["search"]
    predicted, kept = (timed[0][i].rsplit(" [", 1)[0] for i in (0, -1))  # "single 4x1 [serial]": plan [build]
    assert len(timed[0]) >= 3 and search["chosen_from"] == kept != predicted
    assert search["measured_pick"]["picked"] == kept and search["measured_pick"]["predicted_choice"] == predicted
    assert search["measured_pick"]["build"] == timed[0][-1].rsplit(" [", 1)[1].rstrip("]")
    assert search["predicted_latency_s"] == search["baselines"][kept]["predicted_latency_s"]
    assert search["metric_loss"] == search["baselines"][kept]["metric_loss"] <= 0.01
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["pruned.onnx", "masks.npz", "plan.json", "report.md", "report.html", "pareto.png", "model.x86.so",
         "model.x86.so.json"])  # the other contenders' artifacts are gone
    pruned_layers = [entry for entry in result.plan["layers"] if entry["sparsity"] > 0]
    assert {f"{e['block'][0]}x{e['block'][1]}" for e in pruned_layers} == set(search["baselines"][kept]["blocks"])
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(result.pruned_model).graph.initializer}
    masks = np.load(result.masks)
    for entry in pruned_layers:  # pruned.onnx and masks.npz are the kept plan's
        assert np.all(weights[entry["weight"]][~masks[entry["weight"]]] == 0)
        assert np.mean(~masks[entry["weight"]]) == pytest.approx(entry["weight_sparsity"], abs=1e-6)
    with np.load(eval_) as data:
        inputs = {k: data[k][:1] for k in data.files if k != "labels"}
    (ours,) = load(result.artifact).run(inputs)
    (expected,) = ort_run.run(onnx.load(result.pruned_model), inputs)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    report = (tmp_path / "out" / "report.md").read_text()
    build = search["measured_pick"]["build"]
    pick_rows = [line for line in report.splitlines() if re.match(r"\| .+ \| (parallel|serial) \| ", line)]
    assert "Measured pick" in report and len(pick_rows) == len(timed[0])  # every build a row, the kept one marked
    assert [row for row in pick_rows if row.endswith("| yes |")] == [
        next(row for row in pick_rows if row.startswith(f"| {kept} | {build} | "))]


@pytest.mark.slow
def test_convs_are_costed_by_their_own_measured_kernels(tmp_path):
    # the search's figures for a Conv are its conv kernels' times at its own geometry, measured here
    from pruneaug.cost_model.model import cost_model
    from pruneaug.ir.graph import lift
    from pruneaug.passes.latency import conv_shape

    model, calib, eval_ = example("cnn")
    result = pruneaug.compile(model, calib=calib, eval=eval_, budget=0.05, measure="local", artifact=False,
                              blocks="8x8", sparsities="0.5,0.8", out=tmp_path / "out")
    costs = cost_model("x86", "local")
    layers = {layer.weight: layer for layer in lift(onnx.load(model), result.plan["input_shapes"]).layers()}
    convs = [entry for entry in result.plan["layers"] if entry["op_type"] == "Conv"]
    assert len(convs) == 3
    for entry in convs:
        conv = conv_shape(layers[entry["weight"]])
        predicted = costs.predict_conv(conv, tuple(entry["block"]), entry["sparsity"])
        assert entry["latency_source"] == predicted.source and predicted.source in ("measured", "fitted")
        assert entry["predicted_latency_s"] == pytest.approx(predicted.seconds)
        assert entry["dense_latency_s"] == pytest.approx(costs.predict_conv(conv, (8, 8), 0.0).seconds)
    # per conv: the dense kernel in each of its two block shapes, and the grid
    assert len(costs.cache.all_conv(costs.target.cache_key)) == 3 * (2 + 6)
