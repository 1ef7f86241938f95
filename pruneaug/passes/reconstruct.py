"""Reconstruction: re-fit the kept weights of each masked layer so its output on calibration data changes least.

Needs: prunable nodes with `mask` (blockmask.apply_masks), and `ir.source` holding the dense
weights (lifting never changes it). Leaves: the kept weights replaced; zeros stay exactly zero and
every `mask` as it was.

    >>> pruned = apply_masks(assign_blocks(magnitude(ir), plan))
    >>> better = reconstruct(pruned, calib.inputs)

For a layer Y = X @ W.T with dense weights W0 and the dense model's input activations X, each
output row i keeps the columns K of its mask and solves

    min_w ||X[:, K] @ w - X @ W0[i]||^2 + lam * ||w - W0[i, K]||^2,   lam = ridge * mean(diag(X.T @ X)),

i.e. (G[K,K] + lam I) w = (G @ W0[i])[K] + lam W0[i, K] with G = X.T @ X. Only G is accumulated
over the calibration batches (in x in, never X itself), so the data set can be any size. Rows that
share a mask (the rows of one block row, or any rows whose masks happen to match) are solved
together: one factorisation, several right-hand sides. The ridge pulls towards the plainly masked
weights rather than towards zero: where the calibration set says little (few rows per input, or
uncorrelated inputs, for which masking alone is already the least-squares answer) the fit stays
where magnitude pruning put it instead of fitting noise; scaling it by the mean diagonal makes it
independent of the activations' scale.

X is the dense model's activation (not the pruned model's): every layer is fitted to its own
dense output, independently, with one onnxruntime pass for all layers.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from onnx import numpy_helper

from pruneaug.ir.graph import IRModel
from pruneaug.passes import ort_run
from pruneaug.passes.activations import input_rows

DEFAULT_RIDGE = 1e-2


def input_grams(ir: IRModel, calib: Mapping[str, np.ndarray], nodes: Sequence[str],
                batch_size: int = 64) -> dict[str, np.ndarray]:
    """G = X.T @ X (float64) of each prunable node's input in the dense model, over the calibration set.

    A shared weight's readers are summed: one weight must serve them all.
    """
    readers = [(node, reader) for node in nodes for reader in ir.layer(node).nodes]
    protos = {reader: ir.graph.nodes[reader]["proto"] for _, reader in readers}
    tensors = sorted({protos[reader].input[0] for _, reader in readers})
    model = ort_run.with_outputs(ir.source, tensors)  # the source is the dense model
    session = ort_run.make_session(model)
    grams = {node: np.zeros((ir.layer(node).shape[1],) * 2) for node in nodes}
    for batch in ort_run.batches(model, calib, batch_size):
        values = dict(zip(tensors, session.run(tensors, batch)))
        for node, reader in readers:
            proto = protos[reader]
            rows = input_rows(values[proto.input[0]].astype(np.float64), proto, ir.layer(node).conv)
            grams[node] += rows.T @ rows
    return grams


def dense_weight(ir: IRModel, node: str) -> np.ndarray:
    """The node's canonical weight as the source model holds it (before any pass changed it)."""
    layer = ir.layer(node)
    tensor = next(t for t in ir.source.graph.initializer if t.name == layer.weight)
    return layer.layout.to_canonical(numpy_helper.to_array(tensor)).astype(np.float64)


def refit(gram: np.ndarray, dense: np.ndarray, mask: np.ndarray, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Kept weights re-fitted by ridge least squares (see the module docstring); zeros outside `mask`."""
    targets = gram @ dense.T  # [in, out]: X.T @ (X @ W0.T)
    lam = ridge * float(np.mean(np.diag(gram))) or ridge
    fitted = np.zeros_like(dense)
    patterns, group_of = np.unique(mask, axis=0, return_inverse=True)
    for index, kept in enumerate(patterns):
        rows = np.flatnonzero(group_of.ravel() == index)
        columns = np.flatnonzero(kept)
        if columns.size == 0:
            continue
        system = gram[np.ix_(columns, columns)] + lam * np.eye(columns.size)
        rhs = targets[np.ix_(columns, rows)] + lam * dense[np.ix_(rows, columns)].T
        fitted[np.ix_(rows, columns)] = np.linalg.solve(system, rhs).T
    return fitted


def reconstruct(ir: IRModel, calib_inputs: Mapping[str, np.ndarray], ridge: float = DEFAULT_RIDGE,
                batch_size: int = 64, grams: Mapping[str, np.ndarray] | None = None) -> IRModel:
    """Re-fit the kept weights of every masked prunable node (nodes with nothing pruned are left as they are).

    `grams` (from `input_grams`) saves the onnxruntime pass when several plans of one model are
    reconstructed: they depend on the dense model and the calibration data only.
    """
    masked = [n for n in ir.prunable_nodes() if not ir.graph.nodes[n].get("mask", np.ones(1, bool)).all()]
    result = ir.copy()
    if not masked:
        return result
    if grams is None:
        grams = input_grams(ir, calib_inputs, masked, batch_size)
    for node in masked:
        mask = ir.graph.nodes[node]["mask"]
        result.set_canonical_weight(node, refit(grams[node], dense_weight(ir, node), mask, ridge))
    return result


def reconstructor(ir: IRModel, calib_inputs: Mapping[str, np.ndarray], ridge: float = DEFAULT_RIDGE,
                  batch_size: int = 64) -> Callable[[IRModel], IRModel]:
    """`reconstruct` for any masked copy of `ir`, with the Gram matrices computed once (the search's `finish`)."""
    grams = input_grams(ir, calib_inputs, ir.prunable_nodes(), batch_size)
    return functools.partial(reconstruct, calib_inputs=calib_inputs, ridge=ridge, batch_size=batch_size, grams=grams)
