"""The process-interleaved timer: every competitor timed in its own worker, failures reported, never raised."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fresh_python import run_python
from pruneaug import deploy, timing
from pruneaug.passes import ort_run
from pruneaug.report import render_markdown
from pruneaug.timing import Competitor, rotated, time_interleaved, worker_main

INPUTS = {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}


def linear_model(seed: int) -> onnx.ModelProto:
    weight = np.random.default_rng(seed).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def models(tmp_path) -> list[Path]:
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"model{seed}.onnx")
        onnx.save(linear_model(seed), paths[-1])
    return paths


def test_rotated_starts_each_round_at_the_next_competitor():
    assert [rotated("abc", r) for r in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    assert rotated([], 3) == []


def test_worker_answers_ready_then_run_times(models):
    answers = io.StringIO()
    inputs_file = models[0].parent / "inputs.npz"
    np.savez(inputs_file, **INPUTS)
    code = worker_main(["onnxruntime", str(models[0]), str(inputs_file), "1", "1"], io.StringIO("3\n2\n"), answers)
    replies = [json.loads(line) for line in answers.getvalue().splitlines()]
    assert code == 0 and replies[0]["ready"] is True and replies[0]["run_s"] > 0
    assert [len(r) for r in replies[1:]] == [3, 2] and all(s > 0 for r in replies[1:] for s in r)


@pytest.mark.parametrize("run_s,calls", [(0.001, 2 + 1 + 3), (timing.LONG_RUN_S, 2 + 3)])
def test_worker_skips_the_untimed_run_before_a_block_of_long_runs(monkeypatch, tmp_path, run_s, calls):
    made = []
    monkeypatch.setattr(timing, "_timed_run", lambda *args: lambda: made.append(run_s) or run_s)
    np.savez(tmp_path / "inputs.npz", **INPUTS)
    answers = io.StringIO()
    worker_main(["onnxruntime", "model.onnx", str(tmp_path / "inputs.npz"), "1", "2"], io.StringIO("3\n"), answers)
    assert json.loads(answers.getvalue().splitlines()[0]) == {"ready": True, "run_s": run_s}
    assert len(made) == calls  # 2 warm-up runs, the untimed one where runs are short, 3 timed


def test_runs_per_round_shrink_so_that_a_budget_holds_its_rounds():
    assert timing.runs_per_round(10.0, [1e-4, 2e-4], 5) == 5  # small models: the runs asked for
    assert timing.runs_per_round(10.0, [None, None], 5) == 5  # no warm-up figures: unchanged
    # BERT-sized: 0.3 s a run for each of three competitors (no untimed runs): 6 rounds of one run fit in 10 s
    assert timing.runs_per_round(10.0, [0.3, 0.3, 0.3], 5) == 1
    assert timing.runs_per_round(10.0, [0.25, 0.25], 5) == 3  # 10 s / 6 rounds / 0.5 s a run of each
    assert timing.runs_per_round(10.0, [0.05, 0.05], 5) == 5  # 1.67 s a round, less two untimed runs: 15 fit
    assert timing.runs_per_round(6.0, [0.05, 1.0], 5) == 1  # never fewer than one


@pytest.mark.parametrize("kind,name,reason", [("artifact", "missing.so", "no such artifact"),
                                               ("onnxruntime", "gone.onnx", "no such model")])
def test_worker_reports_a_load_failure_as_one_answer(tmp_path, kind, name, reason):
    answers = io.StringIO()
    np.savez(tmp_path / "inputs.npz", **INPUTS)
    code = worker_main([kind, str(tmp_path / name), str(tmp_path / "inputs.npz"), "1", "0"], io.StringIO(""), answers)
    assert code == 1
    assert json.loads(answers.getvalue()) == {"error": f"ModelError: {tmp_path / name}: {reason}"}


def test_every_competitor_is_timed_in_every_round(models):
    run = time_interleaved([Competitor("a", "onnxruntime", models[0]), Competitor("b", "onnxruntime", models[1])],
                           INPUTS, threads=1, rounds=3, runs=2, settle_s=0)
    assert run.repeat == 6 and run.threads == 1
    for timing_ in run.results.values():
        assert timing_.error is None and len(timing_.seconds) == 6
        assert 0 < timing_.p10_s <= timing_.median_s <= timing_.p90_s
    assert "own process" in run.method() and "spinning off" in run.method()


def test_a_time_budget_ends_the_rounds_after_the_least_number(models):
    competitors = [Competitor("a", "onnxruntime", models[0]), Competitor("b", "onnxruntime", models[1])]
    run = time_interleaved(competitors, INPUTS, threads=1, rounds=50, runs=2, settle_s=0.05, budget_s=0.0)
    assert run.rounds == timing.MIN_ROUNDS and run.runs == 1  # a zero budget holds one run per round
    assert run.repeat == timing.MIN_ROUNDS
    assert all(len(t.seconds) == run.repeat for t in run.results.values())
    assert str(timing.MIN_ROUNDS) in run.method()


def test_a_competitor_that_fails_to_load_leaves_the_others_timed(models, tmp_path):
    run = time_interleaved([Competitor("ort", "onnxruntime", models[0]),
                            Competitor("ours", "artifact", tmp_path / "missing.so")], INPUTS, threads=1, rounds=2,
                           runs=2, settle_s=0)
    assert len(run.results["ort"].seconds) == 4
    ours = run.results["ours"]
    assert ours.median_s is None and ours.error == f"ours: ModelError: {tmp_path / 'missing.so'}: no such artifact"


CRASHING_WORKER = ("import json, os, signal, sys; sys.stderr.write('native trouble ahead\\n'); sys.stderr.flush(); "
                   "print(json.dumps({'ready': True}), flush=True); sys.stdin.readline(); "
                   "os.kill(os.getpid(), signal.SIGSEGV)")


def test_a_worker_that_crashes_is_named_with_its_signal_and_stderr(monkeypatch, models):
    monkeypatch.setattr(timing, "WORKER", (sys.executable, "-c", CRASHING_WORKER))
    run = time_interleaved([Competitor("ours", "artifact", models[0])], INPUTS, threads=1, rounds=2, runs=1,
                           settle_s=0)
    error = run.results["ours"].error
    assert error.startswith("ours: its timing worker died (killed by SIGSEGV)")
    assert "native trouble ahead" in error and run.results["ours"].seconds == []


def test_a_worker_that_hangs_is_given_up(monkeypatch, models):
    monkeypatch.setattr(timing, "WORKER", (sys.executable, "-c", "import time; time.sleep(60)"))
    monkeypatch.setattr(timing, "REPLY_TIMEOUT_S", 0.5)
    run = time_interleaved([Competitor("slow", "onnxruntime", models[0])], INPUTS, threads=1, rounds=1, runs=1)
    assert run.results["slow"].error == "slow: its timing worker gave no answer in 0.5 s"


def test_bad_requests_are_refused(models):
    with pytest.raises(ValueError, match="kind 'tflite'"):
        Competitor("a", "tflite", models[0])
    with pytest.raises(ValueError, match="names must differ"):
        time_interleaved([Competitor("a", "onnxruntime", m) for m in models], INPUTS, threads=1)
    with pytest.raises(ValueError, match="rounds 0"):
        time_interleaved([Competitor("a", "onnxruntime", models[0])], INPUTS, threads=1, rounds=0)


def test_sessions_for_timing_do_not_spin():
    quiet = ort_run.make_session(linear_model(0), 1, spinning=False)
    assert quiet.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_failed_artifact_measurement_is_recorded_and_reported(tmp_path):
    latency = deploy.measure_model_latency(linear_model(0), linear_model(1), tmp_path / "model.x86.so", INPUTS,
                                           repeat=4, runs_per_round=2)
    assert latency["repeat"] == 4 and latency["rounds"] == 2 and latency["threads"] >= 1
    assert latency["onnxruntime_dense_s"] > 0 and latency["onnxruntime_pruned_s"] > 0
    assert latency["tvm_pruned_s"] is None
    assert latency["errors"] == {"tvm_pruned_s": f"ModelError: {tmp_path / 'model.x86.so'}: no such artifact"}
    dense = "onnxruntime_dense_s"
    assert latency["p10_s"][dense] <= latency[dense] <= latency["p90_s"][dense]
    assert "spinning off" in latency["note"]
    plan = {"target": "x86", "layers": [], "model_latency": latency,
            "totals": {"prunable_layers": 0, "prunable_weights": 0, "weight_sparsity": 0.0}}
    report = render_markdown(plan, pareto=False)
    assert "| onnxruntime, dense model |" in report
    assert "| pruneaug artifact (TVM, block-sparse) | measurement failed: ModelError:" in report


def test_a_gpu_artifacts_timing_says_onnxruntime_ran_on_the_cpu_for_reference_only():
    latency = {"onnxruntime_dense_s": 4e-4, "onnxruntime_pruned_s": 3e-4, "tvm_pruned_s": 3e-5, "repeat": 50,
               "threads": 2, "device": "cuda", "note": f"measured on this host{deploy.GPU_NOTE}"}
    plan = {"target": "cuda:sm_90", "layers": [], "model_latency": latency,
            "totals": {"prunable_layers": 0, "prunable_weights": 0, "weight_sparsity": 0.0}}
    report = render_markdown(plan, pareto=False)
    assert "| onnxruntime, dense model on the CPU | 400.0 µs |" in report
    assert "| pruneaug artifact (TVM, block-sparse) on the GPU | 30.0 µs |" in report
    assert "not the baseline a GPU user would pick" in report


def test_the_whole_model_is_timed_wherever_its_artifact_runs_and_picked_only_on_the_host(monkeypatch):
    from pruneaug import runtime
    from pruneaug.cost_model.targets import resolve_target

    for has_gpu in (False, True):
        monkeypatch.setattr(runtime, "has_cuda_gpu", lambda: has_gpu)
        assert deploy.runs_here(resolve_target("cuda")) == has_gpu
        assert not deploy.picks_here(resolve_target("cuda"))
    assert deploy.runs_here(resolve_target("x86")) and deploy.picks_here(resolve_target("x86"))
    assert not deploy.runs_here(resolve_target("arm64"))


def test_models_on_disk_are_timed_from_their_own_files(models, tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(deploy, "save_model", lambda model, path: saved.append(path))
    latency = deploy.measure_model_latency(models[0], models[1], tmp_path / "model.x86.so", INPUTS,
                                           repeat=2, runs_per_round=2)
    assert saved == []  # nothing written again: the workers read the given files
    assert latency["onnxruntime_dense_s"] > 0 and latency["onnxruntime_pruned_s"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_freed_heap_goes_back_to_the_os():
    # 1000 blocks of 100 KB (below malloc's mmap threshold: on the heap), all freed but the last, which
    # pins the heap's top: the freed pages stay resident until release_freed_memory trims them.
    script = ("import os\n"
              "from pruneaug.deploy import release_freed_memory\n"
              "page = os.sysconf('SC_PAGE_SIZE')\n"
              "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * page\n"
              "blocks = [bytearray(100_000) for _ in range(1000)]\n"
              "last = blocks[-1]\n"
              "del blocks\n"
              "before = rss()\n"
              "release_freed_memory()\n"
              "print(before - rss())\n")
    assert int(run_python(script)) > 50_000_000
