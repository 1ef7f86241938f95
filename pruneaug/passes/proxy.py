"""The accuracy proxy: a cheap, additive estimate of how much pruning one layer hurts the model.

Needs: prunable nodes with `importance` (importance.py). `measure_sensitivities` leaves
`sensitivity` (a Sensitivity) on every prunable node; `proxy_losses` / `proxy_loss` read it.

    >>> ir = measure_sensitivities(magnitude(lift(model)), calib.inputs)    # examples/mlp
    >>> proxy_losses(ir, "fc1/MatMul", (8, 8), [0.0, 0.5, 0.9])
    array([0.        , 0.23874045, 0.67166841])

What the proxy estimates: the squared relative L2 error of the model's outputs that pruning the
layer causes; summed over layers, that of the whole plan. It composes two things:

- the layer's *pruned energy share* at (block, sparsity): the summed squared importance of the
  blocks the mask removes over the layer's total. For activation importance |w_ij| * ||x_j|| this
  is the energy of the removed part of the layer's output when input columns are uncorrelated;
  for magnitude importance the removed share of ||W||_F^2. Squared (energy) units make the
  per-layer errors add: independent output perturbations add in squared norm.
- the layer's *sensitivity*: the model's squared relative output error, measured with that layer
  alone pruned (1x1) so that it loses 5%, 20% and 50% of its energy, as a function of the share
  (piecewise linear). It says how much of a layer's own error reaches the model's output (a last
  layer's error arrives whole, an early layer's is damped or amplified by what follows), and
  how fast that grows. Optionally a scale per block shape from one more probe with that shape.

On examples/cnn the summed proxy of the plans the DP proposes at proxy budgets 0.001-0.03 was
0.65x-1.3x their measured squared relative error on the calibration set; a single linear probe
at 5% under-predicted the same kind of plans 10-200x at the 85-95% sparsities the search reaches.

Relative L2 rather than top-1 or cosine for the probes: it is continuous (top-1 on a calibration
set of a few hundred rows moves in steps and is mostly 0 at a mild probe), and it sees a change
of scale that cosine ignores.

The search evaluates the proxy for every (block, sparsity) of every layer, so `proxy_losses`
reads every sparsity off one cumulative sum of the block energies in removal order.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from pruneaug.ir.graph import IRModel, lower
from pruneaug.ir.layer import BlockSpec
from pruneaug.passes import ort_run
from pruneaug.passes.blockmask import (
    DEFAULT_POOL, block_areas, block_scores, layer_mask, pruned_block_count, removal_order, unit_scores,
)
from pruneaug.passes.parallel import map_threads

PROBE_SHARES = (0.05, 0.2, 0.5)  # 0.05: about what 50% unstructured sparsity removes from Gaussian weights
PROBE_BLOCK = (1, 1)


def relative_sq_error(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """||outputs - reference||^2 / ||reference||^2 over all the model's outputs together."""
    error = sum(float(np.sum((o.astype(np.float64) - r) ** 2)) for r, o in zip(reference, outputs))
    energy = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    return error / energy if energy > 0 else error


def _energy_ordered_values(importance: np.ndarray, block: tuple[int, int], pool: str) -> np.ndarray | None:
    """Values whose squares are the blocks' energies and whose order is the order pruning removes the
    blocks (what ties reorder has equal energy): the 1x1 scores in their own precision, or the l2 scores
    where every block is whole. None where the removal order must be looked up (ragged blocks, other pools)."""
    if block == (1, 1):
        return unit_scores(importance, pool).ravel()
    if pool == "l2" and (block_areas(importance.shape, block) == block[0] * block[1]).all():
        return block_scores(importance, block, pool).ravel()
    return None


def _removal_curve(importance: np.ndarray, block: tuple[int, int], pool: str) -> np.ndarray:
    """Share of the squared importance removed after pruning 0, 1, ..., n blocks (n + 1 values, 0 to 1).

    Blocks go in the order `blockmask.layer_mask` removes them, so the shares match the masks
    `apply_masks` builds: by sorting their values where those order them (five times faster than
    ordering the blocks), else by the memoised removal order. Summed in float64.
    """
    values = _energy_ordered_values(importance, block, pool)
    if values is not None:
        energies = np.sort(values).astype(np.float64) ** 2
    else:
        # an l2 score is the block's sum of squares scaled to a full block's area
        areas = block_areas(importance.shape, block)
        l2 = block_scores(importance, block, "l2")
        energies = (l2**2 * areas / (block[0] * block[1])).ravel()[removal_order(importance, block, pool)]
    cumulative = np.concatenate([[0.0], np.cumsum(energies)])
    return cumulative / cumulative[-1] if cumulative[-1] > 0 else np.zeros_like(cumulative)


