"""Fit the analytical CUDA cost model to kernel times measured on a GPU, and say how well it predicts.

    python tools/fit_cuda_cost_model.py [tools/data/bench_cuda_h100.md] [--target cuda:sm_90]

Reads the Markdown tables `tools/bench_cuda.py` prints (both layouts of every matmul and conv row),
fits `analytical.Params` to the matmuls of half the weight shapes (1536x384 and 3072x768) and the
stride-1 3x3 convs, and predicts the other matmuls (384x1536, 768x3072) and convs (costed as the cost
model does an untimed conv: its im2col product in the conv kernel's layout). Prints, for the parameters the
target starts from (`analytical.default_params`) and for the fitted ones, the share of held-out
predictions within 10% and 25% of the measured time, the range of predicted / measured, and how often
the faster of the two layouts is predicted faster; then the fitted compute terms in cycles at the
target's clock, which is how `analytical.CUDA_CYCLES` holds them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAIN_SHAPES = {(1536, 384), (3072, 768)}
TRAIN_CONVS = {(1, 32, 8, 8), (32, 32, 8, 8), (1, 64, 56, 56)}  # inputs of the stride-1 3x3 convs fitted
LAYOUT_COLUMNS = {"cuda": 4, "cuda_split": 5}  # the "along m" and "split" columns of both tables


def read_tables(path: Path) -> tuple[list[tuple], list[tuple]]:
    """(matmul points, conv points), each (out, in, m, block, density, layout, seconds, train)."""
    from pruneaug.cost_model.analytical import CUDA_CONV_LAYOUT, CUDA_POINTWISE_CONV_LAYOUT
    from pruneaug.cost_model.conv_shape import ConvShape

    matmuls, convs = [], []
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 11 or not cells[0][:1].isdigit():
            continue
        density = 1 - float(cells[3 if "x" in cells[0] else 2].rstrip("%")) / 100
        block = tuple(int(v) for v in cells[4 if "x" in cells[0] else 3].split("x"))
        if "x" in cells[0]:  # a conv row: x (NCHW), out, "k x k, stride", ...
            x_shape = tuple(int(v) for v in cells[0].split("x"))
            k, stride = (int(v) for v in cells[2].replace("x", ",").split(",")[1:])
            pad = (k - 1) // 2
            out, in_, pixels = ConvShape(int(cells[1]), x_shape, (k, k), (stride, stride), (pad,) * 4, (1, 1)).matmul
            # the conv's own threads, not the matmul's along m (a 1x1 unpadded conv's read X as it is)
            threads = CUDA_POINTWISE_CONV_LAYOUT if k == 1 and pad == 0 else CUDA_CONV_LAYOUT
            convs += [(out, in_, pixels, block, density, threads if layout == "cuda" else layout,
                       float(cells[col + 1]) * 1e-6, x_shape in TRAIN_CONVS) for layout, col in LAYOUT_COLUMNS.items()]
        else:
            out, in_ = (int(v) for v in cells[1].split("x"))
            matmuls += [(out, in_, int(cells[0]), block, density, layout, float(cells[col]) * 1e-6,
                         (out, in_) in TRAIN_SHAPES) for layout, col in LAYOUT_COLUMNS.items()]
    return matmuls, convs


def features(target, points: list[tuple]) -> np.ndarray:
    from pruneaug.cost_model import analytical

    return np.array([analytical.features(target, out, in_, m, block, density, layout)
                     for out, in_, m, block, density, layout, _, _ in points])


def summary(name: str, predicted: np.ndarray, measured: np.ndarray) -> str:
    """A table row: within 10% and 25%, median and range of predicted / measured, and layout agreement
    (consecutive points are one row's two layouts)."""
    ratio = predicted / measured
    faster = [(predicted[i] < predicted[i + 1]) == (measured[i] < measured[i + 1]) for i in range(0, len(ratio), 2)]
    return (f"| {name} | {len(ratio)} | {np.mean(abs(ratio - 1) <= 0.1):.0%} | {np.mean(abs(ratio - 1) <= 0.25):.0%} "
            f"| {np.median(ratio):.2f} | {ratio.min():.2f}-{ratio.max():.2f} | {np.mean(faster):.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", type=Path, nargs="?", default=Path(__file__).parent / "data" / "bench_cuda_h100.md")
    parser.add_argument("--target", default="cuda:sm_90")
    args = parser.parse_args()

    from pruneaug.cost_model import analytical
    from pruneaug.cost_model.targets import resolve_target

    target = resolve_target(args.target)
    matmuls, convs = read_tables(args.tables)
    train = [p for p in matmuls + convs if p[-1]]
    held_out = [p for p in matmuls if not p[-1]]
    held_out_convs = [p for p in convs if not p[-1]]
    start = analytical.default_params(target)
    fitted = analytical.fit(features(target, train), np.array([p[6] for p in train]), start)
    print(f"\n## {args.tables.name}: {len(train)} matmul and conv times fitted, {len(held_out)} matmul and "
          f"{len(held_out_convs)} conv times held out; target {target.name}")
    print("| parameters, points | n | within 10% | within 25% | median predicted/measured | range "
          "| faster layout predicted |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for label, params in (("defaults", start), ("fitted", fitted)):
        for part, points in (("held-out matmuls", held_out), ("held-out convs", held_out_convs)):
            predicted = analytical.latency_from_features(params, features(target, points))
            print(summary(f"{label}, {part}", predicted, np.array([p[6] for p in points])))
    freq_hz = target.freq_ghz * 1e9
    cycles = {name: value * freq_hz for name, value in zip(analytical.PARAM_NAMES, fitted.array())}
    print("\nfitted (cycles at the profile's clock, t_call in µs): "
          + ", ".join(f"{name} {value:.3g}" if name != "t_call" else f"t_call {value / freq_hz * 1e6:.2f}"
                      for name, value in cycles.items()))


if __name__ == "__main__":
    main()
