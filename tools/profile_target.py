"""Fill the latency cache for a model's layer shapes (or a default grid) and check the fitted model.

    python tools/profile_target.py --target x86                      # BERT-base shapes, m=128
    python tools/profile_target.py --target x86 --model examples/cnn/model.onnx --batch 8
    python tools/profile_target.py --target arm64 --measure rpc://127.0.0.1:9190/rk3568

Layer shapes are read off the model's IR as a compile reads them: (out, in, m) of MatMul/Gemm
(canonical `W[out, in]`, m = batch x tokens) and each group-1 Conv's whole geometry (its own kernels
are timed, `codegen/conv_lowering.py`), --batch for the inputs' first dynamic axis, 1 for others.
Host figures are for TVM_NUM_THREADS threads (else every core), cached apart per thread count; with
one thread they are CPU times, which leave out the time other processes held the core.
After filling, every matmul layer shape is held out in turn: the model is fitted on the other shapes'
measurements and predicts the held-out ones, and the table says how close it came.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pruneaug.codegen import schedule  # noqa: E402
from pruneaug.cost_model.cache import DENSE_BLOCK  # noqa: E402
from pruneaug.cost_model.model import DEFAULT_BLOCKS, DEFAULT_DENSITIES, CostModel, as_block  # noqa: E402
from pruneaug.cost_model.targets import resolve_target  # noqa: E402
from pruneaug.errors import PruneaugError  # noqa: E402

BERT_BASE = [(768, 768, 128), (3072, 768, 128), (768, 3072, 128)]


def layer_shapes(path: str, batch: int = 1) -> tuple[list[tuple[int, int, int]], list]:
    """What the search would time for the model at `batch`: (out, in, m) of its MatMul/Gemm layers and
    the geometries of its group-1 Convs (`passes.latency.measured_shapes`), read off the IR as a compile does."""
    import onnx

    from pruneaug.compile import deploy_shapes
    from pruneaug.ir.graph import lift
    from pruneaug.passes.latency import measured_shapes

    model = onnx.load(path)
    shapes, convs = measured_shapes(lift(model, deploy_shapes(model, None, batch)).layers())
    return sorted(shapes), sorted(convs, key=lambda conv: conv.key)


def held_out_errors(model: CostModel, shapes: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
    """Relative errors per block label, each shape predicted by a model fitted without it. The dense kernel's
    times in its other block shapes (`schedule.dense_blocks`) are left out: the model uses them as measured,
    never predicts them."""
    others = schedule.dense_blocks(model.target)[1:]
    rows = [r for r in model.cache.all(model.target.cache_key) if not (r.block in others and r.density == 1.0)]
    errors: dict[str, list[float]] = {}
    for held in shapes:
        train = [r for r in rows if (r.out, r.in_, r.m) != held]
        test = [r for r in rows if (r.out, r.in_, r.m) == held]
        fitted = CostModel.from_measurements(model.target, train)
        for row in test:
            sparsity = 0.0 if row.block == DENSE_BLOCK else 1.0 - row.density
            predicted = fitted.predict(row.out, row.in_, row.m, row.block, sparsity).seconds
            label = "dense" if row.block == DENSE_BLOCK else f"{row.block[0]}x{row.block[1]}"
            errors.setdefault(label, []).append(predicted / row.seconds - 1.0)
    return {label: np.array(e) for label, e in errors.items()}


def print_error_table(errors: dict[str, np.ndarray]) -> float:
    """Per block shape: points, share within ±10%, median and worst |error|; returns the overall share."""
    print(f"{'block':>7} {'n':>4} {'within10%':>10} {'median|err|':>12} {'max|err|':>9}")
    for label, err in errors.items():
        print(f"{label:>7} {len(err):4d} {np.mean(np.abs(err) <= 0.10):10.1%} {np.median(np.abs(err)):12.1%}"
              f" {np.max(np.abs(err)):9.1%}")
    every = np.concatenate(list(errors.values())) if errors else np.zeros(0)
    share = float(np.mean(np.abs(every) <= 0.10)) if len(every) else float("nan")
    print(f"{'all':>7} {len(every):4d} {share:10.1%}")
    return share


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="x86")
    parser.add_argument("--model", help="ONNX model whose layer shapes to profile (default: BERT-base shapes)")
    parser.add_argument("--batch", type=int, default=1, help="the value of the model's dynamic dims (batch size)")
    parser.add_argument("--measure", default="local", help="local | rpc://HOST:PORT/KEY")
    parser.add_argument("--blocks", default=",".join(f"{r}x{c}" for r, c in DEFAULT_BLOCKS))
    parser.add_argument("--densities", default=",".join(str(d) for d in DEFAULT_DENSITIES))
    args = parser.parse_args(argv)
    try:
        target = resolve_target(args.target)
        shapes, convs = layer_shapes(args.model, args.batch) if args.model else (BERT_BASE, [])
        blocks = [as_block(b) for b in args.blocks.split(",")]
        densities = [float(d) for d in args.densities.split(",")]
        model = CostModel(target, measure=args.measure)
        print(f"target {target.name} ({target.model}); {len(shapes)} layer shapes, {len(convs)} convs; "
              f"cache {model.cache.path}")
        start = time.perf_counter()
        measured = model.fill(shapes, blocks, densities, convs=convs)
        missing = len(model.missing(shapes, blocks, densities)) + len(model.missing_convs(convs, blocks, densities))
        print(f"measured {measured} kernels in {time.perf_counter() - start:.1f} s ({missing} still missing); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    except PruneaugError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(shapes) > 1:
        print("\nheld-out accuracy (each layer shape predicted by a fit on the others):")
        print_error_table(held_out_errors(model, shapes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
