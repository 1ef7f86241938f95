"""How repeatable the search is: the same compile's search rerun with its latencies perturbed by noise.

    python tools/bench_search_noise.py --example encoder --reconstruct            # probes, as the compile
    python tools/bench_search_noise.py --example encoder --reconstruct --no-probe # the proxy alone

A compile measures its kernels, and two compiles of one model never read the same times: the DP's
plans, and so the plans the bisection validates, move with them. Where the proxy misjudges the
validated metric, that is the difference between a plan at 79% and one at 90% sparsity (the
bundled encoder with `--reconstruct`, session 18). Each run here is `search.search_with_baselines`
as the compile calls it (its validations included, on the example's eval.npz), with every option's
latency times exp(noise * N(0, 1)), seeded per run and option. The latency is the compile's by
default (`--latency measured`: the x86 cost model calibrated by this machine's kernels, measured into
the cache as a compile does, at the shapes a compile at `--batch` costs), or one of
`tools/bench_search.py`'s (`x86`, the cost model without measurements; `synthetic`; `weights`).
Columns: what the compile would have chosen, its nominal weight sparsity, its prunable layers'
predicted latency without the noise (what it would really cost), its validated loss, the same latency for the unstructured and best single-shape
baselines, the onnxruntime validations, the options probed (`--reconstruct`; measured once per
process and shared by the runs, so the count is what each run's search asked for), the search's
seconds. The last line gives the median and range of the chosen plans' latency.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import EXAMPLES, latency_fn  # noqa: E402

from pruneaug.calib import load_dataset  # noqa: E402
from pruneaug.compile import deploy_shapes  # noqa: E402
from pruneaug.ir.graph import lift  # noqa: E402
from pruneaug.options import DEFAULT_BLOCKS, DEFAULT_SPARSITIES, parse_blocks, parse_sparsities  # noqa: E402
from pruneaug.passes import importance, latency as layer_costs  # noqa: E402
from pruneaug.passes.proxy import measure_sensitivities, refit_probe  # noqa: E402
from pruneaug.passes.reconstruct import reconstructor  # noqa: E402
from pruneaug.passes.search import search_with_baselines  # noqa: E402
from pruneaug.passes.validate import make_validator  # noqa: E402


def noisy(latency, noise: float, seed: int):
    """`latency` times exp(noise * N(0, 1)), one draw per (seed, layer, block, sparsity): the same option
    reads the same time within a run, as a compile's cached measurement does."""

    def perturbed(layer, block, sparsity):
        key = hashlib.sha256(f"{seed}/{layer.node}/{block}/{sparsity}".encode()).digest()
        draw = np.random.default_rng(int.from_bytes(key[:8], "little")).standard_normal()
        return latency(layer, block, sparsity) * float(np.exp(noise * draw))

    return perturbed


def measured_latency(ir, blocks):
    """The compile's latency on the host: the x86 cost model with this machine's kernels measured (or cached)."""
    from pruneaug.cost_model import cost_model
    from pruneaug.cost_model.targets import resolve_target

    profile = resolve_target("x86")
    costs = cost_model(profile, "local")
    layer_costs.measure_search_kernels(costs, profile, ir.layers(), blocks)
    return layer_costs.layer_latency(costs)


def memoised(probe):
    """`probe` measuring each option once per process; `asked` counts every option asked for."""
    losses: dict = {}

    def ask(node, block, sparsities):
        ask.asked += len(sparsities)
        for sparsity in sparsities:
            if (node, block, sparsity) not in losses:
                losses[node, block, sparsity] = probe(node, block, [sparsity])[0]
        return [losses[node, block, sparsity] for sparsity in sparsities]

    ask.asked = 0
    return ask


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", default="encoder", help="a folder of examples/")
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--noise", type=float, default=0.1, help="sigma of the log-normal factor on each latency")
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--metric", default="top1")
    parser.add_argument("--pruner", default="magnitude", choices=("magnitude", "activation"))
    parser.add_argument("--reconstruct", action="store_true")
    parser.add_argument("--no-probe", action="store_true", help="with --reconstruct: plan on the proxy alone")
    parser.add_argument("--latency", default="measured", help="measured (the compile's), or as tools/bench_search.py's")
    parser.add_argument("--batch", type=int, default=None, help="as the compile's --batch")
    args = parser.parse_args(argv)

    folder = EXAMPLES / args.example
    model = onnx.load(folder / "model.onnx")
    calib_data = load_dataset(folder / "calib.npz", model, "--calib")
    calib, evaluation = calib_data.inputs, dict(np.load(folder / "eval.npz"))
    labels = evaluation.pop("labels", None)
    shapes = deploy_shapes(model, calib_data, args.batch, None, [])
    dense = lift(model, shapes)
    validate = make_validator(dense, evaluation, labels, args.metric)
    ir = measure_sensitivities(importance.by_pruner(dense, args.pruner, calib), calib)
    finish = reconstructor(ir, calib) if args.reconstruct else None
    probe = None if args.no_probe else refit_probe(ir, calib, finish)
    ask = memoised(probe.losses) if probe else None
    blocks, sparsities = parse_blocks(DEFAULT_BLOCKS), parse_sparsities(DEFAULT_SPARSITIES)
    latency = measured_latency(ir, blocks) if args.latency == "measured" else latency_fn(args.latency)
    sizes = {node: int(np.prod(ir.layer(node).shape)) for node in ir.prunable_nodes()}

    def sparsity_of(plan) -> float:
        return sum(o.sparsity * sizes[node] for node, o in plan.items()) / sum(sizes.values())

    def cost_us(plan) -> float:
        return 1e6 * sum(latency(ir.layer(node), o.block, o.sparsity) for node, o in plan.items())

    print(f"{args.example}, {args.pruner}{', reconstructed' if finish else ''}"
          f"{', probed' if ask else ''}; budget {args.budget} on {args.metric}; latency {args.latency} predicted, "
          f"noise sigma {args.noise}, input shapes {shapes}\n")
    print("| run | chosen | weight sparsity (nominal) | predicted µs | validated loss | unstructured µs | "
          "best single µs | validations | options probed | search s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    chosen_us = []
    for run in range(args.runs):
        asked_before = ask.asked if ask else 0
        start = time.perf_counter()
        _, results = search_with_baselines(ir, noisy(latency, args.noise, run), validate, args.budget, blocks,
                                           sparsities, finish=finish, probe=ask)
        seconds = time.perf_counter() - start
        chosen = results.pop("chosen")
        name = next(name for name, result in results.items() if result is chosen)
        searches = {id(r): r for r in results.values()}.values()
        chosen_us.append(cost_us(chosen.plan))
        print(f"| {run} | {name} | {sparsity_of(chosen.plan):.1%} | {chosen_us[-1]:.2f} | {chosen.metric_loss:.4f} | "
              f"{cost_us(results['unstructured'].plan):.2f} | {cost_us(results['best single'].plan):.2f} | "
              f"{sum(r.validations for r in searches)} | {(ask.asked if ask else 0) - asked_before} | {seconds:.1f} |")
    print(f"\nchosen plans' predicted µs over {args.runs} runs: median {np.median(chosen_us):.2f}, "
          f"range {min(chosen_us):.2f}-{max(chosen_us):.2f}")
    return chosen_us


if __name__ == "__main__":
    main()
