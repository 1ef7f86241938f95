"""How well the fitted cost model predicts kernels it never measured.

    TVM_NUM_THREADS=2 python tools/eval_cost_model.py --target x86

Measures (or reads from the latency cache) the kernels of a set of TRAIN layer shapes and of a
disjoint set of TEST shapes, fits the model on TRAIN alone, and prints for TEST:
- repeat agreement: REPEAT_KERNELS of the test kernels timed once more, the share whose two times
  agree within ±10% (what the ±10% goal can be judged against on this machine);
- per block shape, the share of predictions within ±10% of the measured time, and the median
  signed error per test shape and block shape (a missing cost term shows as errors of one sign);
- the ranking check: for each test layer and density, is the block shape the model ranks fastest
  the measured fastest, or within 5% of it;
- how long a warm cache takes to answer a BERT-base-sized model's whole prediction grid.

Once a cache file holds every kernel, `--measure none --repeat 0` re-evaluates a changed model on
the same measurements without timing anything (no lock needed): how a model change is compared.

`--part conv` evaluates the Conv costs instead: for CONVS (the bundled CNN's convs at batch 1 and
32, two ResNet-50 convs) the cache's grid (the default densities, as a compile fills it) is filled,
then each conv's kernels are timed at CONV_TEST_DENSITIES (off that grid, not cached) and predicted two
ways: from the conv's own grid (`CostModel.predict_conv`: what the search now uses), from that grid by one
line through every timed density (what it did before it kept to the timed points on the query's side of the
kernel's thread-pool step) and from its im2col matmul's kernels (what it used before that): per-block errors
and the ranking check for each.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_target import print_error_table  # noqa: E402

from pruneaug.cost_model.cache import DENSE_BLOCK  # noqa: E402
from pruneaug.cost_model.conv_shape import ConvShape  # noqa: E402
from pruneaug.cost_model.model import (  # noqa: E402
    DEFAULT_BLOCKS, DEFAULT_DENSITIES, CostModel, _piecewise_linear, as_block,
)
from pruneaug.cost_model.targets import resolve_target  # noqa: E402

# TRAIN spans the sizes of TEST (X and W from a few KiB to several MiB, so the per-core cache
# overflows in both) without containing any TEST shape.
TRAIN = [(256, 256, 64), (512, 1024, 128), (1024, 512, 128), (768, 768, 32), (1536, 384, 256), (512, 3072, 64),
         (3072, 512, 96)]
TEST = [(768, 768, 128), (3072, 768, 128), (768, 3072, 128), (1024, 1024, 96)]
TRAIN_DENSITIES = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75)
TEST_DENSITIES = (0.1, 0.3, 0.5, 0.8)
RANK_SLACK = 0.05
REPEAT_KERNELS = 16
CONV_TEST_DENSITIES = (0.15, 0.3, 0.6, 0.85)  # none on DEFAULT_DENSITIES (0.85: the line through 0.5 and 0.75)
CONVS = [
    ConvShape(64, (1, 32, 8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # examples/cnn conv1, batch 1
    ConvShape(64, (1, 64, 8, 8), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),  # its strided conv2
    ConvShape(64, (32, 32, 8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # conv1 at batch 32
    ConvShape(128, (1, 128, 56, 56), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),  # ResNet-50 stage 2's strided 3x3
    ConvShape(256, (1, 1024, 14, 14), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),  # a stage-4 1x1 reduction
]


def ranking_hits(fitted: CostModel, measured: dict, blocks, shapes, densities) -> tuple[int, int]:
    """(hits, cases): the predicted-fastest block is measured fastest or within RANK_SLACK of it."""
    hits = cases = 0
    for out, in_, m in shapes:
        for density in densities:
            times = {b: measured.get((out, in_, m, b, density)) for b in blocks}
            if any(t is None for t in times.values()):
                continue
            predicted = {b: fitted.predict(out, in_, m, b, 1.0 - density).seconds for b in blocks}
            hits += best_hit(predicted, times)
            cases += 1
    return hits, cases


def best_hit(predicted: dict, measured: dict) -> bool:
    """The block predicted fastest is measured fastest, or within RANK_SLACK of it."""
    return measured[min(predicted, key=predicted.get)] <= (1 + RANK_SLACK) * min(measured.values())


def evaluate_convs(model: CostModel, blocks) -> None:
    """The `--part conv` tables (see the module docstring)."""
    start = time.perf_counter()
    timed = model.fill([conv.matmul for conv in CONVS], blocks, DEFAULT_DENSITIES, convs=CONVS)
    print(f"grid: {timed} new kernels in {time.perf_counter() - start:.1f} s")
    ways = {"own kernels": lambda conv, b, s: model.predict_conv(conv, b, s).seconds,
            "own kernels, one line across the thread-pool step": lambda conv, b, s: _piecewise_linear(
                model._conv_measured[conv.key, b], 1.0 - s),  # what predict_conv did before it kept to one side
            "im2col matmul": lambda conv, b, s: model.predict(*conv.matmul, b, s).seconds}
    errors = {way: {} for way in ways}
    hits = dict.fromkeys(ways, 0)
    cases = 0
    for conv in CONVS:
        for density in CONV_TEST_DENSITIES:
            measured = {b: model.runner.time_conv(conv, b, density) for b in blocks}
            cases += 1
            for way, predict in ways.items():
                predicted = {b: predict(conv, b, 1.0 - density) for b in blocks}
                hits[way] += best_hit(predicted, measured)
                for b in blocks:
                    errors[way].setdefault(f"{b[0]}x{b[1]}", []).append(predicted[b] / measured[b] - 1.0)
    for way in ways:
        print(f"\nconvs predicted from their {way}, at densities {CONV_TEST_DENSITIES} (off the grid):")
        print_error_table({label: np.array(e) for label, e in errors[way].items()})
        print(f"fastest block ranked right (or within {RANK_SLACK:.0%}): {hits[way]}/{cases}")


def repeat_agreement(model: CostModel, rows: list) -> np.ndarray:
    """Relative differences between the cached times of `rows` and a second timing of each now."""
    return np.array([model.runner.time_layer(r.out, r.in_, r.m, r.block, r.density) / r.seconds - 1.0 for r in rows])


def spread_pick(rows: list, count: int) -> list:
    """`count` rows spread evenly over `rows` sorted by shape, block and density (every shape and block seen)."""
    ordered = sorted(rows, key=lambda r: (r.out, r.in_, r.m, r.block, r.density))
    return [ordered[i] for i in np.linspace(0, len(ordered) - 1, min(count, len(ordered))).round().astype(int)]


def print_residuals(signed: dict[tuple, list[float]], blocks: list[str]) -> None:
    """Median signed error (predicted / measured - 1) per test shape (rows) and block shape (columns)."""
    print("\nmedian signed error per shape (out x in, m) and block:")
    print(f"{'shape':>16} " + " ".join(f"{b:>7}" for b in blocks))
    for shape in sorted({s for s, _ in signed}):
        cells = [signed.get((shape, b)) for b in blocks]
        print(f"{f'{shape[0]}x{shape[1]}, {shape[2]}':>16} "
              + " ".join(f"{np.median(c):+7.1%}" if c else f"{'':>7}" for c in cells))


def bert_grid_seconds(target) -> float:
    """Seconds for a fresh model on the warm cache to predict BERT-base's whole option grid."""
    start = time.perf_counter()
    model = CostModel(target)
    sparsities = np.round(np.arange(0.0, 0.96, 0.05), 2)
    for _ in range(12):
        for out, in_ in [(768, 768)] * 4 + [(3072, 768), (768, 3072)]:
            model.predict_grid(out, in_, 128, DEFAULT_BLOCKS, sparsities)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="x86")
    parser.add_argument("--measure", default="local")
    parser.add_argument("--blocks", default=",".join(f"{r}x{c}" for r, c in DEFAULT_BLOCKS))
    parser.add_argument("--repeat", type=int, default=REPEAT_KERNELS,
                        help="test kernels to time a second time for the repeat agreement (0: none)")
    parser.add_argument("--part", choices=["matmul", "conv"], default="matmul")
    args = parser.parse_args(argv)
    target = resolve_target(args.target)
    blocks = [as_block(b) for b in args.blocks.split(",")]
    model = CostModel(target, measure=args.measure)
    print(f"target {model.target.name} ({model.target.model}), {model.target.cores} threads "
          f"(TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')}), "
          f"cache {model.cache.path}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.part == "conv":
        if model.runner is None:
            parser.error("--part conv times kernels: it needs --measure local or rpc://HOST:PORT/KEY")
        evaluate_convs(model, blocks)
        return 0
    start = time.perf_counter()
    timed = model.fill(TRAIN, blocks, TRAIN_DENSITIES) + model.fill(TEST, blocks, TEST_DENSITIES)
    print(f"measured {timed} new kernels in {time.perf_counter() - start:.1f} s; "
          f"load average now {os.getloadavg()[0]:.1f}")

    rows = model.cache.all(model.target.cache_key)
    train = [r for r in rows if (r.out, r.in_, r.m) in TRAIN]
    test = [r for r in rows if (r.out, r.in_, r.m) in TEST and (r.block in blocks or r.block == DENSE_BLOCK)]
    fitted = CostModel.from_measurements(model.target, train)
    errors: dict[str, list[float]] = {}
    signed: dict[tuple, list[float]] = {}
    for row in test:
        sparsity = 0.0 if row.block == DENSE_BLOCK else 1.0 - row.density
        prediction = fitted.predict(row.out, row.in_, row.m, row.block, sparsity)
        assert prediction.source != "measured", "a test shape leaked into the training set"
        label = "dense" if row.block == DENSE_BLOCK else f"{row.block[0]}x{row.block[1]}"
        errors.setdefault(label, []).append(prediction.seconds / row.seconds - 1.0)
        signed.setdefault(((row.out, row.in_, row.m), label), []).append(prediction.seconds / row.seconds - 1.0)
    print(f"\nfitted on {len(train)} kernels of {len(TRAIN)} shapes; tested on {len(test)} kernels of "
          f"{len(TEST)} shapes never measured for the fit:")
    share = print_error_table({label: np.array(e) for label, e in errors.items()})
    print_residuals(signed, list(errors))

    measured = {(r.out, r.in_, r.m, r.block, round(r.density, 6)): r.seconds for r in test}
    hits, cases = ranking_hits(fitted, measured, blocks, TEST, TEST_DENSITIES)
    print(f"\nfastest block shape ranked right (or within {RANK_SLACK:.0%}): {hits}/{cases} = {hits / max(cases, 1):.1%}")
    if model.runner is not None and args.repeat > 0:
        again = repeat_agreement(model, spread_pick(test, args.repeat))
        print(f"repeat agreement: {np.mean(np.abs(again) <= 0.10):.1%} of {len(again)} kernels timed twice agree "
              f"within ±10% (median |difference| {np.median(np.abs(again)):.1%}); "
              f"load average {os.getloadavg()[0]:.1f}")
    print(f"within ±10%: {share:.1%} (goal 95%); ranking: goal 90%")
    print(f"warm-cache prediction grid, BERT-base (72 layers x {len(DEFAULT_BLOCKS)} blocks x 20 sparsities): "
          f"{bert_grid_seconds(model.target):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
