"""plan.json: the machine-readable record of what was pruned, how, and with which figures (schema 1).

    {"schema": 1, "target": "x86", "versions": {...}, "layers": [{"node": ..., "weight": ..., "shape": [out, in],
     "block": [r, c], "sparsity": 0.8, "nnz_blocks": 12, ...}], "totals": {...}, "budget": null, "metric": null}

Each plan under `search` (the chosen one and every baseline) also lists its per-layer plan,
`layers: {node: "RxC@sparsity" | "dense"}`, so that tools can rebuild (`rebuild`) and compile any of them.

Figures a step did not produce are null, never made up: a fixed plan has no proxy loss, a compile
with no cost model has no latency.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from importlib import metadata
from typing import Any

import numpy as np
import onnx

from pruneaug.errors import OptionError
from pruneaug.ir.graph import IRModel, lift
from pruneaug.ir.layer import BlockSpec
from pruneaug.passes.blockmask import apply_masks, assign_blocks, block_grid, block_scores, prunes_any
from pruneaug.passes.latency import runs_block_sparse

SCHEMA_VERSION = 1


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("pruneaug", "apache-tvm", "onnx", "onnxruntime"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def layer_entry(ir: IRModel, node: str) -> dict[str, Any]:
    """One layer's record, from the IR node's annotations (block, mask, and any figures passes left)."""
    data = ir.graph.nodes[node]
    layer = ir.layer(node)
    spec = data["block"]
    weight = ir.canonical_weight(node)
    grid = block_grid(layer.shape, spec.shape)
    nonzero_blocks = int(np.count_nonzero(block_scores(np.abs(weight), spec.shape, pool="max")))
    return {
        "node": node,
        "nodes": list(layer.nodes),
        "op_type": layer.op_type,
        "weight": layer.weight,
        "shape": list(layer.shape),
        "m": layer.m,
        "block": [spec.rows, spec.cols],
        "sparsity": spec.sparsity,
        "blocks": grid[0] * grid[1],
        "nnz_blocks": nonzero_blocks,
        # the share of blocks actually removed: `sparsity` of a few large blocks rounds to a whole count
        "block_sparsity": 1.0 - nonzero_blocks / (grid[0] * grid[1]),
        "weight_sparsity": float(1.0 - np.count_nonzero(weight) / weight.size),
        "proxy_loss": data.get("proxy_loss"),
        "dense_latency_s": data.get("dense_latency_s"),
        "predicted_latency_s": data.get("predicted_latency_s"),
        "latency_source": data.get("latency_source"),
        # the kernel the artifact runs it with: a given plan's pruned layer runs dense where that is faster
        "kernel": "block-sparse" if runs_block_sparse(data) else "dense",
        # the block shape the layer's dense kernel is built in (every block kept): its dense figures' and,
        # where it runs dense, the artifact's
        "dense_block": list(data["dense_block"]) if "dense_block" in data else None,
        "block_sparse_latency_s": data.get("block_sparse_latency_s"),
    }


def build_plan(ir: IRModel, target: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    layers = [layer_entry(ir, node) for node in ir.prunable_nodes()]
    weights = sum(entry["shape"][0] * entry["shape"][1] for entry in layers)
    zeros = sum(entry["weight_sparsity"] * entry["shape"][0] * entry["shape"][1] for entry in layers)
    plan: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "target": target,
        "versions": package_versions(),
        "layers": layers,
        "totals": {
            "prunable_layers": len(layers),
            "pruned_layers": sum(entry["nnz_blocks"] < entry["blocks"] for entry in layers),
            "prunable_weights": weights,
            "weight_sparsity": zeros / weights if weights else 0.0,
        },
        # the model's other linear nodes (`prunable.classify`), and why no kernel of ours prunes them
        "kept_dense": [{"node": node, "op_type": ir.graph.nodes[node]["proto"].op_type, "reason": why}
                       for node, why in ir.kept_dense.items()],
        "budget": None,
        "metric": None,
        "validated_metric": None,
    }
    plan.update(extra or {})
    return plan


DENSE_LAYER = "dense"


def layer_plan_text(block: tuple[int, int], sparsity: float) -> str:
    """`RxC@sparsity` (the float's repr, so it reads back exactly), or `dense` for a layer left dense."""
    return DENSE_LAYER if sparsity == 0 else f"{block[0]}x{block[1]}@{sparsity!r}"


def parse_layer_plan(text: str) -> BlockSpec:
    """The BlockSpec a `layers` entry of a plan.json baseline names (see `layer_plan_text`)."""
    if text == DENSE_LAYER:
        return BlockSpec(1, 1, 0.0)
    block, at, sparsity = text.partition("@")
    try:
        value = float(sparsity)
    except ValueError:
        value = None
    if not at or value is None:
        raise OptionError(f"layer plan {text!r}: expected RxC@SPARSITY or {DENSE_LAYER}")
    return BlockSpec.parse(block, value)


def rebuild(source: onnx.ModelProto, plan: Mapping[str, Any], layers: Mapping[str, str],
            calib_inputs: Mapping[str, np.ndarray] | None = None) -> IRModel:
    """The pruned IR of a recorded per-layer plan (`layers` of the search or a baseline), made as the compile made it.

    Same input shapes, pruner and reconstruction as `plan` records, so the chosen plan's `layers`
    give back pruned.onnx and a baseline's give the model that baseline validated.
    """
    from pruneaug.passes import importance
    from pruneaug.passes.reconstruct import reconstructor

    ir = lift(source, plan["input_shapes"])
    needs_calib = plan["pruner"] == "activation" or plan["reconstruct"]
    if needs_calib and calib_inputs is None:
        raise OptionError(f"rebuilding a plan pruned with {plan['pruner']!r} (reconstruct: {plan['reconstruct']}) "
                          "needs its calibration inputs")
    scored = importance.by_pruner(ir, plan["pruner"], calib_inputs)
    specs = {node: parse_layer_plan(text) for node, text in layers.items()}
    pruned = apply_masks(assign_blocks(scored, specs))
    if plan["reconstruct"] and prunes_any(spec.sparsity for spec in specs.values()):
        pruned = reconstructor(scored, calib_inputs)(pruned)
    return pruned


def _report_figures(report) -> dict[str, Any]:
    """One plan's figures for plan.json, with its per-layer plan (so a baseline can be rebuilt and compiled)."""
    return {
        "met": report.met,
        "metric_loss": report.metric_loss,
        "predicted_latency_s": report.predicted_latency_s,
        "validations": report.validations,
        "recalled": report.recalled,
        "blocks": sorted({f"{o.block[0]}x{o.block[1]}" for o in report.plan.values() if o.sparsity > 0}),
        "layers": {node: layer_plan_text(o.block, o.sparsity) for node, o in report.plan.items()},
    }


def search_record(report, baselines: dict[str, Any], metric: str) -> dict[str, Any]:
    """plan.json's `search` section: the chosen plan's figures, the search's validated trials, and the baselines.

    `validations` count onnxruntime runs; `recalled`, trials whose loss had been validated before (by an
    earlier compile, or in this one by the search for a baseline) and was read from the cache."""
    searches = list({id(r): r for r in baselines.values()}.values())
    return {
        "budget": report.budget,
        "metric": metric,
        **_report_figures(report),
        "proxy_budget": report.proxy_budget,
        "dense_latency_s": report.dense_latency_s,
        "message": report.message,
        "trials": [asdict(trial) for trial in baselines.get("searched", report).history],
        # "best single" (and "single 1x1") are other names of searches listed already: count each search once
        "validations_total": sum(r.validations for r in searches) or report.validations,
        "recalled_total": sum(r.recalled for r in searches) or report.recalled,
        "baselines": {name: _report_figures(result) for name, result in baselines.items()},
    }
