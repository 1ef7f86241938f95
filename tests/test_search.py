"""The search: Pareto fronts, the knapsack DP against brute force, and the outer loop on the bundled MLP."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest

import zoo
from pruneaug.errors import OptionError
from pruneaug.ir.graph import lift
from pruneaug.options import parse_sparsities
from pruneaug.passes import importance
from pruneaug.passes.proxy import measure_sensitivities, proxy_loss
from pruneaug.passes.search import (DEFAULT_MAX_VALIDATIONS, Option, SearchReport, Trial, apply_plan, baselines,
                                    calibrated, corrected, dense_option, knapsack, loss_bins, pareto_front, proxy_knees,
                                    search, search_in, search_space, search_with_baselines)
from pruneaug.passes.validate import make_validator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPARSITIES = parse_sparsities("0:0.95:0.05")
BLOCKS = [(1, 1), (4, 4), (8, 8)]


def random_options(rng: np.random.Generator, count: int) -> list[Option]:
    return [Option((1, 1), 0.5, float(rng.integers(1, 20)), float(rng.integers(0, 10)) / 10) for _ in range(count)]


def dominated(option: Option, others: list[Option]) -> bool:
    return any(o.latency_s <= option.latency_s and o.proxy_loss <= option.proxy_loss
               and (o.latency_s, o.proxy_loss) != (option.latency_s, option.proxy_loss) for o in others)


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_is_exactly_the_non_dominated_options(seed):
    options = random_options(np.random.default_rng(seed), 15)
    front = pareto_front(options)
    expected = {(o.latency_s, o.proxy_loss) for o in options if not dominated(o, options)}
    assert {(o.latency_s, o.proxy_loss) for o in front} == expected and len(front) == len(expected)
    assert all(a.proxy_loss < b.proxy_loss and a.latency_s > b.latency_s for a, b in zip(front, front[1:]))


@pytest.mark.parametrize("seed", range(30))
def test_knapsack_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    fronts = []
    for _ in range(rng.integers(1, 5)):
        options = [Option((1, 1), 0.0, float(rng.uniform(5, 10)), 0.0)]
        options += [Option((1, 1), 0.5, float(rng.uniform(0, 10)), float(rng.uniform(0, 1))) for _ in range(rng.integers(0, 5))]
        fronts.append(pareto_front(options))
    budget, bins = float(rng.uniform(0.1, 2)), int(rng.integers(5, 50))
    picked = knapsack(fronts, budget, bins)
    total_latency = sum(front[i].latency_s for front, i in zip(fronts, picked))
    weights = [loss_bins(np.array([o.proxy_loss for o in front]), budget, bins) for front in fronts]
    assert sum(w[i] for w, i in zip(weights, picked)) <= bins
    assert sum(front[i].proxy_loss for front, i in zip(fronts, picked)) <= budget + 1e-12
    best = min(sum(f[i].latency_s for f, i in zip(fronts, combo))
               for combo in itertools.product(*(range(len(f)) for f in fronts))
               if sum(w[i] for w, i in zip(weights, combo)) <= bins)
    assert total_latency == pytest.approx(best)


def test_knapsack_with_fine_bins_reaches_the_unbinned_optimum():
    rng = np.random.default_rng(7)
    fronts = [pareto_front([Option((1, 1), 0.0, 10.0, 0.0)] + [
        Option((1, 1), 0.5, float(rng.uniform(0, 10)), float(rng.uniform(0, 1))) for _ in range(4)]) for _ in range(4)]
    combos = itertools.product(*(range(len(f)) for f in fronts))
    best = min(sum(f[i].latency_s for f, i in zip(fronts, c)) for c in combos
               if sum(f[i].proxy_loss for f, i in zip(fronts, c)) <= 1.0 - 0.01)
    picked = knapsack(fronts, 1.0, 2000)
    assert sum(f[i].latency_s for f, i in zip(fronts, picked)) <= best + 1e-12


def synthetic_latency(layer, block, sparsity):
    """Kept multiply-adds, with bigger blocks running faster per kept weight (as block-sparse kernels do)."""
    out, in_ = layer.shape
    dense = (layer.m or 1) * out * in_ * 1e-9
    if sparsity == 0:
        return dense
    efficiency = {1: 0.4, 16: 0.8, 64: 1.0}[block[0] * block[1]]
    return dense * (1 - sparsity) / efficiency + 1e-8


@pytest.fixture(scope="module")
def mlp():
    model = onnx.load(EXAMPLES / "mlp" / "model.onnx")
    calib = dict(np.load(EXAMPLES / "mlp" / "calib.npz"))
    evaluation = np.load(EXAMPLES / "mlp" / "eval.npz")
    ir = measure_sensitivities(importance.magnitude(lift(model)), calib)
    return ir, make_validator(ir, {"input": evaluation["input"]}, evaluation["labels"], "top1")


def test_search_space_skips_blocks_that_do_not_fit_or_are_unsupported(mlp):
    ir, _ = mlp
    node = ir.prunable_nodes()[-1]  # fc3: (10, 256)
    blocks = [(1, 1), (16, 16), (4, 4)]
    options = search_space(ir, synthetic_latency, blocks, SPARSITIES, supported=lambda layer, block: block != (1, 1),
                           nodes=[node]).fronts(blocks)[0]
    assert {o.block for o in options if o.sparsity > 0} == {(4, 4)}
    assert options[0] == Option((1, 1), 0.0, synthetic_latency(ir.layer(node), (1, 1), 0.0), 0.0)
    for option in options[1:]:
        assert option.proxy_loss == pytest.approx(proxy_loss(ir, node, option.block, option.sparsity))


@pytest.mark.parametrize("budget", [0.01, 0.05])
def test_search_meets_the_budget_on_the_bundled_mlp(mlp, budget):
    ir, validate = mlp
    pruned, report = search(ir, synthetic_latency, validate, budget, BLOCKS, SPARSITIES)
    assert report.met and report.metric_loss <= budget and report.validations <= 8
    assert validate(pruned) == pytest.approx(report.metric_loss)  # the returned IR is the validated one
    assert report.predicted_latency_s < report.dense_latency_s
    assert report.validations == len(report.history)
    for node in ir.prunable_nodes():
        data, option = pruned.graph.nodes[node], report.plan[node]
        assert (data["block"].shape, data["block"].sparsity) == (option.block, option.sparsity)
        assert data["proxy_loss"] == option.proxy_loss
        assert data["predicted_latency_s"] == synthetic_latency(ir.layer(node), option.block, option.sparsity)
        assert np.all(pruned.canonical_weight(node)[~data["mask"]] == 0)
    assert report.predicted_latency_s == pytest.approx(sum(o.latency_s for o in report.plan.values()))


def test_a_looser_budget_gives_a_faster_plan(mlp):
    ir, validate = mlp
    tight = search(ir, synthetic_latency, validate, 0.005, BLOCKS, SPARSITIES)[1]
    loose = search(ir, synthetic_latency, validate, 0.2, BLOCKS, SPARSITIES)[1]
    assert loose.predicted_latency_s < tight.predicted_latency_s


def test_an_impossible_budget_returns_the_dense_plan_and_says_so(mlp):
    ir, _ = mlp
    pruned, report = search(ir, synthetic_latency, lambda candidate: 1.0, 0.01, BLOCKS, SPARSITIES, max_validations=5)
    assert not report.met and 1 <= report.validations <= 5 and "dense plan" in report.message
    assert all(o.sparsity == 0 for o in report.plan.values())
    for node in ir.prunable_nodes():
        np.testing.assert_array_equal(pruned.canonical_weight(node), ir.canonical_weight(node))


def test_blocks_no_layer_can_use_are_an_option_error(mlp):
    ir, validate = mlp
    with pytest.raises(OptionError, match="--blocks 512x512: no prunable layer can use"):
        search(ir, synthetic_latency, validate, 0.01, [(512, 512)], SPARSITIES)


def test_finish_runs_on_every_candidate_and_on_the_answer(mlp):
    ir, validate = mlp
    seen, validated = [], []
    pruned, report = search(ir, synthetic_latency, lambda candidate: validated.append(candidate) or validate(candidate),
                            0.01, BLOCKS, SPARSITIES, finish=lambda candidate: seen.append(candidate) or candidate)
    assert report.met and seen[:-1] == validated and len(validated) == report.validations
    assert seen[-1] is pruned  # the answer is built again from its plan, the way it was validated


def test_finish_leaves_a_plan_that_prunes_nothing_as_it_is(mlp):
    ir, _ = mlp
    dense = {node: dense_option(ir, node, synthetic_latency) for node in ir.prunable_nodes()}
    refit = []
    pruned = apply_plan(ir, dense, finish=lambda candidate: refit.append(candidate) or candidate)
    assert not refit and all(np.array_equal(pruned.weights[name], ir.weights[name]) for name in ir.weights)


class _Memo:
    """A ValidationMemo in a dict, counting what it was asked."""

    def __init__(self):
        self.losses, self.asked = {}, 0

    def recall(self, plan):
        self.asked += 1
        return self.losses.get(tuple((node, o.block, o.sparsity) for node, o in plan.items()))

    def remember(self, plan, metric_loss):
        self.losses[tuple((node, o.block, o.sparsity) for node, o in plan.items())] = metric_loss


def test_a_memo_of_earlier_validations_gives_the_same_search_without_running_them(mlp):
    ir, validate = mlp
    memo, runs = _Memo(), []
    counted = lambda candidate: runs.append(candidate) or validate(candidate)
    first_ir, first = search_with_baselines(ir, synthetic_latency, counted, 0.01, BLOCKS, SPARSITIES, memo=memo)
    cold_runs = len(runs)
    assert cold_runs == len(memo.losses) == sum(r.validations for r in {id(r): r for r in first.values()}.values())
    again_ir, again = search_with_baselines(ir, synthetic_latency, counted, 0.01, BLOCKS, SPARSITIES, memo=memo)
    assert len(runs) == cold_runs  # no onnxruntime run the second time
    for name, report in first.items():
        assert again[name].plan == report.plan and again[name].history == report.history, name
        assert again[name].validations == 0 and again[name].recalled == report.validations + report.recalled, name
    assert all(np.array_equal(again_ir.weights[n], first_ir.weights[n]) for n in first_ir.weights)


def test_a_search_that_meets_nothing_says_how_many_of_its_validations_were_recalled(mlp):
    ir, _ = mlp
    memo = _Memo()
    never = lambda candidate: 1.0  # every pruned plan misses the budget
    space = search_space(ir, synthetic_latency, BLOCKS, SPARSITIES)
    cold = search_in(space, ir, never, 0.01, BLOCKS, memo=memo)
    assert not cold.met and "recalled" not in cold.message
    warm = search_in(space, ir, never, 0.01, BLOCKS, memo=memo)
    assert warm.validations == 0 and warm.recalled == cold.validations
    assert warm.message == (f"no pruned plan met the budget 0.01 in {warm.recalled} validation(s), {warm.recalled} of "
                            "them recalled from the cache: the dense plan is returned")


def test_baselines_use_fewer_choices(mlp):
    ir, validate = mlp
    results = baselines(search_space(ir, synthetic_latency, BLOCKS, SPARSITIES), ir, validate, 0.01, BLOCKS)
    assert set(results) == {"dense", "unstructured", "single 1x1", "single 4x4", "single 8x8", "best single"}
    assert results["dense"].predicted_latency_s == results["dense"].dense_latency_s
    assert {o.block for o in results["unstructured"].plan.values()} == {(1, 1)}
    assert {o.block for o in results["single 8x8"].plan.values() if o.sparsity > 0} <= {(8, 8)}
    assert results["best single"].predicted_latency_s == min(
        r.predicted_latency_s for name, r in results.items() if name.startswith("single ") and r.met)
    assert all(r.met and r.metric_loss <= 0.01 for r in results.values())


@pytest.mark.parametrize("proxy_budget", [0.001, 0.01, 0.1])
def test_more_choices_never_give_a_slower_plan_at_the_same_proxy_budget(mlp, proxy_budget):
    ir, _ = mlp
    def best(blocks):
        fronts = search_space(ir, synthetic_latency, blocks, SPARSITIES).fronts(blocks)
        return sum(f[i].latency_s for f, i in zip(fronts, knapsack(fronts, proxy_budget)))
    assert best(BLOCKS) <= min(best([block]) for block in BLOCKS) + 1e-15


def test_a_model_without_prunable_layers_stays_dense():
    ir = importance.magnitude(lift(zoo.no_prunable()))
    pruned, report = search(ir, synthetic_latency, lambda candidate: 0.0, 0.01, BLOCKS, SPARSITIES)
    assert report.plan == {} and report.validations == 0 and report.message


def test_search_with_baselines_answers_with_the_fastest_validated_plan(mlp):
    ir, validate = mlp
    pruned, results = search_with_baselines(ir, synthetic_latency, validate, 0.01, BLOCKS, SPARSITIES)
    met = [r for name, r in results.items() if r.met and name not in ("chosen", "best single")]
    assert results["chosen"].predicted_latency_s == min(r.predicted_latency_s for r in met)
    assert validate(pruned) == pytest.approx(results["chosen"].metric_loss) and results["chosen"].metric_loss <= 0.01
    for node, option in results["chosen"].plan.items():
        assert pruned.graph.nodes[node]["block"].shape == option.block
        assert pruned.graph.nodes[node]["predicted_latency_s"] == option.latency_s


def test_baselines_start_at_the_searched_proxy_budget_with_as_many_validations(mlp):
    ir, validate = mlp
    pruned, results = search_with_baselines(ir, synthetic_latency, validate, 0.01, BLOCKS, SPARSITIES)
    searched = results["searched"]
    assert searched.met
    for name in ("unstructured", "single 4x4", "single 8x8"):
        report = results[name]
        assert 1 <= report.validations <= DEFAULT_MAX_VALIDATIONS
        assert report.history[0].proxy_budget == pytest.approx(searched.proxy_budget)
    assert results["single 1x1"] is results["unstructured"]  # one search, not two
    # searched as thoroughly as the search (with half as many, baselines stopped at slower plans)
    assert results["single 8x8"].validations == DEFAULT_MAX_VALIDATIONS


def test_a_warm_start_away_from_the_answer_still_brackets_it(mlp):
    ir, validate = mlp
    space = search_space(ir, synthetic_latency, BLOCKS, SPARSITIES)
    cold = search_in(space, ir, validate, 0.01, BLOCKS)
    for factor in (1 / 8, 8):
        warm = search_in(space, ir, validate, 0.01, BLOCKS, start=cold.proxy_budget * factor)
        assert warm.met and warm.metric_loss <= 0.01
        assert warm.history[0].proxy_budget <= cold.proxy_budget * factor * (1 + 1e-9)  # capped at the fastest plan
        assert warm.predicted_latency_s <= 1.5 * cold.predicted_latency_s


def single_report(met_budgets: list[float], missed_budgets: list[float]) -> SearchReport:
    history = [Trial(b, 1.0, b / 2, 0.0, True) for b in met_budgets] + [Trial(b, 1.0, b, 1.0, False) for b in missed_budgets]
    return SearchReport(0.01, bool(met_budgets), 0.0, max(met_budgets, default=0.0), 1.0, 2.0, len(history), {}, [],
                        history)


def test_a_shapes_knee_is_the_largest_proxy_loss_of_a_plan_its_single_shape_search_met():
    results = {"single 1x1": single_report([0.1, 0.3, 0.2], [0.5]), "single 8x8": single_report([], [0.01, 0.1]),
               "single 4x4": single_report([0.02], [0.04])}
    assert proxy_knees(results, [(1, 1), (4, 4), (8, 8), (16, 16)]) == {(1, 1): 0.15, (4, 4): 0.01}


def test_the_calibrated_space_counts_each_shapes_loss_in_its_knees_and_leaves_out_the_others(mlp):
    ir, _ = mlp
    space = search_space(ir, synthetic_latency, BLOCKS, SPARSITIES)
    knees = {(1, 1): 0.5, (8, 8): 0.02}
    scaled = calibrated(space, knees)
    assert scaled.dense == space.dense and scaled.nodes == space.nodes
    for node in space.nodes:
        assert set(scaled.options[node]) == set(space.options[node]) & set(knees)
        for block in scaled.options[node]:
            for raw, option in zip(space.options[node][block], scaled.block_options(node, block)):
                assert option.proxy_loss == pytest.approx(raw.proxy_loss / knees[block])
                assert (option.block, option.sparsity, option.latency_s) == (raw.block, raw.sparsity, raw.latency_s)


def test_where_the_proxy_misjudges_one_shape_the_calibrated_pass_mixes_shapes_by_their_knees(mlp):
    """A metric that is the proxy, but 8x8's loss 6x what the proxy says: the raw search spends its
    validations on plans whose 8x8 layers it underrates and ends on a slower plan than the calibrated
    pass, which starts where each shape alone met the budget."""
    ir, _ = mlp
    underrated = {(1, 1): 1.0, (4, 4): 1.0, (8, 8): 6.0}

    def true_loss(node, block, sparsity):
        return proxy_loss(ir, node, block, sparsity) * underrated[block] if sparsity > 0 else 0.0

    def validate(candidate):
        specs = {node: candidate.graph.nodes[node]["block"] for node in candidate.prunable_nodes()}
        return sum(true_loss(node, spec.shape, spec.sparsity) for node, spec in specs.items())

    budget = 0.2
    pruned, results = search_with_baselines(ir, synthetic_latency, validate, budget, BLOCKS, SPARSITIES)
    calibrated_search = results["calibrated"]
    assert calibrated_search.history[0].proxy_budget == pytest.approx(1.0)
    assert 1 <= calibrated_search.validations + calibrated_search.recalled <= DEFAULT_MAX_VALIDATIONS
    assert calibrated_search.met and calibrated_search.metric_loss <= budget
    assert validate(pruned) <= budget
    assert calibrated_search.predicted_latency_s < results["searched"].predicted_latency_s
    assert results["chosen"].predicted_latency_s <= min(results[n].predicted_latency_s for n in ("searched", "calibrated"))
    for node, option in calibrated_search.plan.items():  # in the proxy's units, as plan.json reports them
        assert option.proxy_loss == pytest.approx(proxy_loss(ir, node, option.block, option.sparsity) if option.sparsity else 0)


def test_a_probed_space_plans_on_measured_losses_of_the_options_its_plans_pick(mlp):
    ir, validate = mlp
    calls = []

    def probe(node, block, sparsities):
        calls.append((node, block, *sparsities))
        harmful = block == (4, 4)  # the proxy is wrong about 4x4: every 4x4 option ruins the model
        return [1e9 if harmful else proxy_loss(ir, node, block, s) / 2 for s in sparsities]

    space = search_space(ir, synthetic_latency, BLOCKS, SPARSITIES, probe=probe)
    report = search_in(space, ir, validate, 0.01, BLOCKS)
    assert len(calls) == len(set(calls))  # each option measured once
    assert report.met and report.validations <= DEFAULT_MAX_VALIDATIONS
    for node, option in report.plan.items():
        if option.sparsity > 0:
            assert (node, option.block, option.sparsity) in calls and option.block != (4, 4)
            assert option.proxy_loss == pytest.approx(proxy_loss(ir, node, option.block, option.sparsity) / 2)
    # a probed layer and block's other options are scaled as its probes were
    node, block, _ = next(call for call in calls if call[1] == (8, 8))
    for option in space.block_options(node, block):
        assert option.proxy_loss == pytest.approx(proxy_loss(ir, node, block, option.sparsity) / 2)
    # searches sharing the space reuse its measurements, and a space's `current` probes no more
    search_in(space, ir, validate, 0.01, [(1, 1), (8, 8)])
    assert len(calls) == len(set(calls))
    current = space.current()
    assert current.probe is None and current.fronts(BLOCKS) == space.fronts(BLOCKS)
    # the calibrated pass's view plans on the same probes, in its units, and what it probes the space keeps
    view = calibrated(space, {(8, 8): 2.0})
    for in_view, in_space in zip(view.block_options(node, block), space.block_options(node, block)):
        assert in_view.proxy_loss == pytest.approx(in_space.proxy_loss / 2)
    unprobed = next(s for s in SPARSITIES if s > 0 and (node, block, s) not in calls)
    view.probe_plan({node: Option(block, unprobed, 0.0, 0.0)})
    assert space.probed[node, block][unprobed] == pytest.approx(proxy_loss(ir, node, block, unprobed) / 2)


def test_an_option_whose_probe_measures_no_finite_loss_is_never_planned(mlp):
    ir, validate = mlp
    broken = set()

    def probe(node, block, sparsities):
        if block == (8, 8) and sparsities[0] >= 0.5:  # e.g. the pruned model's outputs overflow
            broken.add((node, sparsities[0]))
            return [float("nan")]
        return [proxy_loss(ir, node, block, s) for s in sparsities]

    space = search_space(ir, synthetic_latency, BLOCKS, SPARSITIES, probe=probe)
    report = search_in(space, ir, validate, 0.01, BLOCKS)
    assert broken and report.met and report.validations > 0
    for trial in report.history:
        assert np.isfinite(trial.proxy_loss)
    assert all((node, o.sparsity) not in broken or o.block != (8, 8) for node, o in report.plan.items())
    fronts = dict(zip(space.nodes, space.fronts(BLOCKS)))
    for node, sparsity in broken:  # kept as infinite, and out of the fronts
        option = next(o for o in space.block_options(node, (8, 8)) if o.sparsity == sparsity)
        assert option.proxy_loss == float("inf")
        assert all((o.block, o.sparsity) != ((8, 8), sparsity) for o in fronts[node])


def test_unprobed_options_take_the_ratio_of_their_nearest_probes():
    estimates = ((0.2, 0.0), (0.4, 1.0), (0.6, 2.0), (0.8, 4.0), (0.9, 5.0))
    options = [Option((4, 4), s, 1.0 - s, loss) for s, loss in estimates]
    losses = [o.proxy_loss for o in corrected(options, {0.4: 3.0, 0.8: 4.0})]
    # ratios 3 at 0.4 and 1 at 0.8: 2 at 0.6, 1 beyond 0.8, and 0 stays 0
    assert losses == pytest.approx([0.0, 3.0, 4.0, 4.0, 5.0])
    assert [o.latency_s for o in corrected(options, {0.4: 3.0})] == [o.latency_s for o in options]
    # an infinite measurement is kept, but scales none of its neighbours
    losses = [o.proxy_loss for o in corrected(options, {0.8: float("inf")})]
    assert losses == [0.0, 1.0, 2.0, float("inf"), 5.0]
