"""`tools/bench_kernels.py --part attention`: the activation matmuls' table."""
from __future__ import annotations

from tool_module import load_tool

from pruneaug.cost_model.targets import resolve_target

bench = load_tool("bench_kernels")


def test_the_attention_table_times_both_products_padded_and_not_against_onnxruntime(monkeypatch, capsys):
    monkeypatch.setattr(bench, "ATTENTION_SHAPES", [(2, 37, 16)])
    bench.bench_attention(resolve_target("x86"), rounds=2, number=1, threads=1)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| Q K^T")
            or line.startswith("| P V")]
    assert [row[0].strip() for row in rows] == ["Q K^T", "P V"]
    for row in rows:
        assert row[1].strip() == "2x37x16"
        ours, unpadded, ort = (float(cell) for cell in row[2:5])
        assert min(ours, unpadded, ort) > 0
        # ratios of the unrounded times: within the rounding of the printed 0.1 µs
        for ratio, other in ((row[5], unpadded), (row[6], ort)):
            assert ratio.strip().endswith("x")
            assert (other - 0.05) / (ours + 0.05) - 0.01 <= float(ratio.strip()[:-1]) <= (other + 0.05) / max(
                ours - 0.05, 1e-9) + 0.01
