"""`tools/bench_search_noise.py`: the search rerun under seeded latency noise."""
from __future__ import annotations

from types import SimpleNamespace

from tool_module import load_tool

bench = load_tool("bench_search_noise")


def test_each_option_reads_one_noisy_time_per_run():
    def latency(layer, block, sparsity):
        return 1.0 + sparsity

    layer = SimpleNamespace(node="fc1")
    first, again, other = (bench.noisy(latency, 0.1, seed) for seed in (0, 0, 1))
    assert first(layer, (4, 4), 0.5) == again(layer, (4, 4), 0.5) != other(layer, (4, 4), 0.5)
    assert first(layer, (4, 4), 0.5) != first(layer, (8, 8), 0.5)
    assert bench.noisy(latency, 0.0, 3)(layer, (4, 4), 0.5) == 1.5
    factors = [bench.noisy(latency, 0.1, seed)(layer, (1, 1), 0.0) for seed in range(200)]
    assert 0.6 < min(factors) < 0.9 and 1.1 < max(factors) < 1.5  # log-normal, sigma 0.1


def test_a_memoised_probe_measures_each_option_once_and_counts_what_it_was_asked():
    calls = []
    ask = bench.memoised(lambda node, block, sparsities: calls.append(sparsities) or [s / 2 for s in sparsities])
    assert ask("fc1", (4, 4), [0.5, 0.7]) == [0.25, 0.35] and ask("fc1", (4, 4), [0.7]) == [0.35]
    assert calls == [[0.5], [0.7]] and ask.asked == 3


def test_the_search_reruns_with_probes_on_the_bundled_mlp(capsys):
    chosen = bench.main(["--example", "mlp", "--runs", "2", "--reconstruct", "--latency", "synthetic"])
    out = capsys.readouterr().out
    assert len(chosen) == 2 and all(us > 0 for us in chosen)
    rows = [line for line in out.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2 and int(rows[0].split("|")[9]) > 0  # the first run's search probed options
    assert out.rstrip().endswith(f"median {sorted(chosen)[0] / 2 + sorted(chosen)[1] / 2:.2f}, "
                                 f"range {min(chosen):.2f}-{max(chosen):.2f}")