def pruned_energy_shares(importance: np.ndarray, block: tuple[int, int], sparsities: Sequence[float],
                         pool: str = DEFAULT_POOL) -> np.ndarray:
    """Share of the layer's squared importance that the mask at each sparsity removes.

    Where the blocks' values order them, a partition at the grid's block counts gives the shares
    without sorting every block (a search asks this of every layer and block shape; BERT-base's
    1x1 options alone are 2.4M scores a layer)."""
    values = _energy_ordered_values(importance, block, pool)
    if values is None:
        curve = _removal_curve(importance, block, pool)
        return curve[[pruned_block_count(curve.size - 1, s) for s in sparsities]]
    counts = [pruned_block_count(values.size, s) for s in sparsities]
    cuts = sorted({c for c in counts if 0 < c < values.size})
    energies = (np.partition(values, cuts) if cuts else values).astype(np.float64) ** 2
    total = energies.sum()
    if total <= 0:
        return np.zeros(len(counts))
    starts = [0, *cuts]
    before = dict(zip(starts, np.concatenate([[0.0], np.cumsum(np.add.reduceat(energies, starts))[:-1]])))
    return np.array([1.0 if c >= values.size else before[c] / total for c in counts])


def probe_sparsity(importance: np.ndarray, block: tuple[int, int], share: float,
                   pool: str = DEFAULT_POOL) -> float:
    """The least sparsity whose mask removes at least `share` of the squared importance (1.0 if none does)."""
    return _probe_point(_removal_curve(importance, block, pool), share)[0]


def _probe_point(curve: np.ndarray, share: float) -> tuple[float, float]:
    """(sparsity, share it removes) of the fewest blocks that remove at least `share`, on a removal curve."""
    blocks = min(int(np.searchsorted(curve, share, side="left")), curve.size - 1)
    return blocks / (curve.size - 1), float(curve[blocks])


@dataclass(frozen=True)
class Sensitivity:
    """A layer's model-level squared relative output error as a function of its pruned energy share.

    Measured with the probe block at a few shares and joined by straight lines from (0, 0); beyond
    the last probe the last segment's slope continues. Errors are made non-decreasing (a probe that
    happened to help does not make more pruning look free). `block_scales` corrects the curve for
    other block shapes: removing whole blocks perturbs outputs coherently and may hurt more than the
    same energy removed weight by weight; a shape without a scale uses the curve as it is.
    """

    shares: tuple[float, ...]
    errors: tuple[float, ...]
    block_scales: Mapping[tuple[int, int], float] = field(default_factory=dict)

    def __call__(self, shares: np.ndarray, block: tuple[int, int] | None = None) -> np.ndarray:
        shares = np.asarray(shares, np.float64)
        if not self.shares:  # nothing could be probed: an all-zero weight, which pruning cannot change
            return np.zeros_like(shares)
        xs = np.concatenate([[0.0], self.shares])
        ys = np.maximum.accumulate(np.concatenate([[0.0], self.errors]))
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        curve = np.where(shares <= xs[-1], np.interp(shares, xs, ys), ys[-1] + slope * (shares - xs[-1]))
        return curve * self.block_scales.get(block, 1.0)


class SingleLayerProbe:
    """The model's squared relative output error on the calibration set with one layer alone pruned.

    One onnxruntime session with the prunable weights as inputs serves every probe; the dense outputs
    are computed once, with the session, at the first probe (a compile whose probes the cache holds
    never builds it). `finish` (the search's, e.g. reconstruction) runs on the probed model as it
    runs on every plan the search validates, so a probe measures what that layer costs in the
    model that ships.
    """

    def __init__(self, ir: IRModel, calib_inputs: Mapping[str, np.ndarray],
                 finish: Callable[[IRModel], IRModel] | None = None, pool: str = DEFAULT_POOL, batch_size: int = 256):
        self.ir, self.finish, self.pool = ir, finish, pool
        self._calib_inputs, self._batch_size = calib_inputs, batch_size
        self.runs = 0  # onnxruntime passes over the calibration set, the dense one not counted

    @functools.cached_property
    def _session(self) -> tuple[Callable[[Mapping[str, np.ndarray]], list[np.ndarray]], list[np.ndarray]]:
        """(run with some weights replaced, the dense outputs)."""
        weights = {self.ir.layer(n).weight for n in self.ir.prunable_nodes()}
        run = ort_run.WeightFedRunner(lower(self.ir), weights, self._calib_inputs, self._batch_size).run
        return run, run({})

    def __call__(self, node: str, spec: BlockSpec) -> float:
        layer = self.ir.layer(node)
        mask = layer_mask(self.ir.graph.nodes[node]["importance"], spec, self.pool)
        weight = self.ir.masked_weight(node, mask)
        if self.finish is not None:
            probed = self.ir.copy()
            probed.graph.nodes[node].update(block=spec, mask=mask)
            probed.weights[layer.weight] = weight
            weight = self.finish(probed).weights[layer.weight]
        run, dense = self._session
        self.runs += 1
        return relative_sq_error(dense, run({layer.weight: weight}))

    def losses(self, node: str, block: tuple[int, int], sparsities: Sequence[float]) -> list[float]:
        """The error at each sparsity of `block` (a `search.ProbeFn`)."""
        return [self(node, BlockSpec(*block, sparsity)) for sparsity in sparsities]


