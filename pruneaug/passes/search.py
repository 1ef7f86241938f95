"""The search: a block shape and sparsity per layer, least latency under an accuracy budget.

Needs: prunable nodes with `importance` and `sensitivity` (proxy.measure_sensitivities). Leaves, on
the returned IR: `block` (BlockSpec), `mask` and the pruned weights (blockmask.apply_masks, then
the caller's `finish`, e.g. reconstruction), `proxy_loss` and `predicted_latency_s` on every
prunable node.

    >>> pruned, report = search(ir, latency, validate, budget=0.01, blocks=[(1, 1), (8, 8)],
    ...                         sparsities=parse_sparsities("0:0.95:0.05"))     # examples/mlp
    >>> report.met, report.validations, report.predicted_latency_s / report.dense_latency_s
    (True, 8, 0.433688446969697)

Three steps:
1. Options per layer: every (block, sparsity) of the grid whose block fits in the layer (a block
   larger than the weight cannot tile it) and that the caller's `supported` accepts, plus the
   dense layer (1x1 at sparsity 0); latency from the caller's `latency(layer, block, sparsity)`
   (seconds, sparsity 0 meaning the dense kernel), loss from the proxy. Options another beats on
   both latency and loss are dropped (`pareto_front`).
2. For a proxy budget P, a multiple-choice knapsack by dynamic programming (`knapsack`): each
   option's loss is rounded *up* to whole bins of P / bins, so a plan the DP accepts never exceeds
   P; it returns the least total latency whose binned loss fits.
3. The proxy only predicts accuracy, so an outer loop bisects P (geometrically: losses span
   decades) and validates each new plan end to end with the caller's `validate(ir) -> metric loss`
   until the bracket closes or `max_validations` runs out. The answer is the fastest validated plan
   within the user's budget; if none is, the dense plan and a message saying so.

With reconstruction (`--reconstruct`) the proxy is a poor guide: it measures plain pruning, and the
re-fit wins back much of mild pruning and a layer-dependent part of harsh pruning (on the bundled
encoder, 16x16 at 50% lost ~0 after the re-fit where the proxy said 0.01, and 95% up to 2.7x what
it said). There the space `probe`s: every option a DP plan picks is measured first (that layer alone
pruned and re-fitted, one onnxruntime run of the calibration set), and the DP plans again on the
measurements until its plan stands on them (`SearchSpace.probe_plan`, `corrected`). On the bundled
encoder with reconstruction, over 12 searches with 10% noise on the latencies
(`tools/bench_search_noise.py --example encoder --reconstruct [--no-probe]`), the chosen plan's
prunable layers were predicted at a median 7.2 us, 6.2-8.1 us (without probes 9.7 us, 7.9-11.6 us),
for 183-213 probes and 12-21 s of search (11-12 s without).

`baselines` reruns the same search with fewer choices: unstructured only (1x1), one block shape
for every layer (each shape of `blocks` tried; per-layer sparsities still by the DP), and dense.
The proxy ranks one shape's options well but can misjudge shapes against each other, so
`search_with_baselines` then runs a calibrated pass (`calibrated_search`): each shape's proxy in
units of the loss at which that shape alone met the budget. It answers with the fastest validated
plan of them all. (On the bundled CNN its plan was predicted 0.80x the first pass's time at batch 1
and 0.91x at batch 32 with activation pruning and reconstruction; on the encoder at batch 1 it was
slower. The answer is never worse for it: it picks among them all.)

Cost on large models (BERT-base: 72 layers, 85M weights): every layer's options are computed once
(`search_space`) and shared by the search and its baselines; masks come from removal orders
memoised per (layer, block) (`blockmask.removal_order`); the baselines start their bisection at
the proxy budget the search validated and get as many validations as the search, as does the
calibrated pass (with half as many, the bundled encoder's unstructured baseline stopped at a plan
predicted 1.2x slower than with as many: a goal ratio against it would flatter the search). A
`ValidationMemo` (`sensitivity_store.validation_memo`: the latency cache) gives back the loss of a
plan validated by an earlier compile of the same model and data; the bisection then goes the same
way without the onnxruntime run (BERT-base: ~0.35 s of masking and ~0.2 s of onnxruntime per plan, 32 plans).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
from tqdm import tqdm

from pruneaug.errors import OptionError
from pruneaug.ir.graph import IRModel
from pruneaug.ir.layer import BlockSpec, PrunableLayer
from pruneaug.passes.blockmask import DEFAULT_POOL, apply_masks, assign_blocks, fits, prunes_any
from pruneaug.passes.proxy import ShareTable, energy_share_table, proxy_losses

LatencyFn = Callable[[PrunableLayer, tuple[int, int], float], float]
ValidateFn = Callable[[IRModel], float]
SupportedFn = Callable[[PrunableLayer, tuple[int, int]], bool]
FinishFn = Callable[[IRModel], IRModel]
# (node, block, sparsities) -> the model's loss with that layer alone pruned at each: `proxy.SingleLayerProbe.losses`
ProbeFn = Callable[[str, tuple[int, int], Sequence[float]], Sequence[float]]
# (ir, usable blocks per node, sparsity grid, pool) -> the proxy's energy shares: `proxy.energy_share_table`
SharesFn = Callable[[IRModel, Mapping[str, Sequence[tuple[int, int]]], Sequence[float], str], ShareTable]

DENSE_BLOCK = (1, 1)
DEFAULT_BINS = 1000
DEFAULT_MAX_VALIDATIONS = 8
# A warm-started bisection searches proxy budgets within this factor of its start, either way.
WARM_START_SPAN = 16.0
# The calibrated pass starts at 1 (each shape's knee) and looks within this factor of it.
CALIBRATED_SPAN = 4.0
# The bisection's lower end, relative to the fastest plan's proxy loss: losses of near-zero weights
# reach 1e-70 and would spend validations on plans indistinguishable from dense.
LOWEST_PROXY_BUDGET = 1e-6


@dataclass(frozen=True)
class Option:
    """One way to run a layer: its block shape and sparsity, predicted latency and proxy loss."""

    block: tuple[int, int]
    sparsity: float
    latency_s: float
    proxy_loss: float

    @property
    def label(self) -> str:
        return "dense" if self.sparsity == 0 else f"{self.block[0]}x{self.block[1]}@{self.sparsity:g}"


@dataclass(frozen=True)
class Trial:
    """One validated plan of the outer loop."""

    proxy_budget: float
    predicted_latency_s: float
    proxy_loss: float
    metric_loss: float
    met: bool


class ValidationMemo(Protocol):
    """Validated losses kept from earlier searches of the same model, data, metric and pruning."""

    def recall(self, plan: Mapping[str, Option]) -> float | None: ...

    def remember(self, plan: Mapping[str, Option], metric_loss: float) -> None: ...


@dataclass
class SearchReport:
    budget: float
    met: bool  # a pruned plan met the budget (False: the dense plan was returned)
    metric_loss: float  # validated loss of the returned plan (0 for dense)
    proxy_budget: float
    predicted_latency_s: float
    dense_latency_s: float
    validations: int  # onnxruntime runs
    plan: dict[str, Option]
    blocks: list[tuple[int, int]]
    history: list[Trial] = field(default_factory=list)
    message: str = ""
    recalled: int = 0  # trials whose loss a ValidationMemo gave back: no onnxruntime run

    @property
    def speedup(self) -> float:
        return self.dense_latency_s / self.predicted_latency_s if self.predicted_latency_s > 0 else 1.0


def pareto_front(options: Sequence[Option]) -> list[Option]:
    """The options no other beats on both loss and latency, by increasing loss (and so decreasing latency)."""
    front: list[Option] = []
    for option in sorted(options, key=lambda o: (o.proxy_loss, o.latency_s)):
        if not front or option.latency_s < front[-1].latency_s:
            front.append(option)
    return front


def dense_option(ir: IRModel, node: str, latency: LatencyFn) -> Option:
    return Option(DENSE_BLOCK, 0.0, float(latency(ir.layer(node), DENSE_BLOCK, 0.0)), 0.0)


@dataclass(frozen=True)
class SearchSpace:
    """Every layer's options, computed once; the search and each baseline take their blocks' share of it.

    With a `probe`, an option a DP plan picks gets its loss measured (`probe_plan`), and from then on
    that loss replaces the proxy's, for every search sharing the space; the other options of the same
    layer and block keep the proxy's estimate scaled as the measured ones were (`corrected`).
    """

    nodes: tuple[str, ...]
    dense: Mapping[str, Option]
    options: Mapping[str, Mapping[tuple[int, int], tuple[Option, ...]]]  # node -> usable block -> one per sparsity
    probe: ProbeFn | None = None
    probed: dict[tuple[str, tuple[int, int]], dict[float, float]] = field(default_factory=dict)  # -> sparsity -> loss
    # block -> the loss it counts as 1 (`calibrated`)
    units: Mapping[tuple[int, int], float] = field(default_factory=dict)

    def usable(self, blocks: Sequence[tuple[int, int]]) -> bool:
        """Some layer can use one of `blocks`."""
        return any(block in self.options[node] for node in self.nodes for block in blocks)

    def block_options(self, node: str, block: tuple[int, int]) -> tuple[Option, ...]:
        """The node's options with `block` (none where it cannot use it), corrected by its probes, in `units`."""
        options = self.options[node].get(block, ())
        measured = self.probed.get((node, block))
        options = corrected(options, measured) if measured else options
        unit = self.units.get(block)
        return tuple(replace(o, proxy_loss=o.proxy_loss / unit) for o in options) if unit else options

    def fronts(self, blocks: Sequence[tuple[int, int]]) -> list[list[Option]]:
        """Per layer, the Pareto front of dense and its options with `blocks` (dense may be dominated by a
        zero-loss option); an option whose probe measured no finite loss is left out."""
        return [pareto_front([self.dense[node], *(o for b in blocks for o in self.block_options(node, b)
                                                  if math.isfinite(o.proxy_loss))])
                for node in self.nodes]

    def probe_plan(self, plan: Mapping[str, Option]) -> bool:
        """Measure the loss of each pruned option of `plan` not measured yet; whether any was."""
        new = [(node, o) for node, o in plan.items() if self.probe is not None and o.sparsity > 0
               and o.sparsity not in self.probed.get((node, o.block), {})]
        for node, option in new:
            loss = float(self.probe(node, option.block, [option.sparsity])[0])
            measured = self.probed.setdefault((node, option.block), {})
            measured[option.sparsity] = loss if math.isfinite(loss) else math.inf
        return bool(new)

    def current(self) -> "SearchSpace":
        """The space with its corrected losses (in its units) in place of the proxy's, probing no more."""
        options = {node: {block: self.block_options(node, block) for block in per_block}
                   for node, per_block in self.options.items()}
        return SearchSpace(self.nodes, self.dense, options)


