"""The GPU tools of tools/: without a GPU they refuse with one line; with one (and onnx2torch) the
whole-model bench times a real artifact after checking it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tool_module import TOOLS, load_tool

import zoo
from devices import requires_cuda_gpu
from pruneaug.runtime import has_cuda_gpu


@pytest.mark.skipif(has_cuda_gpu(), reason="this machine has a CUDA GPU: the tools run")
@pytest.mark.parametrize("tool,args", [("bench_cuda", ["--part", "conv"]),
                                       ("bench_cuda_model", ["--dense", "model.onnx", "out"]),
                                       ("profile_cuda", ["out"])])
def test_a_gpu_tool_without_a_gpu_says_so_and_fails(tool, args):
    result = subprocess.run([sys.executable, str(TOOLS / f"{tool}.py"), *args], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"{tool}: no CUDA GPU here (or TVM's runtime was built without CUDA)")


@requires_cuda_gpu
def test_the_whole_model_bench_checks_then_times_a_cuda_artifact(tmp_path):
    pytest.importorskip("onnx2torch")
    import onnx

    from pruneaug.codegen.export import export_artifact, model_signature
    from pruneaug.codegen.relax_build import build_model
    from pruneaug.cost_model.targets import resolve_target

    model, shapes = zoo.mlp(), {"x": [1, 64]}
    onnx.save(model, tmp_path / "model.onnx")
    onnx.save(model, tmp_path / "pruned.onnx")
    cuda = resolve_target("cuda")
    export_artifact(build_model(model, {}, cuda, shapes), cuda, tmp_path / "model.cuda",
                    model_signature(model, shapes))
    (tmp_path / "plan.json").write_text(json.dumps({"totals": {"weight_sparsity": 0.0}}))
    row = load_tool("bench_cuda_model").bench_folder(Path(tmp_path), tmp_path / "model.onnx", None, rounds=2, number=2)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "1x64" and float(cells[3]) > 0 and cells[6].endswith("x")


def test_the_cuda_cost_model_predicts_held_out_h100_kernel_times():
    # the shipped H100 times (tools/data/bench_cuda_h100.md): the CUDA defaults were fitted to the
    # other half of them, and must keep predicting this half (the throughput terms before: 26%, 57%)
    from pruneaug.cost_model import analytical
    from pruneaug.cost_model.targets import resolve_target

    fit = load_tool("fit_cuda_cost_model")
    matmuls, convs = fit.read_tables(TOOLS / "data" / "bench_cuda_h100.md")
    held_out = [p for p in matmuls if not p[-1]]
    assert (len(matmuls), len(held_out), len(convs)) == (368, 168, 120)
    gpu = resolve_target("cuda:sm_90")
    predicted = analytical.latency_from_features(analytical.default_params(gpu), fit.features(gpu, held_out))
    measured = np.array([p[6] for p in held_out])
    assert np.mean(abs(predicted / measured - 1) <= 0.25) >= 0.6
    faster = [(predicted[i] < predicted[i + 1]) == (measured[i] < measured[i + 1]) for i in range(0, len(measured), 2)]
    assert np.mean(faster) >= 0.9
    # the convs it did not see: stride 2, and a 1x1 conv whose threads read X itself (no gather)
    held_out_convs = [p for p in convs if not p[-1]]
    assert {p[5] for p in held_out_convs} == {"cuda_conv", "cuda_conv_1x1", "cuda_split"}
    predicted = analytical.latency_from_features(analytical.default_params(gpu), fit.features(gpu, held_out_convs))
    assert np.mean(abs(predicted / np.array([p[6] for p in held_out_convs]) - 1) <= 0.25) >= 0.6


def test_the_cuda_matmul_layout_picked_is_the_faster_on_an_h100():
    # every matmul row of the shipped H100 times, both layouts timed: the pick (`schedule.kernel_schedule`)
    # must be the faster in most rows and cost little where it is not
    from pruneaug.codegen.schedule import kernel_schedule
    from pruneaug.cost_model import analytical
    from pruneaug.cost_model.targets import resolve_target

    matmuls, _ = load_tool("fit_cuda_cost_model").read_tables(TOOLS / "data" / "bench_cuda_h100.md")
    gpu = resolve_target("cuda:sm_90")
    slowdowns = []
    for along_m, split in zip(matmuls[::2], matmuls[1::2]):
        out, in_, m, block, density = along_m[:5]
        picked = kernel_schedule(gpu, m, out, in_, block, int(analytical.kept_blocks(out, in_, block, density))).layout
        slowdowns.append((along_m if picked == "cuda" else split)[6] / min(along_m[6], split[6]))
    assert np.mean(np.array(slowdowns) == 1.0) >= 0.85 and np.exp(np.mean(np.log(slowdowns))) <= 1.06
