"""The search's plan against its baselines, measured on compiled artifacts (issue 5's goal).

    flock /tmp/pruneaug-bench.lock python tools/bench_plans.py                 # examples/cnn and examples/mlp
    flock /tmp/pruneaug-bench.lock python tools/bench_plans.py --examples cnn --batch 32
    flock /tmp/pruneaug-bench.lock python tools/bench_plans.py --examples cnn --pruner activation --reconstruct
    flock /tmp/pruneaug-bench.lock python tools/bench_plans.py --examples cnn --sparsities 0:0.95:0.05,0.97,0.98,0.99
    flock /tmp/pruneaug-bench.lock python tools/bench_plans.py --model m.onnx --calib c.npz --eval e.npz

For each model: one `pruneaug.compile` (the search and its baselines, validated end to end) gives
the chosen plan's artifact and, in plan.json, every baseline's per-layer plan (`layers`). Each
baseline asked for (default: best single block shape, unstructured, dense) is rebuilt from that
plan with the compile's pruner (and reconstruction, if it ran) and compiled the way the compile
compiles, its parallel and all-serial builds timed and one kept (`pruneaug/pick.py`: the table's
`kernels` column says which). Each artifact is then timed in its own
run of `pruneaug.timing` against onnxruntime on the dense model (the users' baseline), the two in
their own processes, interleaved. (Timed all in one
run, several TVM processes slowed each other and onnxruntime: on the CNN the chosen artifact read
161 µs beside three other TVM workers and 97 µs beside onnxruntime alone.) Plans are compared with
each other side by side: every artifact's compiled function in one fresh process, sharing its one
TVM thread pool, interleaved (`pruneaug.timing.time_side_by_side`). The goal: the chosen plan >= 1.25x faster
than the best single block shape and >= 2x faster than unstructured, at the same validated budget,
by both the median and the p10 of those times. Prints one Markdown table per model; ratios > 1 mean
the chosen plan is faster.

The `floor` row is the model with every prunable layer emptied (`floor_layers`), timed side by
side with the rest: with these kernels no plan of the model runs faster, so a goal "chosen >= G x
faster than plan X" is out of reach of any search where X's time over the floor's is below G; each
goal line prints that bound.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pruneaug.options import DEFAULT_SPARSITIES  # noqa: E402  (imports neither TVM nor onnxruntime)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ORT_DENSE = "onnxruntime, dense"
VM = " [compiled function]"  # the same artifact timed without the Python side's conversions
GOALS = {"best single": 1.25, "unstructured": 2.0}
FLOOR = "floor"


class Built(NamedTuple):
    """One plan as the bench compiled it."""

    figures: dict  # its plan.json baseline entry (the chosen plan: the search's)
    artifact: Path
    sparsity: float  # of the prunable weights
    work_flop: float  # its prunable layers' kernel work per run (`kernel_work`)
    kernels: str  # `kernels_kept`


def kernel_work(layers: list[dict]) -> float:
    """FLOP per run of a plan's prunable layers as their kernels do them: two per kept-block weight (zeros
    inside a kept block included) per row of X (`m`; a Conv's output pixels); the yardstick for how
    fast the kernels run against the machine's peak, which sparsity alone does not give."""
    return sum(2.0 * layer["m"] * layer["nnz_blocks"] * layer["block"][0] * layer["block"][1] for layer in layers)


def compile_plans(model: Path, calib: Path, evaluation: Path, args, folder: Path):
    """The compile, then each asked-for baseline's artifact; returns (plan, {name: Built}, inputs)."""
    import onnx

    import pruneaug
    from pruneaug import deploy, pick
    from pruneaug.calib import load_dataset
    from pruneaug.cost_model.model import cost_model
    from pruneaug.cost_model.targets import resolve_target
    from pruneaug.ir.graph import lower
    from pruneaug.ir.onnx_io import load_model
    from pruneaug.passes import latency
    from pruneaug.plan import build_plan, rebuild

    result = pruneaug.compile(model, target=args.target, out=folder / "chosen", calib=calib, eval=evaluation,
                              budget=args.budget, metric=args.metric, batch=args.batch, pruner=args.pruner,
                              reconstruct=args.reconstruct, sparsities=args.sparsities)
    plan, search = result.plan, result.plan["search"]
    source = load_model(model)
    calib_inputs = load_dataset(calib, source).inputs
    profile = resolve_target(args.target)
    costs = cost_model(profile)  # the compile's measurements, read from the cache
    shapes = plan["input_shapes"]
    written = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(result.pruned_model).graph.initializer}
    rebuilt = {t.name: onnx.numpy_helper.to_array(t) for t in lower(rebuild(source, plan, search["layers"],
                                                                            calib_inputs)).graph.initializer}
    differ = sorted(name for name in written if not np.array_equal(written[name], rebuilt.get(name)))
    if differ:  # the baselines are rebuilt the same way: this one must give back pruned.onnx
        raise SystemExit(f"rebuilding the chosen plan from plan.json gave other weights for {', '.join(differ)}")
    plans = {"chosen": Built(search, result.artifact, plan["totals"]["weight_sparsity"], kernel_work(plan["layers"]),
                             kernels_kept(plan.get("threading")))}
    inputs = deploy.sample_inputs(source, shapes, calib_inputs)
    for name in args.plans:
        figures = floor_figures(source, plan) if name == FLOOR else search["baselines"].get(name)
        if figures is None:
            print(f"{model.parent.name}: no baseline {name!r} in plan.json; skipped", file=sys.stderr)
            continue
        # one plan, one artifact: the chosen plan can be a baseline, and "best single" is often "unstructured"
        # (two measured picks between a plan's builds can differ, and read as a speed-up of the plan)
        twin = next((other for other, built in plans.items() if built.figures["layers"] == figures["layers"]), None)
        if twin is not None:
            plans[name] = plans[twin]._replace(figures=figures, kernels=f"{plans[twin].kernels}, as {twin}")
            continue
        # its dense layers in the dense kernels the compile chose from the same measurements
        pruned = latency.annotate(rebuild(source, plan, figures["layers"], calib_inputs), costs)
        pruned_model = lower(pruned)
        builder = deploy.plan_builder(pruned_model, deploy.sparse_weights(pruned), shapes, inputs)
        (folder / name).mkdir()
        with deploy.quiet_native_stderr():  # built as the compile builds: its two builds timed, one kept
            kept = pick.measured_pick(name, pruned, None, None,
                                      lambda _ir, build_profile, stem: builder(build_profile, stem), profile,
                                      pick.side_by_side(inputs), folder / name)
        artifact, threading = kept.artifact, kept.threading
        built = build_plan(pruned, profile.name)
        plans[name] = Built(figures, artifact, built["totals"]["weight_sparsity"], kernel_work(built["layers"]),
                            kernels_kept(threading))
    return plan, plans, inputs


