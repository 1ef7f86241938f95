"""`tools/bench_kernels.py --part attention`, `depthwise`, `padding`, `dense`, `norm`, `mean`, `pool`, `elementwise`,
`strided` and `convtranspose`: their tables."""
from __future__ import annotations

import pytest
from tool_module import load_tool

from pruneaug.cost_model.targets import resolve_target

bench = load_tool("bench_kernels")
# the tables' first column
HEADERS = ("product", "channels x map, stride", "layer", "norm, rows x cols", "pool, channels x map", "op, shape",
           "mean, input", "ConvTranspose")


@pytest.mark.parametrize("table, shapes, shape, labels", [
    ("bench_attention", "ATTENTION_SHAPES", (2, 37, 16), [("Q K^T", "2x37x16"), ("P V", "2x37x16")]),
    ("bench_depthwise", "DEPTHWISE_SHAPES", (8, 14, 14, 1), [("8x14x14, 1",)]),
    ("bench_padding", "PADDING_SHAPES", (16, 8, 8, 1), [("16x8x8, 1",)]),
    ("bench_dense", "DENSE_MATMULS", (4, 64, 32), [("matmul m=4 64x32",), ("conv 3x3 8->32 6x6",)]),
    ("bench_norm", "NORM_SHAPES", (4, 37), [("layer 4x37",), ("rms 4x37",)]),
    ("bench_pool", "POOLS", ("avg", (4, 20, 20), 3, 1, 1), [("avg 3x3/1 4x20x20",)]),
    ("bench_elementwise", "ELEMENTWISE", ("mish", (2, 37)), [("mish 2x37",)]),
    ("bench_mean", "MEAN_SHAPES", (1, 8, 7, 7), [("1x8x7x7",)]),
    ("bench_conv_transpose", "CONV_TRANSPOSES", (8, 4, (5, 5), 3, 2, 1, 1), [("8->4 5x5, 3x3/2",)]),
    ("bench_conv_transpose", "CONV_TRANSPOSES", (8, 4, (9,), 4, 2, 1, 0), [("8->4 9, 4/2",)]),
])
def test_each_row_times_ours_the_alternative_and_onnxruntime(monkeypatch, capsys, table, shapes, shape, labels):
    monkeypatch.setattr(bench, shapes, [shape])
    monkeypatch.setattr(bench, "DENSE_CONVS", [("3x3 8->32 6x6", (1, 8, 6, 6), 32, (3, 3), (1, 1, 1, 1))])
    getattr(bench, table)(resolve_target("x86"), rounds=2, number=1, threads=1)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() not in HEADERS]
    assert [tuple(cell.strip() for cell in row[: len(labels[0])]) for row in rows] == labels
    for row in rows:
        ours, alternative, ort = (float(cell) for cell in row[len(labels[0]): len(labels[0]) + 3])
        assert min(ours, alternative, ort) > 0
        # ratios of the unrounded times: within the rounding of the printed 0.1 µs
        for ratio, other in ((row[-2], alternative), (row[-1], ort)):
            assert ratio.strip().endswith("x")
            assert (other - 0.05) / (ours + 0.05) - 0.01 <= float(ratio.strip()[:-1]) <= (other + 0.05) / max(
                ours - 0.05, 1e-9) + 0.01


def test_the_strided_table_times_the_split_and_the_conv_apart_and_adds_them(monkeypatch, capsys):
    monkeypatch.setattr(bench, "STRIDED_CONVS", [("3x3 8->16 10x10", (1, 8, 10, 10), 32, (3, 3), (1, 1, 1, 1)),
                                                 ("1x1 8->32 10x10", (1, 8, 10, 10), 32, (1, 1), (0, 0, 0, 0))])
    monkeypatch.setattr(bench, "STRIDED_BLOCKS", [(4, 1), (32, 32)])
    bench.bench_strided(resolve_target("x86"), rounds=2, number=1, threads=1)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| 3x3", "| 1x1"))]
    # a strided conv in 32x32 blocks, padded or not, reads X at the stride (`conv_lowering.strided_in_place`)
    assert [(row[0], row[1], row[2] == "in place") for row in rows] == [
        ("3x3 8->16 10x10", "4x1", False), ("3x3 8->16 10x10", "32x32", True),
        ("1x1 8->32 10x10", "4x1", False), ("1x1 8->32 10x10", "32x32", True)]

    def between(printed: str, unit: str, top: float, bottom: float, scale: float) -> bool:
        """The printed ratio against top/bottom's with both at most 0.05 µs off (printed to 0.1 µs)."""
        assert printed.endswith(unit)
        value = float(printed[:-1]) / scale
        return (top - 0.05) / (bottom + 0.05) - 0.01 <= value <= (top + 0.05) / max(bottom - 0.05, 1e-9) + 0.01

    for _, _, split, conv, ours, ort, share, speedup in rows:
        split = 0.0 if split == "in place" else float(split)
        conv, ours, ort = float(conv), float(ours), float(ort)
        assert min(conv, ort) > 0 and abs(split + conv - ours) <= 0.15  # each printed to 0.1 µs
        assert between(share, "%", split, ours, 100) and between(speedup, "x", ort, ours, 1)