def corrected(options: Sequence[Option], measured: Mapping[float, float]) -> tuple[Option, ...]:
    """One layer and block's options with the `measured` losses (sparsity -> loss) where probed, and elsewhere
    the proxy's times the measured-over-proxy ratio interpolated between the nearest probed sparsities.

    Why scale the rest: the proxy's error is mostly a per-layer factor that drifts with sparsity (with
    reconstruction it overrates mild pruning, which the re-fit undoes, and underrates the harshest),
    so a probe says much about its neighbours; left alone, an unprobed neighbour the proxy underrates
    would draw the DP to it, one probe at a time."""
    estimated = {o.sparsity: o.proxy_loss for o in options}
    points = sorted(s for s, loss in measured.items() if math.isfinite(loss))  # (an infinite one scales nothing)
    if not points:
        return tuple(replace(o, proxy_loss=measured.get(o.sparsity, o.proxy_loss)) for o in options)
    ratios = [measured[s] / estimated[s] if estimated[s] > 0 else 1.0 for s in points]
    return tuple(replace(o, proxy_loss=measured.get(o.sparsity,
                                                     o.proxy_loss * float(np.interp(o.sparsity, points, ratios))))
                 for o in options)


def search_space(ir: IRModel, latency: LatencyFn, blocks: Sequence[tuple[int, int]], sparsities: Sequence[float],
                 supported: SupportedFn | None = None, pool: str = DEFAULT_POOL,
                 nodes: Sequence[str] | None = None, shares: SharesFn = energy_share_table,
                 probe: ProbeFn | None = None) -> SearchSpace:
    """Options of `nodes` (all prunable ones by default) for every usable block and sparsity > 0 of the grid.

    A block is usable where it fits in the layer (a larger one cannot tile it) and `supported` accepts it.
    `shares` gives the proxy's pruned energy shares (`proxy.energy_share_table`, or a cache of it);
    `probe`, losses measured for the options the DP picks (`SearchSpace.probe_plan`).
    """
    nodes = tuple(ir.prunable_nodes() if nodes is None else nodes)
    grid = [s for s in sparsities if s > 0]
    usable = {node: [b for b in blocks if grid and fits(ir.layer(node).shape, b)
                     and (supported is None or supported(ir.layer(node), b))] for node in nodes}
    table = shares(ir, usable, grid, pool)  # (numpy, on every core); the latencies (sqlite) on this thread
    losses = {node: [proxy_losses(ir, node, b, grid, pool, table[node][i]) for i, b in enumerate(usable[node])]
              for node in nodes}
    options = {
        node: {block: tuple(Option(block, s, float(latency(ir.layer(node), block, s)), float(loss))
                            for s, loss in zip(grid, block_losses))
               for block, block_losses in zip(usable[node], losses[node])}
        for node in nodes
    }
    return SearchSpace(nodes, {n: dense_option(ir, n, latency) for n in nodes}, options, probe)