def kernels_kept(threading: dict | None) -> str:
    """Which build of a plan the measured pick kept, and how much faster the parallel build ran (its median
    over all runs), or why it did not pick."""
    if threading is None:
        return "parallel (not timed)"
    if "skipped" in threading:
        return f"{threading.get('kept', 'parallel')} ({threading['skipped']})"
    median = threading["median_s"]
    if "parallel" not in median:
        return f"{threading['kept']} (no kernel uses the thread pool)"
    gain = median["serial"] / median["parallel"] if median["serial"] and median["parallel"] else None
    return f"{threading['kept']} (parallel {_fmt(gain)} faster)"


def floor_layers(source, plan: dict) -> dict[str, str]:
    """Every prunable layer at sparsity 1 (all weights zero, bias kept) in the largest of the default
    block shapes (the compile's, as this tool runs it) that fits it: its kernel only writes its bias
    (large blocks: the kernels that write Y row by row, without the thin blocks' transposes of X and
    Y). Any plan's layer does at least that much, so the model runs no faster with any plan and these
    kernels."""
    from pruneaug.ir.graph import lift
    from pruneaug.options import DEFAULT_BLOCKS, parse_blocks
    from pruneaug.passes.blockmask import fits
    from pruneaug.plan import layer_plan_text

    ir = lift(source, plan["input_shapes"])
    largest_first = sorted(parse_blocks(DEFAULT_BLOCKS), key=lambda block: block[0] * block[1], reverse=True)
    return {node: layer_plan_text(next(b for b in largest_first if fits(ir.layer(node).shape, b)), 1.0)
            for node in plan["search"]["layers"]}


def floor_figures(source, plan: dict) -> dict:
    """The floor as a plan.json baseline's figures: not validated (its outputs are the biases alone)."""
    layers = floor_layers(source, plan)
    return {"layers": layers, "blocks": sorted({text.partition("@")[0] for text in layers.values()}),
            "met": None, "metric_loss": None, "predicted_latency_s": None}


