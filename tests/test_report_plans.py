"""plan.json records every compared plan layer by layer, and a recorded plan rebuilds into the model it named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import pruneaug
from pruneaug.errors import OptionError
from pruneaug.ir.graph import lower
from pruneaug.ir.onnx_io import load_model
from pruneaug.plan import layer_plan_text, parse_layer_plan, rebuild

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_layer_plans_read_back_exactly():
    for block, sparsity in (((8, 8), 0.8), ((1, 1), 0.15000000000000002), ((4, 1), 0.0)):
        spec = parse_layer_plan(layer_plan_text(block, sparsity))
        assert (spec.sparsity, spec.shape) == (sparsity, block if sparsity else (1, 1))
    assert layer_plan_text((4, 1), 0.0) == "dense"
    for text in ("8x8", "8x8@half", "8by8@0.5"):
        with pytest.raises(OptionError, match="8"):
            parse_layer_plan(text)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.slow
def test_recorded_plans_rebuild_into_the_models_they_name(tmp_path):
    model = EXAMPLES / "mlp" / "model.onnx"
    result = pruneaug.compile(model, calib=EXAMPLES / "mlp" / "calib.npz", eval=EXAMPLES / "mlp" / "eval.npz",
                              measure="none", artifact=False, out=tmp_path / "out")
    plan, search = result.plan, result.plan["search"]
    source = load_model(model)
    assert search["layers"] == {e["node"]: layer_plan_text(tuple(e["block"]), e["sparsity"]) for e in plan["layers"]}
    chosen = weights(lower(rebuild(source, plan, search["layers"])))
    written = weights(onnx.load(result.pruned_model))
    assert all(np.array_equal(written[name], chosen[name]) for name in written)
    for name, figures in search["baselines"].items():
        rebuilt = rebuild(source, plan, figures["layers"])
        for node in rebuilt.prunable_nodes():
            spec = rebuilt.graph.nodes[node]["block"]
            assert layer_plan_text(spec.shape, spec.sparsity) == figures["layers"][node], name
    dense = weights(lower(rebuild(source, plan, search["baselines"]["dense"]["layers"])))
    assert all(np.array_equal(array, dense[name]) for name, array in weights(source).items())
    with pytest.raises(OptionError, match="needs its calibration inputs"):
        rebuild(source, {**plan, "pruner": "activation"}, search["layers"])


def test_a_search_that_returned_the_dense_plan_shows_no_loss_of_its_own():
    """A baseline whose search met the budget with no pruned plan returns the dense plan: its table row says
    so instead of the dense plan's loss of 0 beside "no"."""
    from pruneaug.report import _baseline_rows

    plan = {"search": {"chosen_from": "searched", "predicted_latency_s": 2e-6, "dense_latency_s": 4e-6,
                       "metric_loss": 0.004, "met": True,
                       "baselines": {"single 32x32": {"predicted_latency_s": 4e-6, "metric_loss": 0.0, "met": False},
                                     "unstructured": {"predicted_latency_s": 3e-6, "metric_loss": 0.008, "met": True}}}}
    rows = {row[0]: row[3:] for row in _baseline_rows(plan)}
    assert rows["chosen (= searched)"] == ["0.0040", "yes"]
    assert rows["single 32x32"] == ["–", "no (the dense plan is returned)"]
    assert rows["unstructured"] == ["0.0080", "yes"]