def loss_bins(losses: np.ndarray, budget: float, bins: int) -> np.ndarray:
    """Losses in whole bins of budget/bins, rounded up (so fitting in `bins` bins means fitting in the budget)."""
    if budget <= 0:
        return np.where(np.asarray(losses) > 0, bins + 1, 0)
    return np.ceil(np.asarray(losses, np.float64) / budget * bins - 1e-9).clip(0, bins + 1).astype(np.int64)


def knapsack(fronts: Sequence[Sequence[Option]], budget: float, bins: int = DEFAULT_BINS) -> list[int]:
    """Per layer, the index of its chosen option: least summed latency whose binned loss fits in `budget`.

    Every front must hold a zero-loss option, so a plan always exists. best[b] is the least latency
    of the layers so far using at most b bins.
    """
    best = np.zeros(bins + 1)
    choices = []
    for front in fronts:
        weights = loss_bins(np.array([o.proxy_loss for o in front]), budget, bins)
        assert (weights == 0).any(), "every layer needs a zero-loss (dense) option"
        candidates = np.full((len(front), bins + 1), np.inf)
        for index, (option, weight) in enumerate(zip(front, weights)):
            if weight <= bins:
                candidates[index, weight:] = best[: bins + 1 - weight] + option.latency_s
        choice = np.argmin(candidates, axis=0)
        best = candidates[choice, np.arange(bins + 1)]
        choices.append((choice, weights))
    picked, remaining = [], bins
    for choice, weights in reversed(choices):
        index = int(choice[remaining])
        picked.append(index)
        remaining -= int(weights[index])
    return picked[::-1]