def bench(model: Path, calib: Path, evaluation: Path, args) -> None:
    from pruneaug.timing import Competitor, time_interleaved, time_side_by_side

    with tempfile.TemporaryDirectory(prefix="bench-plans-") as folder:
        plan, plans, inputs = compile_plans(model, calib, evaluation, args, Path(folder))
        runs = {}
        for name, built in plans.items():
            for suffix, kind in (("", "artifact"), (VM, "artifact-vm")):
                runs[name + suffix] = time_interleaved(
                    [Competitor(name + suffix, kind, built.artifact), Competitor(ORT_DENSE, "onnxruntime", model)],
                    inputs, args.threads, rounds=args.rounds, runs=args.runs)
        together = time_side_by_side({name: built.artifact for name, built in plans.items()}, inputs,
                                     args.rounds, args.runs, args.pause)
    from pruneaug.cost_model.measured import measure_peaks

    print_table(model, plan, plans, runs, together, measure_peaks()[0], args)


def relative(runs: dict, name: str, statistic: str = "median_s") -> float | None:
    """`name`'s time over onnxruntime's in the same run (None where either failed)."""
    results = runs[name].results
    ours, theirs = getattr(results[name], statistic), getattr(results[ORT_DENSE], statistic)
    return ours / theirs if ours and theirs else None


