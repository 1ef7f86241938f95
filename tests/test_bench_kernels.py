"""`tools/bench_kernels.py --part attention`, `--part depthwise`, `--part padding` and `--part dense`: their tables."""
from __future__ import annotations

import pytest
from tool_module import load_tool

from pruneaug.cost_model.targets import resolve_target

bench = load_tool("bench_kernels")
HEADERS = ("product", "channels x map, stride", "layer")  # the tables' first column


@pytest.mark.parametrize("table, shapes, shape, labels", [
    ("bench_attention", "ATTENTION_SHAPES", (2, 37, 16), [("Q K^T", "2x37x16"), ("P V", "2x37x16")]),
    ("bench_depthwise", "DEPTHWISE_SHAPES", (8, 14, 14, 1), [("8x14x14, 1",)]),
    ("bench_padding", "PADDING_SHAPES", (16, 8, 8, 1), [("16x8x8, 1",)]),
    ("bench_dense", "DENSE_MATMULS", (4, 64, 32), [("matmul m=4 64x32",), ("conv 3x3 8->32 6x6",)]),
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
