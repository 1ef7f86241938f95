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
importance, their usable blocks, the sparsity grid, the pool and the proxy's and blockmask's source.

`validation_memo(...)` keeps the search's end-to-end validations (`search.ValidationMemo`): a plan's
metric loss under a digest of the plan and of everything its pruned model and the metric depend on
(the model digest above, the eval data and labels, the metric, the pool, the reconstruction's
calibration data, the IR, pruning, reconstruction and validation code, the onnxruntime version).
Compiling again for another budget or target re-runs only the plans not validated before.

`stored_probe(...)` keeps the search's single-layer probes (`proxy.SingleLayerProbe`, with
`--reconstruct`) the same way, under the model digest, the calibration inputs and the code they run.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from onnx import numpy_helper

from pruneaug.cost_model.cache import record_key
from pruneaug.ir import graph, layer, prunable, weights
from pruneaug.ir.graph import IRModel
from pruneaug.passes import blockmask, ort_run, proxy, reconstruct, search, validate

RECORD_KIND = "sensitivity"
SHARES_KIND = "energy shares"
VALIDATION_KIND = "validation"
PROBE_KIND = "layer probe"


def model_digest(ir: IRModel) -> str:
    """A hash of the graph (its nodes, inputs, outputs and opsets), every initializer (the prunable
    weights as the IR holds them, the rest as stored: biases, norms, embeddings) and each layer's
    importance (so the pruner): 680 MB for BERT-base, read in place (`record_key`), so a compile
    computes it once for all its records."""
    source = ir.source

    def parts():
        for item in (*source.graph.node, *source.graph.input, *source.graph.output, *source.opset_import):
            yield item.SerializeToString(deterministic=True)
        for name in sorted(ir.weights):
            yield from _array_parts(name, ir.weights[name])
        for tensor in source.graph.initializer:
            if tensor.name not in ir.weights:
                yield from _array_parts(tensor.name, numpy_helper.to_array(tensor))
        for node in ir.prunable_nodes():
            yield from _array_parts(node, ir.graph.nodes[node]["importance"])

    return record_key(parts())


def digest(ir: IRModel, calib_inputs: Mapping[str, np.ndarray], settings: Mapping, model_key: str | None = None) -> str:
    """A hash of everything the probes' results depend on; `model_key`: `model_digest(ir)`, if known."""

    def parts():
        yield from (Path(proxy.__file__).read_bytes(), onnxruntime.__version__, json.dumps(settings, sort_keys=True),
                    model_key or model_digest(ir))
        for name in sorted(calib_inputs):
            yield from _array_parts(name, calib_inputs[name])

    return record_key(parts())


def _array_parts(name: str, array: np.ndarray) -> Iterator[str | memoryview]:
    """An array's name, type, shape and bytes (read in place) as `record_key` parts."""
    array = np.ascontiguousarray(array)
    yield from (name, str(array.dtype), str(array.shape), array.data)


def _recalled(cache, kind: str, key: str, decode: Callable[[str], Any]) -> Any:
    """The record `key` of `kind` decoded, or None: none stored, or `decode` finds it damaged (None, or
    one of the errors a damaged text raises), so that it is computed again and replaced."""
    stored = cache.get_record(kind, key)
    try:
        return decode(stored) if stored is not None else None
    except (ValueError, KeyError, TypeError):
        return None


def _remembered(cache, kind: str, key: str, decode: Callable[[str], Any], compute: Callable[[], Any],
                encode: Callable[[Any], str]) -> tuple[Any, bool]:
    """The record `key` of `kind` decoded (`_recalled`), else `compute()`, stored; and whether it came from
    the cache."""
    recalled = _recalled(cache, kind, key, decode)
    if recalled is not None:
        return recalled, True
    value = compute()
    cache.put_record(kind, key, encode(value))
    return value, False


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
                  pool: str = blockmask.DEFAULT_POOL, model_key: str | None = None) -> tuple[IRModel, bool]:
    """`proxy.measure_sensitivities`, read from `cache` where this model and data were probed before.

    Returns the annotated IR and whether the figures came from the cache. `model_key`: `model_digest(ir)`.
    """
    settings = {"probe_shares": list(probe_shares), "probe_block": list(probe_block),
                "blocks": [list(b) for b in blocks], "pool": pool}
    key = digest(ir, calib_inputs, settings, model_key)
    return _remembered(cache, RECORD_KIND, key, lambda text: _decode(text, ir),
                       lambda: proxy.measure_sensitivities(ir, calib_inputs, probe_shares, probe_block, blocks, pool),
                       _encode)