def print_table(model: Path, plan: dict, plans: dict, runs: dict, together: dict, peak_gflops: float,
                args) -> None:
    search = plan["search"]

    def ratio(numerator: float | None, denominator: float | None) -> str:
        return _fmt(_ratio(numerator, denominator))

    def spread(timing) -> str:
        if timing.error:
            return f"failed: {timing.error}"
        return f"{timing.median_s * 1e6:,.1f} ({timing.p10_s * 1e6:,.1f}–{timing.p90_s * 1e6:,.1f})"

    ort = [run.results[ORT_DENSE].median_s for run in runs.values() if run.results[ORT_DENSE].median_s]
    print(f"\n### {model.parent.name}/{model.name}: target {args.target}, budget {args.budget:g} on {args.metric}, "
          f"batch {args.batch}, pruner {args.pruner}{', reconstructed' if args.reconstruct else ''}, "
          f"sparsities {args.sparsities}, chosen = {search['chosen_from']}\n")
    print(f"One run per artifact against onnxruntime, dense: {next(iter(runs.values())).method()} (that of the first "
          f"run; onnxruntime's median over the runs {min(ort) * 1e6:,.1f}–{max(ort) * 1e6:,.1f} µs). `run` = "
          f"`pruneaug.load(...).run` (numpy in, numpy out), as onnxruntime's `session.run`; `function` = the "
          f"compiled function alone (TVM's timer, no conversions). `x onnxruntime` = time over onnxruntime's in the "
          f"same run. `side by side` = every plan's compiled function in one fresh process, one thread pool, "
          f"interleaved in {args.rounds} rounds of {args.runs} runs {args.pause:g} s apart; `chosen faster by` "
          f"compares those directly. `kernel work` = FLOP of the prunable layers' kernels per run (two per "
          f"kept-block weight per row); `GFLOP/s` = that work over the predicted time, and over the side-by-side "
          f"time less the floor's (the prunable layers in the model); numpy's fp32 matmul here (its BLAS, its own "
          f"threads): {peak_gflops:,.0f} GFLOP/s.\n")
    print("| plan | blocks | kernels (build kept) | weight sparsity | validated loss | meets budget | "
          "predicted µs (prunable layers) | kernel work, MFLOP | GFLOP/s (predicted / in the model) | "
          "run µs, median (p10–p90) | function µs, median (p10–p90) | "
          "x onnxruntime (run / function) | side by side µs, median (p10–p90) | chosen faster by (side by side) |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, built in plans.items():
        figures = built.figures
        validated = figures["met"] is not None
        described = (", ".join(figures["blocks"]) or "dense", built.kernels, f"{built.sparsity:.1%}",
                     f"{figures['metric_loss']:.4f}" if validated else "–",
                     ("yes" if figures["met"] else "no") if validated else "not validated",
                     f"{figures['predicted_latency_s'] * 1e6:,.1f}" if figures["predicted_latency_s"] else "–",
                     f"{built.work_flop / 1e6:,.2f}", work_rates(name, plans, together))
        shares = [relative(runs, name), relative(runs, name + VM)]
        print(f"| {name} | {' | '.join(described)} | {spread(runs[name].results[name])} | "
              f"{spread(runs[name + VM].results[name + VM])} | {' / '.join(_fmt(share) for share in shares)} | "
              f"{spread(together[name])} | {ratio(together[name].median_s, together['chosen'].median_s)} |")
    for name, goal in GOALS.items():
        if name in plans:
            print("\n" + goal_line(name, goal, plans, together, search))


def work_rates(name: str, plans: dict, together: dict) -> str:
    """`name`'s kernel work per second: over its predicted time, and over its side-by-side time less the
    floor's ("–" where there is no work, no prediction, or no floor timed below it)."""
    built = plans[name]
    predicted_s = built.figures["predicted_latency_s"]
    in_model_s = (together[name].median_s - together[FLOOR].median_s
                  if FLOOR in plans and together[name].median_s and together[FLOOR].median_s else None)
    rates = [built.work_flop / seconds / 1e9 if built.work_flop and seconds and seconds > 0 else None
             for seconds in (predicted_s, in_model_s)]
    return " / ".join("–" if rate is None else f"{rate:,.0f}" for rate in rates)


def goal_line(name: str, goal: float, plans: dict, together: dict, search: dict) -> str:
    """The verdict on one goal: the chosen plan's speed-up over baseline `name`, side by side, against
    `goal` (both by the median and the p10: two builds of one plan side by side read 0.77x by their
    medians and 0.98x by their p10s). A baseline that is the chosen plan is never a speed-up."""
    got = {statistic: _ratio(getattr(together[name], statistic), getattr(together["chosen"], statistic))
           for statistic in ("median_s", "p10_s", "p90_s")}
    if plans[name].figures["layers"] == plans["chosen"].figures["layers"]:
        return (f"chosen vs {name}: the same plan (every layer's block and sparsity), timed from one artifact: "
                f"{_fmt(got['median_s'])} side by side is noise; goal >= {goal}x: not met")
    verdict = "met" if all(got[k] and got[k] >= goal for k in ("median_s", "p10_s")) else "not met"
    predicted = _ratio(plans[name].figures["predicted_latency_s"], search["predicted_latency_s"])
    return (f"chosen vs {name}: {_fmt(got['median_s'])} side by side (p10: {_fmt(got['p10_s'])}, p90: "
            f"{_fmt(got['p90_s'])}); predicted {_fmt(predicted)}; goal >= {goal}x: {verdict} (by the median and "
            f"the p10){floor_reach(name, goal, plans, together)}")


def floor_reach(name: str, goal: float, plans: dict, together: dict) -> str:
    """What the floor allows: any plan's time over `name`'s is at most `name`'s over the floor's."""
    if FLOOR not in plans:
        return ""
    bound = {k: _ratio(getattr(together[name], k), getattr(together[FLOOR], k)) for k in ("median_s", "p10_s")}
    if None in bound.values():
        return f"; the floor's bound is unknown ({name} or the floor was not timed)"
    within = "within reach" if all(b >= goal for b in bound.values()) else "out of reach of any plan"
    return (f"; the floor bounds any plan to {_fmt(bound['median_s'])} (p10: {_fmt(bound['p10_s'])}) "
            f"faster than {name}: the goal is {within}")


def _ratio(slow: float | None, fast: float | None) -> float | None:
    return slow / fast if slow and fast else None


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", default="cnn,mlp", help="bundled examples to run (default cnn,mlp)")
    parser.add_argument("--model", type=Path, help="an ONNX model instead of the examples (needs --calib, --eval)")
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--eval", type=Path)
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--metric", default="top1")
    parser.add_argument("--target", default="x86", help="a target whose artifacts run here (x86)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pruner", default="magnitude", help="the compile's --pruner (magnitude, activation)")
    parser.add_argument("--reconstruct", action="store_true", help="the compile's --reconstruct (every plan re-fitted)")
    parser.add_argument("--sparsities", default=DEFAULT_SPARSITIES,
                        help=f"the compile's --sparsities (default {DEFAULT_SPARSITIES}): every plan's grid, the "
                             "baselines' too; a layer at the grid's top may have had accuracy to spare")
    parser.add_argument("--plans", default=f"best single,unstructured,dense,{FLOOR}",
                        help=f"baselines of plan.json to compile and time beside the chosen plan, and {FLOOR!r}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds; each runs every plan --runs times")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--pause", type=float, help="seconds between side-by-side rounds (default: the picks' own)")
    args = parser.parse_args()
    args.plans = [name.strip() for name in args.plans.split(",") if name.strip()]
    if args.pause is None:
        from pruneaug.pick import PICK_ROUND_PAUSE_S

        args.pause = PICK_ROUND_PAUSE_S
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's thread pool starts (the kernel measurements)
    if args.model:
        if not (args.calib and args.eval):
            parser.error("--model needs --calib and --eval")
        runs = [(args.model, args.calib, args.eval)]
    else:
        runs = [(EXAMPLES / name / "model.onnx", EXAMPLES / name / "calib.npz", EXAMPLES / name / "eval.npz")
                for name in args.examples.split(",")]
    for model, calib, evaluation in runs:
        bench(model, calib, evaluation, args)


if __name__ == "__main__":
    main()
