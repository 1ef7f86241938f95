"""`tools/bench_plans.py`'s floor: the plan every goal's reach is judged against."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import numpy_helper

from pruneaug.ir.graph import lift, lower
from pruneaug.ir.onnx_io import load_model
from pruneaug.plan import rebuild
from tool_module import load_tool

bench_plans = load_tool("bench_plans")
CNN = Path(__file__).resolve().parent.parent / "examples" / "cnn" / "model.onnx"


def _plan(source) -> dict:
    """The parts of a plan.json that the floor and `rebuild` read."""
    shapes = {"input": [1, 1, 8, 8]}
    nodes = lift(source, shapes).prunable_nodes()
    return {"input_shapes": shapes, "pruner": "magnitude", "reconstruct": False,
            "search": {"layers": {node: "dense" for node in nodes}}}


def test_the_floor_empties_every_prunable_layer_in_the_largest_default_block_that_fits_it():
    source = load_model(CNN)
    plan = _plan(source)
    layers = bench_plans.floor_layers(source, plan)
    # weights as out x (in * kh * kw): 32x1, 64x288, 64x576, 128x1024, 10x128; default blocks up to 32x32
    assert layers == {"pointwise/Conv": "16x1@1.0", "conv1/Conv": "32x32@1.0", "conv2/Conv": "32x32@1.0",
                      "fc1/Gemm": "32x32@1.0", "fc2/Gemm": "8x8@1.0"}
    dense, floor = lift(source, plan["input_shapes"]), rebuild(source, plan, layers)
    for node in dense.prunable_nodes():
        assert not np.any(floor.canonical_weight(node)), node
    kept = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer if t.name not in floor.weights}
    lowered = {t.name: numpy_helper.to_array(t) for t in lower(floor).graph.initializer}
    assert "fc1.bias" in kept and all(np.array_equal(lowered[name], value) for name, value in kept.items())


def test_the_floor_is_listed_as_not_validated():
    source = load_model(CNN)
    figures = bench_plans.floor_figures(source, _plan(source))
    assert figures["met"] is None and figures["metric_loss"] is None and figures["predicted_latency_s"] is None
    assert figures["blocks"] == ["16x1", "32x32", "8x8"]
    assert figures["layers"] == bench_plans.floor_layers(source, _plan(source))


def _timed(median_us: float, p10_us: float, p90_us: float):
    from pruneaug.timing import Timing

    return Timing("t", [p10_us * 1e-6] * 20 + [median_us * 1e-6] * 60 + [p90_us * 1e-6] * 20)


def test_a_goal_is_met_by_the_median_and_the_p10_and_never_by_a_baseline_that_is_the_chosen_plan():
    chosen = {"predicted_latency_s": 1e-5, "layers": {"fc1": "8x8@0.5"}}
    figures = {"predicted_latency_s": 2e-5, "layers": {"fc1": "1x1@0.7"}}
    together = {"chosen": _timed(10, 9, 11), "best single": _timed(13, 12, 14), "floor": _timed(5, 4, 6)}
    Built = bench_plans.Built
    plans = {"chosen": Built(chosen, None, 0.5, 1e6, "serial"),
             "best single": Built(figures, None, 0.5, 1e6, "parallel"),
             "floor": Built(figures, None, 1.0, 0.0, "parallel")}
    search = {"predicted_latency_s": 1e-5}
    line = bench_plans.goal_line("best single", 1.25, plans, together, search)
    assert line.startswith("chosen vs best single: 1.30x side by side (p10: 1.33x") and "predicted 2.00x" in line
    assert "goal >= 1.25x: met" in line and "floor bounds any plan to 2.60x" in line
    together["best single"] = _timed(12, 12, 14)  # the median falls short
    assert "goal >= 1.25x: not met" in bench_plans.goal_line("best single", 1.25, plans, together, search)
    # one plan, one artifact: a pick between its builds that differed once read as a speed-up before
    plans["best single"] = Built({**chosen, "predicted_latency_s": 2e-5}, None, 0.5, 1e6, "serial, as chosen")
    together["best single"] = _timed(13, 12, 14)
    line = bench_plans.goal_line("best single", 1.25, plans, together, search)
    assert "the same plan" in line and line.endswith("not met")


def test_the_kernels_column_says_which_build_was_kept_and_by_how_much_the_parallel_one_ran_faster():
    assert bench_plans.kernels_kept({"kept": "parallel", "median_s": {"parallel": 1e-4, "serial": 1.5e-4}}) == \
        "parallel (parallel 1.50x faster)"
    assert bench_plans.kernels_kept({"kept": "serial", "median_s": {"parallel": 1e-4, "serial": None}}) == \
        "serial (parallel – faster)"
    assert bench_plans.kernels_kept({"skipped": "the target has one core"}) == "parallel (the target has one core)"
    assert bench_plans.kernels_kept(None) == "parallel (not timed)"
    assert bench_plans.kernels_kept({"kept": "serial", "median_s": {"serial": 1e-4}}) == \
        "serial (no kernel uses the thread pool)"
    assert bench_plans.kernels_kept({"kept": "serial", "skipped": "no kernel pays"}) == "serial (no kernel pays)"


def test_kernel_work_counts_two_flop_per_kept_block_weight_per_row_and_its_rates_use_the_floor():
    layers = [{"m": 16, "nnz_blocks": 3, "block": [8, 8]}, {"m": 4, "nnz_blocks": 10, "block": [1, 1]}]
    assert bench_plans.kernel_work(layers) == 2 * 16 * 3 * 64 + 2 * 4 * 10
    Built = bench_plans.Built
    plans = {"chosen": Built({"predicted_latency_s": 4e-6}, None, 0.5, 8e4, "serial"),
             "floor": Built({"predicted_latency_s": None}, None, 1.0, 0.0, "serial")}
    together = {"chosen": _timed(10, 9, 11), "floor": _timed(6, 5, 7)}
    assert bench_plans.work_rates("chosen", plans, together) == "20 / 20"  # 8e4 FLOP in 4 µs, both ways
    assert bench_plans.work_rates("floor", plans, together) == "– / –"  # no work, no prediction
    del plans["floor"]
    assert bench_plans.work_rates("chosen", plans, together) == "20 / –"  # no floor: no in-model rate