def apply_plan(ir: IRModel, plan: Mapping[str, Option], finish: FinishFn | None = None,
               pool: str = DEFAULT_POOL) -> IRModel:
    """Blocks assigned, masks applied, `finish` run (unless the plan prunes nothing, `prunes_any`), and
    `proxy_loss` / `predicted_latency_s` annotated."""
    result = apply_masks(assign_blocks(ir, {n: BlockSpec(*o.block, o.sparsity) for n, o in plan.items()}), pool)
    if finish is not None and prunes_any(option.sparsity for option in plan.values()):
        result = finish(result)
    for node, option in plan.items():
        result.graph.nodes[node]["proxy_loss"] = option.proxy_loss
        result.graph.nodes[node]["predicted_latency_s"] = option.latency_s
    return result


def _totals(plan: Mapping[str, Option]) -> tuple[float, float]:
    return sum(o.latency_s for o in plan.values()), sum(o.proxy_loss for o in plan.values())


def search(ir: IRModel, latency: LatencyFn, validate: ValidateFn, budget: float, blocks: Sequence[tuple[int, int]],
           sparsities: Sequence[float], supported: SupportedFn | None = None, finish: FinishFn | None = None,
           bins: int = DEFAULT_BINS, max_validations: int = DEFAULT_MAX_VALIDATIONS,
           pool: str = DEFAULT_POOL, probe: ProbeFn | None = None) -> tuple[IRModel, SearchReport]:
    """The fastest plan whose validated metric loss is within `budget` (see the module docstring)."""
    space = search_space(ir, latency, blocks, sparsities, supported, pool, probe=probe)
    report = search_in(space, ir, validate, budget, blocks, finish, bins, max_validations, pool)
    return report_ir(ir, report, finish, pool), report


