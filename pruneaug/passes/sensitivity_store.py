"""Layer sensitivities and the proxy's energy shares kept across compiles: the same model and
calibration data are probed once, and its layers' importance partitioned once per block and grid.

Sensitivities do not depend on the target, the budget or the metric, yet measuring them is most of
a large model's search (BERT-base: 72 layers x 3 probes, each a whole-model onnxruntime run). A
deployment engineer compiles one model for several targets and budgets, so `sensitivities` keeps
them in the latency cache's file (`cost_model.cache`, table `records`) under a digest of everything
they depend on: the graph, every weight, each layer's importance (so the pruner), the calibration
inputs, the probe settings, the proxy's source and the onnxruntime version. Anything else changes
the digest, and the probes run again.

    >>> ir = sensitivities(scored_ir, calib.inputs, open_cache())     # probes, then stores
    >>> ir = sensitivities(scored_ir, calib.inputs, open_cache())     # reads them back: no onnxruntime run

`cached_shares(cache)` serves `search.search_space` the same way: the energy share table
(`proxy.energy_share_table`, ~4 s of partitions for BERT-base) under a digest of the layers'
importance, their usable blocks, the sparsity grid, the pool and the proxy's source.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime

from pruneaug.cost_model.cache import record_key
from pruneaug.ir.graph import IRModel
from pruneaug.passes import proxy

RECORD_KIND = "sensitivity"
SHARES_KIND = "energy shares"


def digest(ir: IRModel, calib_inputs: Mapping[str, np.ndarray], settings: Mapping) -> str:
    """A hash of everything the probes' results depend on (`record_key`: every weight and importance,
    680 MB for BERT-base, read in place)."""

    def parts():
        yield from (Path(proxy.__file__).read_bytes(), onnxruntime.__version__, json.dumps(settings, sort_keys=True))
        for node in ir.source.graph.node:
            yield node.SerializeToString(deterministic=True)
        for name in sorted(ir.weights):
            array = np.ascontiguousarray(ir.weights[name])
            yield from (name, str(array.dtype), str(array.shape), array.data)
        for node in ir.prunable_nodes():
            importance = np.ascontiguousarray(ir.graph.nodes[node]["importance"])
            yield from (node, str(importance.dtype), importance.data)
        for name in sorted(calib_inputs):
            array = np.ascontiguousarray(calib_inputs[name])
            yield from (name, str(array.dtype), str(array.shape), array.data)

    return record_key(parts())


def _encode(ir: IRModel) -> str:
    return json.dumps({
        node: {"shares": list(s.shares), "errors": list(s.errors),
               "block_scales": [[list(block), scale] for block, scale in s.block_scales.items()]}
        for node in ir.prunable_nodes() for s in [ir.graph.nodes[node]["sensitivity"]]
    })


def _decode(text: str, ir: IRModel) -> IRModel | None:
    """The IR with the stored sensitivities, or None where they do not name exactly its prunable nodes."""
    stored = json.loads(text)
    if set(stored) != set(ir.prunable_nodes()):
        return None
    result = ir.copy()
    for node, entry in stored.items():
        scales = {tuple(block): float(scale) for block, scale in entry["block_scales"]}
        result.graph.nodes[node]["sensitivity"] = proxy.Sensitivity(tuple(entry["shares"]), tuple(entry["errors"]),
                                                                    scales)
    return result


def sensitivities(ir: IRModel, calib_inputs: Mapping[str, np.ndarray], cache,
                  probe_shares: Sequence[float] = proxy.PROBE_SHARES,
                  probe_block: tuple[int, int] = proxy.PROBE_BLOCK, blocks: Sequence[tuple[int, int]] = (),
                  pool: str = "l2") -> tuple[IRModel, bool]:
    """`proxy.measure_sensitivities`, read from `cache` where this model and data were probed before.

    Returns the annotated IR and whether the figures came from the cache.
    """
    settings = {"probe_shares": list(probe_shares), "probe_block": list(probe_block),
                "blocks": [list(b) for b in blocks], "pool": pool}
    key = digest(ir, calib_inputs, settings)
    stored = cache.get_record(RECORD_KIND, key)
    try:
        recalled = _decode(stored, ir) if stored is not None else None
    except (ValueError, KeyError, TypeError):  # a damaged record: measure again and replace it
        recalled = None
    if recalled is not None:
        return recalled, True
    measured = proxy.measure_sensitivities(ir, calib_inputs, probe_shares, probe_block, blocks, pool)
    cache.put_record(RECORD_KIND, key, _encode(measured))
    return measured, False


def cached_shares(cache):
    """A `search.SharesFn` that reads the table from `cache` where the same importance, blocks and grid
    were partitioned before, and otherwise computes (`proxy.energy_share_table`) and stores it."""

    def shares(ir: IRModel, blocks: Mapping[str, Sequence[tuple[int, int]]], sparsities: Sequence[float],
               pool: str) -> proxy.ShareTable:
        settings = {"blocks": {node: [list(b) for b in usable] for node, usable in blocks.items()},
                    "sparsities": [float(s) for s in sparsities], "pool": pool}

        def parts():
            yield from (Path(proxy.__file__).read_bytes(), json.dumps(settings, sort_keys=True))
            for node in blocks:
                importance = np.ascontiguousarray(ir.graph.nodes[node]["importance"])
                yield from (node, str(importance.dtype), str(importance.shape), importance.data)

        key = record_key(parts())
        stored = cache.get_record(SHARES_KIND, key)
        try:
            table = json.loads(stored) if stored is not None else None
            if table is not None and all(len(table[node]) == len(usable) for node, usable in blocks.items()):
                return {node: [np.array(row, np.float64) for row in table[node]] for node in blocks}
        except (ValueError, KeyError, TypeError):  # a damaged record: compute again and replace it
            pass
        computed = proxy.energy_share_table(ir, blocks, sparsities, pool)
        cache.put_record(SHARES_KIND, key, json.dumps({node: [row.tolist() for row in rows]
                                                       for node, rows in computed.items()}))
        return computed

    return shares
