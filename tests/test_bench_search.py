"""`tools/bench_search.py --latency weights`: the search as a sparsity maximiser, how the reconstruction goal is read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from pruneaug.ir.graph import lift
from pruneaug.options import DEFAULT_SPARSITIES, parse_sparsities
from pruneaug.passes import importance
from pruneaug.passes.proxy import measure_sensitivities
from pruneaug.passes.search import search
from pruneaug.passes.validate import make_validator
from tool_module import load_tool

bench_search = load_tool("bench_search")
MLP = Path(__file__).resolve().parent.parent / "examples" / "mlp"


def test_kept_weights_cost_what_a_layer_keeps_and_the_search_under_them_meets_the_budget():
    model = onnx.load(MLP / "model.onnx")
    calib, evaluation = dict(np.load(MLP / "calib.npz")), dict(np.load(MLP / "eval.npz"))
    labels = evaluation.pop("labels", None)
    dense = lift(model)
    layer = dense.layer(dense.prunable_nodes()[0])
    out, in_ = layer.shape
    cost = bench_search.latency_fn("weights")
    assert cost(layer, (8, 8), 0.75) == cost(layer, (1, 1), 0.75) == out * in_ / 4 + 1e-9  # any block alike
    validate = make_validator(dense, evaluation, labels, "top1")
    ir = measure_sensitivities(importance.by_pruner(dense, "magnitude", calib), calib)
    pruned, report = search(ir, cost, validate, 0.01, [(8, 8)], parse_sparsities(DEFAULT_SPARSITIES))
    assert report.met and report.metric_loss <= 0.01 and bench_search.weight_sparsity(pruned) > 0.1
