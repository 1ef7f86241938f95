"""Fill the latency cache for a model's layer shapes (or a default grid) and check the fitted model.

    python tools/profile_target.py --target x86                      # BERT-base shapes, m=128
    python tools/profile_target.py --target x86 --model examples/cnn/model.onnx --batch 8
    python tools/profile_target.py --target arm64 --measure rpc://127.0.0.1:9190/rk3568

Layer shapes are read off the ONNX model's MatMul/Gemm/Conv initializer weights (canonical
`W[out, in]`; Conv `in = Cin*kh*kw`), m from the outputs' inferred shapes with --batch for the
dynamic dims (m = batch x tokens for MatMul, batch x H_out x W_out for Conv).
Host figures are for TVM_NUM_THREADS threads (else every core), cached apart per thread count; with
one thread they are CPU times, which leave out the time other processes held the core.
After filling, every layer shape is held out in turn: the model is fitted on the other shapes'
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

from pruneaug.cost_model.cache import DENSE_BLOCK  # noqa: E402
from pruneaug.cost_model.model import DEFAULT_BLOCKS, DEFAULT_DENSITIES, CostModel, as_block  # noqa: E402
from pruneaug.cost_model.targets import resolve_target  # noqa: E402
from pruneaug.errors import PruneaugError  # noqa: E402

BERT_BASE = [(768, 768, 128), (3072, 768, 128), (768, 3072, 128)]


def _rows(value_info, out: int, batch: int) -> int | None:
    """m of a layer from its output's shape ([..., out] or [N, out, H, W]); dynamic dims count as `batch`."""
    dims = [d.dim_value if d.HasField("dim_value") else batch for d in value_info.type.tensor_type.shape.dim]
    if not dims:
        return None
    total = int(np.prod(dims))
    return total // out if total % out == 0 else None


def layer_shapes(path: str, batch: int = 1) -> list[tuple[int, int, int]]:
    """(out, in, m) of every MatMul/Gemm/Conv with an initializer weight (group-1 Conv only);
    dynamic dims (the batch, usually) are taken as `batch`, and m is 1 where shapes are unknown."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    infos = {v.name: v for v in [*model.graph.value_info, *model.graph.output]}
    shapes = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMul" and len(node.input) > 1 and len(weights.get(node.input[1], ())) == 2:
            in_, out = weights[node.input[1]]
        elif node.op_type == "Gemm" and len(weights.get(node.input[1], ())) == 2:
            out, in_ = weights[node.input[1]] if attrs.get("transB", 0) else weights[node.input[1]][::-1]
        elif node.op_type == "Conv" and attrs.get("group", 1) == 1 and len(weights.get(node.input[1], ())) >= 3:
            out, *rest = weights[node.input[1]]
            in_ = int(np.prod(rest))
        else:
            continue
        info = infos.get(node.output[0])
        m = _rows(info, out, batch) if info is not None else None
        shapes.append((int(out), int(in_), m or batch))
    return list(dict.fromkeys(shapes))


def held_out_errors(model: CostModel, shapes: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
    """Relative errors per block label, each shape predicted by a model fitted without it."""
    rows = model.cache.all(model.target.cache_key)
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
        shapes = layer_shapes(args.model, args.batch) if args.model else BERT_BASE
        blocks = [as_block(b) for b in args.blocks.split(",")]
        densities = [float(d) for d in args.densities.split(",")]
        model = CostModel(target, measure=args.measure)
        print(f"target {target.name} ({target.model}); {len(shapes)} layer shapes; cache {model.cache.path}")
        start = time.perf_counter()
        measured = model.fill(shapes, blocks, densities)
        print(f"measured {measured} kernels in {time.perf_counter() - start:.1f} s "
              f"({len(model.missing(shapes, blocks, densities))} still missing); "
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