def report_ir(ir: IRModel, report: SearchReport, finish: FinishFn | None = None,
              pool: str = DEFAULT_POOL) -> IRModel:
    """The pruned IR of a search's (or a baseline's) plan, as it was validated (the dense plan where none met)."""
    return apply_plan(ir, report.plan, finish, pool)


def search_in(space: SearchSpace, ir: IRModel, validate: ValidateFn, budget: float, blocks: Sequence[tuple[int, int]],
              finish: FinishFn | None = None, bins: int = DEFAULT_BINS, max_validations: int = DEFAULT_MAX_VALIDATIONS,
              pool: str = DEFAULT_POOL, start: float | None = None, memo: ValidationMemo | None = None,
              span: float = WARM_START_SPAN) -> SearchReport:
    """`search` over `blocks`' share of a computed space, without building the answer's IR (`report_ir`);
    `start`: a proxy budget to bisect around first, within `span` of it either way; `memo`: losses
    validated before, and kept."""
    nodes = space.nodes
    fronts = space.fronts(blocks)
    dense = dict(space.dense)
    dense_latency_s = _totals(dense)[0]
    report = SearchReport(budget, False, 0.0, 0.0, dense_latency_s, dense_latency_s, 0, dense, list(blocks))
    if nodes and not space.usable(blocks):
        labels = ",".join(f"{r}x{c}" for r, c in blocks)
        raise OptionError(f"--blocks {labels}: no prunable layer can use any of these block shapes")
    losses = [o.proxy_loss for front in fronts for o in front if o.proxy_loss > 0]  # (the proxy's, before probes)
    if not losses:
        report.message = "nothing to prune: no layer has a sparse option that is faster than dense"
        return report

    def plan_at(proxy_budget: float) -> dict[str, Option]:
        """The DP's plan at `proxy_budget`, on measured losses wherever the space probes: a plan whose
        options were only estimated is probed and planned again until the DP stands on measurements."""
        while True:
            current = space.fronts(blocks)
            picked = knapsack(current, proxy_budget, bins)
            plan = {n: front[i] for n, front, i in zip(nodes, current, picked)}
            if not space.probe_plan(plan):
                return plan

    def key(plan: Mapping[str, Option]) -> tuple:
        return tuple((o.block, o.sparsity) for o in plan.values())

    best: tuple[dict[str, Option], Trial] = (dense, Trial(0.0, dense_latency_s, 0.0, 0.0, True))
    # The bracket: `low` gives a plan known to meet the budget (dense at first), `high` one known to miss it.
    fastest = _totals(plan_at(math.inf))[1] * (1 + 1e-6)
    lowest = max(min(losses) / 2, fastest * LOWEST_PROXY_BUDGET)
    low, high, low_key, high_key = lowest, fastest, key(dense), None
    proxy_budget = fastest  # first the fastest plan: if it meets the budget, nothing is faster
    if start is not None:  # a guess at the answer: bisect within `span` of it, trusting neither end
        low, high = max(lowest, start / span), min(fastest, start * span)
        low_key = low_key if low == lowest else None
        proxy_budget = min(max(start, low), high)
    while report.validations + report.recalled < max_validations and high / low > 1 + 1e-3:
        plan = plan_at(proxy_budget)
        plan_key = key(plan)
        if plan_key in (low_key, high_key):  # known already: narrow the bracket without a validation
            met = plan_key == low_key
        else:
            metric_loss = memo.recall(plan) if memo is not None else None
            if metric_loss is None:
                metric_loss = float(validate(apply_plan(ir, plan, finish, pool)))
                report.validations += 1
                if memo is not None:
                    memo.remember(plan, metric_loss)
            else:
                report.recalled += 1
            latency_s, proxy = _totals(plan)
            trial = Trial(proxy_budget, latency_s, proxy, metric_loss, metric_loss <= budget)
            report.history.append(trial)
            met = trial.met
            if met and latency_s < best[1].predicted_latency_s:
                best = (plan, trial)
            if met and proxy_budget >= fastest:
                break
        if met:
            low, low_key = proxy_budget, plan_key
        else:
            high, high_key = proxy_budget, plan_key
        proxy_budget = math.sqrt(low * high)

    plan, trial = best
    report.plan, report.metric_loss, report.met = plan, trial.metric_loss, plan is not dense  # a pruned plan met it
    report.predicted_latency_s, report.proxy_budget = trial.predicted_latency_s, trial.proxy_budget
    if not report.met:
        recalled = f", {report.recalled} of them recalled from the cache" if report.recalled else ""
        report.message = (f"no pruned plan met the budget {budget:g} in {report.validations + report.recalled} "
                          f"validation(s){recalled}: the dense plan is returned")
    return report


