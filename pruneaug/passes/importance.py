"""Per-weight importance, written on each prunable node as `importance` (canonical W[out, in] shape).

Needs: a lifted IR. Leaves: `ir.graph.nodes[n]["importance"]` for every prunable node n.

    >>> ir = magnitude(lift(model))
    >>> ir.graph.nodes[ir.prunable_nodes()[0]]["importance"].shape == ir.layer(ir.prunable_nodes()[0]).shape
    True

- `magnitude`: |w|.
- `activation`: |w_ij| * ||x_j||, where ||x_j|| is the L2 norm over the calibration set of the input
  column j the weight multiplies (for a Conv: of im2col column j, i.e. channel and kernel offset),
  summed over all readers of a shared weight. One onnxruntime pass over the calibration data.
- `from_zeros`: 1 where the weight is non-zero, 0 where it is zero: an already-pruned model's own
  structure, so masking removes exactly the zero blocks and nothing else.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from pruneaug.ir.graph import IRModel, lower
from pruneaug.passes import ort_run
from pruneaug.passes.activations import column_squares
from pruneaug.passes.parallel import map_threads


def _annotate(ir: IRModel, score: Callable[[str], np.ndarray]) -> IRModel:
    """Every prunable node's `importance`, `score(node)` made C-ordered float32, on every core (numpy
    leaves the GIL: BERT-base's 85M scores take half the time on 2 cores)."""
    nodes = ir.prunable_nodes()
    # C order: a MatMul's canonical view is the transpose of its stored weight, and masking reads the
    # scores in row-major block order many times per search (4x slower through a transposed view)
    scores = map_threads(lambda node: np.ascontiguousarray(score(node), dtype=np.float32), nodes)
    result = ir.copy()
    for node, array in zip(nodes, scores):
        assert array.shape == ir.layer(node).shape, (node, array.shape)
        result.graph.nodes[node]["importance"] = array
    return result


def by_pruner(ir: IRModel, pruner: str, calib_inputs: Mapping[str, np.ndarray] | None = None) -> IRModel:
    """The importance `--pruner` names (options.PRUNERS): `activation` needs the calibration inputs."""
    if pruner == "activation":
        assert calib_inputs is not None, "activation importance needs calibration inputs"
        return activation(ir, calib_inputs)
    assert pruner == "magnitude", pruner
    return magnitude(ir)


def magnitude(ir: IRModel) -> IRModel:
    return _annotate(ir, lambda n: np.abs(ir.canonical_weight(n)))


def from_zeros(ir: IRModel) -> IRModel:
    return _annotate(ir, lambda n: (ir.canonical_weight(n) != 0).astype(np.float32))


def activation(ir: IRModel, calib: Mapping[str, np.ndarray], batch_size: int = 64) -> IRModel:
    norms = input_column_norms(ir, calib, batch_size)
    return _annotate(ir, lambda n: np.abs(ir.canonical_weight(n)) * norms[n][None, :])


def input_column_norms(ir: IRModel, calib: Mapping[str, np.ndarray], batch_size: int = 64) -> dict[str, np.ndarray]:
    """||x_j|| over the calibration set for every canonical input column j of every prunable node."""
    readers = {}  # reader node -> (layer node, activation tensor, proto)
    for node in ir.prunable_nodes():
        for reader in ir.layer(node).nodes:
            proto = ir.graph.nodes[reader]["proto"]
            readers[reader] = (node, proto.input[0], proto)
    tensors = sorted({activation for _, activation, _ in readers.values()})
    model = ort_run.with_outputs(lower(ir), tensors)
    session = ort_run.make_session(model)
    squares: dict[str, np.ndarray] = {n: np.zeros(ir.layer(n).shape[1], np.float64) for n in ir.prunable_nodes()}
    for batch in ort_run.batches(model, calib, batch_size):
        values = dict(zip(tensors, session.run(tensors, batch)))
        for layer_node, activation_name, proto in readers.values():
            squares[layer_node] += column_squares(values[activation_name], proto, ir.layer(layer_node).conv)
    return {n: np.sqrt(sq).astype(np.float32) for n, sq in squares.items()}