def refit_probe(ir: IRModel, calib_inputs: Mapping[str, np.ndarray],
                finish: Callable[[IRModel], IRModel] | None) -> SingleLayerProbe | None:
    """The search's probe where `finish` re-fits what pruning leaves (`--reconstruct`), else None: the proxy
    measures plain pruning and cannot tell what a re-fit wins back, so the options the search's plans
    pick are measured instead (`search.SearchSpace.probe_plan`); without one the proxy tracks the
    search's measured losses as well as probing every option would (bundled encoder)."""
    return SingleLayerProbe(ir, calib_inputs, finish) if finish is not None else None


def measure_sensitivities(ir: IRModel, calib_inputs: Mapping[str, np.ndarray],
                          probe_shares: Sequence[float] = PROBE_SHARES, probe_block: tuple[int, int] = PROBE_BLOCK,
                          blocks: Sequence[tuple[int, int]] = (), pool: str = DEFAULT_POOL,
                          batch_size: int = 256) -> IRModel:
    """Annotate `sensitivity` (a Sensitivity) on each prunable node.

    Each probe prunes the layer alone at the least sparsity that removes the probe's share of its
    squared importance, not at a fixed sparsity: in a layer whose weights are mostly (near) zero
    already, a fixed 50% removes nothing measurable and would call the layer insensitive at any
    sparsity. Several probes, because the model's error grows faster than linearly in the share
    once a layer loses much of its energy (what follows compounds it). Each shape of `blocks` that
    fits the layer gets one more probe, at the middle share, for its scale. onnxruntime runs of the
    calibration set: one for the dense model, then (len(probe_shares) + len(blocks)) per layer.
    """
    probe_error = SingleLayerProbe(ir, calib_inputs, pool=pool, batch_size=batch_size)
    result = ir.copy()
    for node in tqdm(ir.prunable_nodes(), desc="probing layer sensitivities", unit="layer", disable=None):
        importance = ir.graph.nodes[node]["importance"]
        curve = _removal_curve(importance, probe_block, pool)
        shares, errors = [], []
        for target in probe_shares:
            sparsity, share = _probe_point(curve, target)
            if share > (shares[-1] if shares else 0.0):  # else nothing (more) to remove
                shares.append(share)
                errors.append(probe_error(node, BlockSpec(*probe_block, sparsity)))
        sensitivity = Sensitivity(tuple(shares), tuple(errors))
        scales = {}
        layer_shape = ir.layer(node).shape
        for block in blocks:
            if block == probe_block or block[0] > layer_shape[0] or block[1] > layer_shape[1] or not shares:
                continue
            sparsity, share = _probe_point(_removal_curve(importance, block, pool), probe_shares[len(probe_shares) // 2])
            expected = float(sensitivity(np.array([share]))[0])
            if expected > 0:
                scales[block] = probe_error(node, BlockSpec(*block, sparsity)) / expected
        result.graph.nodes[node]["sensitivity"] = Sensitivity(sensitivity.shares, sensitivity.errors, scales)
    return result


def proxy_losses(ir: IRModel, node: str, block: tuple[int, int], sparsities: Sequence[float],
                 pool: str = DEFAULT_POOL, shares: np.ndarray | None = None) -> np.ndarray:
    """The proxy loss of `node` at `block` for every sparsity in `sparsities` (one sort, one cumulative sum),
    or from its `pruned_energy_shares` where given (`energy_share_table`)."""
    data = ir.graph.nodes[node]
    assert "sensitivity" in data, f"{node}: run measure_sensitivities first"
    if shares is None:
        shares = pruned_energy_shares(data["importance"], block, sparsities, pool)
    return data["sensitivity"](shares, block)


# node -> one `pruned_energy_shares` array over the sparsity grid per block, in the order the blocks were asked
ShareTable = dict[str, list[np.ndarray]]


def energy_share_table(ir: IRModel, blocks: Mapping[str, Sequence[tuple[int, int]]], sparsities: Sequence[float],
                       pool: str = DEFAULT_POOL) -> ShareTable:
    """`pruned_energy_shares` of every node of `blocks` at each of its blocks, on every core (numpy partitions
    leave the GIL; BERT-base's 72 layers x 6 blocks take ~4 s on 2 cores)."""
    nodes = list(blocks)
    return dict(zip(nodes, map_threads(lambda node: [pruned_energy_shares(ir.graph.nodes[node]["importance"], block,
                                                                          sparsities, pool)
                                                     for block in blocks[node]], nodes)))


def proxy_loss(ir: IRModel, node: str, block: tuple[int, int], sparsity: float,
               pool: str = DEFAULT_POOL) -> float:
    return float(proxy_losses(ir, node, block, [sparsity], pool)[0])