def baselines(space: SearchSpace, ir: IRModel, validate: ValidateFn, budget: float,
              blocks: Sequence[tuple[int, int]], finish: FinishFn | None = None, start: float | None = None,
              max_validations: int = DEFAULT_MAX_VALIDATIONS, **options) -> dict[str, SearchReport]:
    """The comparison plans: `dense`, `unstructured` (1x1 only), `single RxC` per usable shape, and `best single`.

    `best single` is the fastest single-shape plan that met the budget (the fastest of all if none did);
    `single 1x1` is the unstructured search itself. `start` (a proxy budget) warm-starts each bisection.
    """
    dense_latency_s = _totals(space.dense)[0]
    results = {"dense": SearchReport(budget, True, 0.0, 0.0, dense_latency_s, dense_latency_s, 0, dict(space.dense), [])}

    def restricted(shape: tuple[int, int]) -> SearchReport:
        return search_in(space, ir, validate, budget, [shape], finish, max_validations=max_validations, start=start,
                         **options)

    if space.usable([DENSE_BLOCK]):
        results["unstructured"] = restricted(DENSE_BLOCK)
    singles = {f"single {b[0]}x{b[1]}": results["unstructured"] if b == DENSE_BLOCK else restricted(b)
               for b in blocks if space.usable([b])}
    results.update(singles)
    if singles:
        results["best single"] = min(singles.values(), key=lambda r: (not r.met, r.predicted_latency_s))
    return results