def cached_shares(cache):
    """A `search.SharesFn` that reads the table from `cache` where the same importance, blocks and grid
    were partitioned before, and otherwise computes (`proxy.energy_share_table`) and stores it."""

    def shares(ir: IRModel, blocks: Mapping[str, Sequence[tuple[int, int]]], sparsities: Sequence[float],
               pool: str) -> proxy.ShareTable:
        settings = {"blocks": {node: [list(b) for b in usable] for node, usable in blocks.items()},
                    "sparsities": [float(s) for s in sparsities], "pool": pool}

        def parts():  # the shares are the proxy's reading of blockmask's block scores and counts
            yield from (Path(proxy.__file__).read_bytes(), Path(blockmask.__file__).read_bytes(),
                        json.dumps(settings, sort_keys=True))
            for node in blocks:
                yield from _array_parts(node, ir.graph.nodes[node]["importance"])

        def decode(text: str) -> proxy.ShareTable | None:
            table = json.loads(text)
            if any(len(table[node]) != len(usable) for node, usable in blocks.items()):
                return None
            return {node: [np.array(row, np.float64) for row in table[node]] for node in blocks}

        return _remembered(cache, SHARES_KIND, record_key(parts()), decode,
                           lambda: proxy.energy_share_table(ir, blocks, sparsities, pool),
                           lambda table: json.dumps({node: [row.tolist() for row in rows]
                                                     for node, rows in table.items()}))[0]

    return shares


class _StoredValidations:
    """`search.ValidationMemo` on the cache's records: a plan's validated loss under its context's digest."""

    def __init__(self, cache, context: str):
        self.cache, self.context = cache, context

    def _key(self, plan: Mapping[str, search.Option]) -> str:
        layers = [[node, list(option.block), option.sparsity] for node, option in sorted(plan.items())]
        return record_key([self.context, json.dumps(layers)])

    def recall(self, plan: Mapping[str, search.Option]) -> float | None:
        return _recalled(self.cache, VALIDATION_KIND, self._key(plan), float)  # damaged: validated again

    def remember(self, plan: Mapping[str, search.Option], metric_loss: float) -> None:
        self.cache.put_record(VALIDATION_KIND, self._key(plan), repr(float(metric_loss)))


def validation_memo(cache, model_key: str, eval_inputs: Mapping[str, np.ndarray], labels: np.ndarray | None,
                    metric: str, pool: str = blockmask.DEFAULT_POOL,
                    reconstructed_on: Mapping[str, np.ndarray] | None = None) -> search.ValidationMemo:
    """The validations of earlier compiles of this model (`model_key`: `model_digest` of the scored IR)
    with these eval data and metric; `reconstructed_on`: the calibration inputs of the search's
    reconstruction (`--reconstruct`), None without one."""

    def parts():
        for module in (blockmask, search, reconstruct, validate, ort_run, graph, layer, prunable, weights):
            yield Path(module.__file__).read_bytes()
        yield from (onnxruntime.__version__, json.dumps({"metric": metric, "pool": pool}), model_key)
        for name in sorted(eval_inputs):
            yield from _array_parts(name, eval_inputs[name])
        yield from _array_parts("labels", labels) if labels is not None else ("no labels",)
        if reconstructed_on is None:
            yield "no reconstruction"
        for name in sorted(reconstructed_on or {}):
            yield from _array_parts(name, reconstructed_on[name])

    return _StoredValidations(cache, record_key(parts()))


def stored_probe(cache, model_key: str, calib_inputs: Mapping[str, np.ndarray], probe: search.ProbeFn,
                 pool: str = blockmask.DEFAULT_POOL) -> search.ProbeFn:
    """`probe` (the search's, re-fitting what it prunes: `proxy.SingleLayerProbe`) with each loss kept in
    `cache`: a later compile of this model (`model_key`) on these calibration inputs measures it no more."""

    def parts():
        for module in (blockmask, proxy, reconstruct, ort_run, graph, layer, prunable, weights):
            yield Path(module.__file__).read_bytes()
        yield from (onnxruntime.__version__, json.dumps({"pool": pool, "finish": "reconstruct"}), model_key)
        for name in sorted(calib_inputs):
            yield from _array_parts(name, calib_inputs[name])

    context = record_key(parts())

    def losses(node: str, block: tuple[int, int], sparsities: Sequence[float]) -> list[float]:
        return [_remembered(cache, PROBE_KIND, record_key([context, json.dumps([node, list(block), sparsity])]), float,
                            lambda sparsity=sparsity: probe(node, block, [sparsity])[0], repr)[0]
                for sparsity in sparsities]

    return losses
