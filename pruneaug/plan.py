"""plan.json: the machine-readable record of what was pruned, how, and with which figures (schema 1).

    {"schema": 1, "target": "x86", "versions": {...}, "layers": [{"node": ..., "weight": ..., "shape": [out, in],
     "block": [r, c], "sparsity": 0.8, "nnz_blocks": 12, ...}], "totals": {...}, "budget": null, "metric": null}

Figures a step did not produce are null, never made up: a fixed plan has no proxy loss, a compile
with no cost model has no latency.
"""
from __future__ import annotations

from dataclasses import asdict
from importlib import metadata
from typing import Any

import numpy as np

from pruneaug.ir.graph import IRModel
from pruneaug.passes.blockmask import block_grid, block_scores

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
        "weight_sparsity": float(1.0 - np.count_nonzero(weight) / weight.size),
        "proxy_loss": data.get("proxy_loss"),
        "dense_latency_s": data.get("dense_latency_s"),
        "predicted_latency_s": data.get("predicted_latency_s"),
        "latency_source": data.get("latency_source"),
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
            "prunable_weights": weights,
            "weight_sparsity": zeros / weights if weights else 0.0,
        },
        "budget": None,
        "metric": None,
        "validated_metric": None,
    }
    plan.update(extra or {})
    return plan


def _report_figures(report) -> dict[str, Any]:
    return {
        "met": report.met,
        "metric_loss": report.metric_loss,
        "predicted_latency_s": report.predicted_latency_s,
        "validations": report.validations,
        "blocks": sorted({f"{o.block[0]}x{o.block[1]}" for o in report.plan.values() if o.sparsity > 0}),
    }


def search_record(report, baselines: dict[str, Any], metric: str) -> dict[str, Any]:
    """plan.json's `search` section: the chosen plan's figures, the search's validated trials, and the baselines."""
    return {
        "budget": report.budget,
        "metric": metric,
        **_report_figures(report),
        "proxy_budget": report.proxy_budget,
        "dense_latency_s": report.dense_latency_s,
        "message": report.message,
        "trials": [asdict(trial) for trial in baselines.get("searched", report).history],
        "validations_total": sum(result.validations for result in baselines.values()) or report.validations,
        "baselines": {name: _report_figures(result) for name, result in baselines.items()},
    }