def proxy_knees(results: Mapping[str, SearchReport], blocks: Sequence[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """Per block shape, the largest summed proxy loss of a pruned plan its single-shape search validated
    within the budget (shapes whose search met none are left out).

    The plan's own loss, not the proxy budget it was found at: on a coarse sparsity grid a plan can
    spend a small part of its proxy budget, and a knee set at the budget would overrate the shape."""
    knees = {}
    for block in blocks:
        report = results.get(f"single {block[0]}x{block[1]}")
        met = [trial.proxy_loss for trial in report.history if trial.met and trial.proxy_loss > 0] if report else []
        if met:
            knees[block] = max(met)
    return knees


def calibrated_search(space: SearchSpace, ir: IRModel, validate: ValidateFn, budget: float,
                      knees: Mapping[tuple[int, int], float], finish: FinishFn | None = None,
                      **options) -> SearchReport:
    """`search_in` over the shapes of `knees` with the proxy in knee units (`calibrated`), bisecting from 1
    within CALIBRATED_SPAN; the answer's options carry their proxy losses in the proxy's own units."""
    report = search_in(calibrated(space, knees), ir, validate, budget, list(knees), finish, start=1.0,
                       span=CALIBRATED_SPAN, **options)
    measured = space.current()  # (with what the calibrated pass probed)
    raw = {(node, o.block, o.sparsity): o for node in measured.nodes for by_sparsity in measured.options[node].values()
           for o in by_sparsity}
    report.plan = {node: raw.get((node, o.block, o.sparsity), o) for node, o in report.plan.items()}
    return report


def calibrated(space: SearchSpace, knees: Mapping[tuple[int, int], float]) -> SearchSpace:
    """`space` with each shape's proxy losses in units of its knee (`proxy_knees`), its other shapes left out.

    Why: the proxy ranks options of one shape well but misjudges shapes against each other (on the
    bundled encoder with reconstruction, 8x8 everywhere met the budget at 2.4x the proxy budget at
    which 16x16 everywhere missed it), so a DP over all shapes in raw proxy units mixes in the
    shapes it underrates and misses the budget where a single shape meets it. In knee units a
    plan's summed loss says what share of the tolerable loss each layer spends, whichever its shape.
    The view shares `space`'s probes: what either measures, both plan on.
    """
    options = {node: {block: by_sparsity for block, by_sparsity in per_block.items() if block in knees}
               for node, per_block in space.options.items()}
    return replace(space, options=options, units=dict(knees))


def search_with_baselines(ir: IRModel, latency: LatencyFn, validate: ValidateFn, budget: float,
                          blocks: Sequence[tuple[int, int]], sparsities: Sequence[float],
                          supported: SupportedFn | None = None, finish: FinishFn | None = None,
                          shares: SharesFn = energy_share_table, probe: ProbeFn | None = None,
                          **options) -> tuple[IRModel, dict[str, SearchReport]]:
    """The search, its `baselines`, `searched` (the search's own answer), `calibrated` and `chosen`, with
    chosen's pruned IR.

    `chosen` is the fastest plan that met the budget among the searched one, the calibrated one and every baseline:
    each of them was validated end to end, so picking among them costs nothing, and the answer is
    never slower than a baseline even where the metric moves in steps (top-1 on a few hundred eval
    rows) and the proxy's ranking of near-equal plans is noise. The baselines start at the proxy
    budget the search validated, with as many validations each as the search; then, where two or more
    shapes met the budget alone, `calibrated` (`calibrated_search`) with as many. `shares`: where the
    proxy's energy shares come from (`search_space`); `probe`: measured losses for the options the DPs pick
    (`SearchSpace.probe_plan`); `memo` (in `options`): losses validated by earlier compiles.
    """
    pool = options.get("pool", DEFAULT_POOL)
    space = search_space(ir, latency, blocks, sparsities, supported, pool, shares=shares, probe=probe)
    most = options.get("max_validations", DEFAULT_MAX_VALIDATIONS) * (len(blocks) + 2)
    with tqdm(total=most, desc="validating plans (at most)", unit="run", disable=None) as bar:
        def validate_counted(candidate: IRModel) -> float:
            bar.update()
            return validate(candidate)

        searched = search_in(space, ir, validate_counted, budget, blocks, finish, **options)
        start = searched.proxy_budget if searched.met and searched.proxy_budget > 0 else None
        results = baselines(space, ir, validate_counted, budget, blocks, finish, start, **options)
        knees = proxy_knees(results, blocks)
        if len(knees) > 1:  # one shape alone: its single-shape search has answered already
            results["calibrated"] = calibrated_search(space, ir, validate_counted, budget, knees, finish, **options)
    results["searched"] = searched
    candidates = [r for name, r in results.items() if r.met and name != "best single"]
    chosen = min(candidates, key=lambda r: r.predicted_latency_s)
    results["chosen"] = chosen
    return report_ir(ir, chosen, finish, pool), results
