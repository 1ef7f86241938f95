"""Cost model: target profiles, the analytical model, the fit, and predictions from a cache."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from pruneaug.codegen import schedule
from pruneaug.cost_model import CostModel, Prediction, analytical
from pruneaug.cost_model import model as model_module
from pruneaug.cost_model.cache import DENSE_BLOCK, LatencyCache, Measurement
from pruneaug.cost_model.targets import hardware_peaks, load_profiles, resolve_target
from pruneaug.errors import OptionError, TargetError

A76 = resolve_target("arm64")
A76_32K = dataclasses.replace(A76, l1_bytes=32 << 10)  # 8 ways of 4 KiB: an m tile of 8 rows can fill a set
FLOPS, ROW_TILES, OUTS, LAUNCHES = (analytical.FEATURE_NAMES.index(n) for n in ("flops", "row_tiles", "outs", "launches"))
BLOCKS = [(1, 1), (1, 4), (4, 1), (8, 8), (16, 16), (32, 32)]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache."""
    monkeypatch.setenv("PRUNEAUG_CACHE", str(tmp_path / "latency.sqlite"))


# --- targets ---------------------------------------------------------------------------------


def test_builtin_profiles_have_hardware_figures():
    little = resolve_target("arm64:cortex-a55")
    assert A76.name == "arm64:cortex-a76" and little.kind == "arm64"
    assert little.peak_gflops < A76.peak_gflops and little.mem_gbps < A76.mem_gbps
    assert resolve_target("cuda").tvm_target["arch"] == "sm_80"
    assert resolve_target("cuda:sm_90").peak_gflops > resolve_target("cuda:sm_80").peak_gflops
    assert A76.tvm().kind.name == "llvm"


def test_host_profile_read_off_the_machine():
    host = resolve_target("x86")
    assert host.kind == "x86" and host.cores >= 1 and host.simd_bytes in (16, 32, 64)
    assert host.l1_bytes > 0 and host.l2_bytes > host.l1_bytes
    assert host.peak_gflops is None  # measured on first use by hardware_peaks


def test_host_peaks_measured_once_and_cached(monkeypatch):
    host = resolve_target("x86")
    calls = []
    monkeypatch.setattr("pruneaug.cost_model.measured.measure_peaks", lambda: calls.append(1) or (100.0, 20.0))
    assert hardware_peaks(host) == (100.0, 20.0)
    assert hardware_peaks(host) == (100.0, 20.0)
    assert calls == [1]


BOARD_TOML = """
[profiles."arm64:myboard"]
kind = "arm64"
tvm_target = { kind = "llvm", mtriple = "aarch64-linux-gnu", mcpu = "cortex-a72", mattr = ["+neon"] }
cores = 4
simd_bytes = 16
freq_ghz = 1.8
peak_gflops = 57.6
mem_gbps = 4
"""


def test_user_profile_from_toml_and_json(tmp_path, monkeypatch):
    toml_file = tmp_path / "boards.toml"
    toml_file.write_text(BOARD_TOML)
    board = resolve_target("arm64:myboard", profile_file=toml_file)
    assert (board.cores, board.mem_gbps, board.tvm_target["mcpu"]) == (4, 4.0, "cortex-a72")
    assert resolve_target(str(toml_file)) == board
    assert resolve_target(f"{toml_file}#arm64:myboard") == board
    monkeypatch.setenv("PRUNEAUG_PROFILES", str(toml_file))
    assert resolve_target("arm64:myboard") == board
    json_file = tmp_path / "boards.json"
    json_file.write_text(json.dumps({"profiles": {"arm64:myboard": dataclasses.asdict(board) | {"name": None}}}
                                    ).replace('"name": null, ', ""))
    assert load_profiles(json_file)["arm64:myboard"] == board


@pytest.mark.parametrize("text, message", [
    (BOARD_TOML.replace("cores = 4", "cores = 'four'"), "key 'cores' must be int"),
    (BOARD_TOML.replace("mem_gbps = 4", ""), "missing key 'mem_gbps'"),
    (BOARD_TOML + "colour = 'red'\n", "unknown key 'colour'"),
    (BOARD_TOML.replace('kind = "arm64"', 'kind = "riscv"'), "key 'kind' is 'riscv'"),
    ("[profiles", "not valid TOML"),
    ("title = 'x'", "expected a non-empty table 'profiles'"),
])
def test_bad_profile_files_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(TargetError, match=message) as err:
        resolve_target("arm64:myboard", profile_file=path)
    assert str(path) in str(err.value)


def test_unknown_target_lists_known_ones(tmp_path):
    with pytest.raises(TargetError, match="unknown target; known targets: x86, arm64, cuda"):
        resolve_target("riscv")
    with pytest.raises(TargetError, match="cannot read it"):
        resolve_target(str(tmp_path / "missing.toml"))


# --- analytical model ------------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("target", ["arm64:cortex-a76", "arm64:cortex-a55", "cuda:sm_80", "cuda:sm_90"])
def test_analytical_monotone_in_sparsity(target, block):
    profile = resolve_target(target)
    sparsities = np.linspace(0.0, 0.99, 34)
    times = [analytical.latency(profile, 768, 3072, 128, block, s) for s in sparsities]
    assert all(t > 0 for t in times)
    assert np.all(np.diff(times) <= 1e-15), times


def test_analytical_equals_dense_at_density_one():
    """codegen's dense kernel is its BSR kernel with every `DENSE_BLOCK` block kept: the same work and
    time; any other block shape with every block kept does the dense layer's flops."""
    params = analytical.default_params(A76)
    assert analytical.latency(A76, 768, 512, 128, schedule.DENSE_BLOCK, 0.0, params) == pytest.approx(
        analytical.dense_latency(A76, 768, 512, 128, params))
    for block in [(1, 1), (4, 1), (8, 8), (32, 32)]:
        flops = analytical.features(A76, 768, 512, 192, block, 1.0)[FLOPS]  # m=192: no tile of m is padded
        assert flops == pytest.approx(2 * 192 * 768 * 512 / A76.cores), block


def test_ragged_edges_are_padded_to_whole_blocks():
    exact = analytical.features(A76, 64, 64, 128, (16, 16), 1.0)
    ragged = analytical.features(A76, 50, 50, 128, (16, 16), 1.0)
    np.testing.assert_allclose(ragged[FLOPS], exact[FLOPS])  # 4x4 padded blocks either way
    assert analytical.kept_blocks(50, 50, (16, 16), 0.5) == 8


def test_parallel_efficiency_counts_whole_block_rows():
    """Block rows are dealt out whole: two block rows on four cores take as long as four."""
    two_rows = analytical.features(A76, 64, 256, 128, (32, 32), 1.0)
    four_rows = analytical.features(A76, 128, 256, 128, (32, 32), 1.0)
    np.testing.assert_allclose(two_rows[FLOPS:OUTS + 1], four_rows[FLOPS:OUTS + 1])


def test_a_kernel_off_the_thread_pool_does_all_its_work_on_one_core(monkeypatch):
    """A layer too small to fork for (`schedule.runs_parallel`) has no parallel region, and its busiest
    core walks every block row; forced onto the pool, the A76's four cores share them."""
    serial = analytical.features(A76, 64, 256, 1, (8, 8), 0.5)
    monkeypatch.setattr(schedule, "PARALLEL_MIN_LANE_MACS", 0)
    monkeypatch.setattr(analytical, "_MEMO", {})
    parallel = analytical.features(A76, 64, 256, 1, (8, 8), 0.5)
    assert serial[LAUNCHES] == 0 and parallel[LAUNCHES] == 1
    assert serial[ROW_TILES] == 8 and parallel[ROW_TILES] == 2  # 8 block rows
    assert serial[FLOPS] == 4 * parallel[FLOPS]


def test_features_count_the_kernels_own_tiles():
    """The tiles are codegen's `kernel_schedule`: dense 768x3072 at m=128 on the A76 cuts X into six
    column chunks (each a pass over Y) and takes m in tiles of 2 rows."""
    sched = schedule.kernel_schedule(A76, 128, 768, 3072, schedule.DENSE_BLOCK, 48 * 96)
    assert sched.layout == "rowvec" and sched.tiles["k_chunks"] == 6 and sched.tiles["m_tile"] == 2
    feats = analytical.features(A76, 768, 3072, 128, (0, 0), 1.0)
    busiest_rows, m_tiles = 48 / A76.cores, 128 / 2
    assert feats[ROW_TILES] == busiest_rows * m_tiles * 6  # row tiles
    assert feats[OUTS] == 16 * 128 * busiest_rows * 6  # outputs stored, once per chunk
    assert feats[LAUNCHES] == 6  # a parallel region per column chunk (one pass over m: X fits)


def test_vectorised_features_match_one_layer_at_a_time():
    out, in_, m, density = np.array([64, 768, 3072]), np.array([768, 3072, 96]), np.array([[1], [40], [128]]), 0.3
    for block in [(1, 1), (4, 1), (8, 8), (0, 0)]:
        grid = analytical.features(A76, out, in_, m, block, density)
        assert grid.shape == (3, 3, len(analytical.FEATURE_NAMES))
        for i, j in np.ndindex(3, 3):
            np.testing.assert_array_equal(grid[i, j], analytical.features(A76, out[j], in_[j], m[i, 0], block, density))


TRUTH = analytical.Params(t_call=3e-6, t_launch=4e-6, t_flop=2e-11, t_block=8e-9, t_row=2e-7, t_out=4e-10,
                          t_in=2e-10, t_l2=3e-11, t_l3=2e-10, t_conflict=2e-9, t_byte=1.2e-10)


@pytest.mark.parametrize("target, block, unseen", [
    # m-vectorised: two parallel regions always; never memory-bound; X is read transposed (no set conflicts)
    (A76, (1, 4), {"t_call", "t_launch", "t_byte", "t_conflict"}),
    # row-vectorised: X read in place (no packing); a block's flops, its X and W reads and its outputs per
    # m tile are in fixed proportion, so only their sum is seen; passes and column chunks vary the regions;
    # an m tile of 4 rows never fills half of the A76's 16 ways
    (A76, (8, 8), {"t_in", "t_flop", "t_block", "t_out", "t_conflict"}),
    # 4x4 blocks on a 32 KiB L1: m tiles of 8 rows, which share one set where X's rows are 12 KiB apart
    (A76_32K, (4, 4), {"t_in", "t_flop", "t_block", "t_out"}),
])
def test_fit_recovers_known_parameters(target, block, unseen):
    """Synthetic times from known parameters over shapes whose working sets span L1, L2 and beyond."""
    rng = np.random.default_rng(0)
    shapes = [(out, in_, m, d) for out in (256, 768, 3072) for in_ in (384, 768, 3072) for m in (2, 16, 128, 1024)
              for d in (0.05, 0.2, 0.5, 1.0)]  # m=2: a smaller m tile, else flops, visits and outs move together
    out, in_, m, density = (np.array(v, dtype=float) for v in zip(*shapes))
    feats = analytical.features(target, out, in_, m, block, density)
    for term in ("l2_bytes", "l3_bytes"):  # the cache terms are exercised, not zero everywhere
        column = feats[:, analytical.FEATURE_NAMES.index(term)]
        assert np.count_nonzero(column) > len(shapes) // 4, term
    seconds = analytical.latency_from_features(TRUTH, feats) * rng.normal(1.0, 0.002, len(shapes))
    fitted = analytical.fit(feats, seconds, analytical.default_params(target))
    relative = {name: abs(f / t - 1) for name, f, t in zip(analytical.PARAM_NAMES, fitted.array(), TRUTH.array())}
    assert all(relative[name] < 0.1 for name in relative if name not in unseen), relative
    held_out = analytical.features(target, np.array([512, 1536, 640]), np.array([1024, 512, 2048]), np.array([64, 48, 512]),
                                   block, np.array([0.1, 0.35, 0.8]))
    predicted, truth = (analytical.latency_from_features(p, held_out) for p in (fitted, TRUTH))
    np.testing.assert_allclose(predicted, truth, rtol=0.02)


def test_working_sets_follow_the_kernels_loops():
    """mvec reads the whole transposed X per block row: from L2 while it fits, beyond once it does not.
    rowvec streams a core's weights from beyond L2 once per pass over m unless they stay in L2."""
    l3 = analytical.FEATURE_NAMES.index("l3_bytes")
    assert analytical.features(A76, 768, 384, 64, (1, 1), 0.5)[l3] == 0  # XT 96 KiB < L2 512 KiB
    assert analytical.features(A76, 768, 3072, 256, (1, 1), 0.5)[l3] > 0  # XT 3 MiB
    small, large = (analytical.features(A76, out, 768, 64, (8, 8), 0.5)[l3] for out in (64, 4096))
    assert small == 0 and large > 0  # 96 KiB of weights stay in L2 beside X's 192 KiB; 6 MiB do not
    assert analytical.miss_share(100, 1000) == 0 and analytical.miss_share(4000, 1000) == pytest.approx(0.8125)


def test_rowvec_follows_the_kernels_own_column_chunks_and_passes():
    """At low density the kernel takes fewer column chunks (too few blocks per row to pay for one),
    so its X slices are wider and m takes more passes, each a parallel region streaming the weights."""
    launches = []
    for density in (0.05, 0.1, 0.3):
        nnzb = int(analytical.kept_blocks(768, 3072, (8, 8), density))
        tiles = schedule.kernel_schedule(A76, 128, 768, 3072, (8, 8), nnzb).tiles
        launches.append((tiles["k_chunks"], analytical.features(A76, 768, 3072, 128, (8, 8), density)[LAUNCHES]))
    # 32 m tiles of 4 rows: 5 per pass of a 3072-wide slice (7 passes), 8 of a 1536-wide one (4 passes)
    assert launches == [(1, 1 * 7), (2, 2 * 4), (6, 6 * 1)]


def test_gathered_x_reads_shrink_as_kept_columns_run_together():
    """X's L1 misses per block visit fall with density (a kept neighbour's lines stream in) and vanish
    where every block is kept."""
    l2, visits = (analytical.FEATURE_NAMES.index(n) for n in ("l2_bytes", "visits"))
    feats = [analytical.features(A76, 768, 768, 128, (8, 8), d) for d in (0.1, 0.5, 0.9)]
    per_visit = [f[l2] / f[visits] for f in feats]
    assert per_visit[0] > per_visit[1] > per_visit[2] > 0
    assert analytical.features(A76, 768, 768, 128, (8, 8), 1.0)[l2] == 0


def test_outputs_and_inputs_beyond_l2_cost_once_per_call():
    """A call whose X, weights and Y overflow L2 reads X and writes Y beyond it even when the weights
    fit and one pass covers m (4096x256 at m=256: Y is 4 MiB); a small layer stays in L2."""
    l3 = analytical.FEATURE_NAMES.index("l3_bytes")
    assert analytical.features(A76, 4096, 256, 256, (8, 8), 0.05)[l3] > 0
    assert analytical.features(A76, 256, 256, 64, (8, 8), 0.05)[l3] == 0


def test_x_rows_4k_apart_conflict_in_one_l1_set():
    """An m tile's rows of X a multiple of 4 KiB apart share one L1 set (32 KiB, 8 ways of 4 KiB):
    8 rows fill it, 4 keep their lines; rows 3 KiB apart spread over 4 sets."""
    assert analytical.set_conflict_share(A76_32K, 8, 4096) == 1.0
    assert analytical.set_conflict_share(A76_32K, 8, 3 * 4096) == 1.0
    assert analytical.set_conflict_share(A76_32K, 6, 4096) == 0.5
    assert analytical.set_conflict_share(A76_32K, 4, 4096) == 0.0
    assert analytical.set_conflict_share(A76_32K, 8, 3072) == 0.0
    assert analytical.set_conflict_share(A76, 8, 4096) == 0.0  # 64 KiB: 16 ways
    conflicts = analytical.FEATURE_NAMES.index("conflict_lines")
    wide, narrow = (analytical.features(A76_32K, 768, in_, 128, (4, 4), 0.5)[conflicts] for in_ in (1024, 768))
    assert wide > 0 and narrow == 0  # 4x4 on 4-lane NEON: m tiles of 8 rows
    assert analytical.features(A76_32K, 768, 1024, 128, (1, 4), 0.5)[conflicts] == 0  # mvec reads X transposed


# --- the combined model ----------------------------------------------------------------------


SMALL_TRUTH = analytical.Params(2e-6, 1e-6, 3e-11, 5e-9, 2e-8, 3e-10, 1e-10, 2e-11, 1e-10, 2e-9, 1e-10)


def _synthetic_cache(path, target, truth: analytical.Params, blocks) -> LatencyCache:
    cache = LatencyCache(path)
    rows = []
    for block in blocks:
        for out, in_, m, d in [(o, i, m, d) for o in (256, 768) for i in (256, 1024) for m in (32, 128)
                               for d in (0.1, 0.5, 1.0)]:
            feats = analytical.features(target, out, in_, m, block, d)
            rows.append(Measurement(out, in_, m, block, d, float(analytical.latency_from_features(truth, feats))))
    cache.put_many(target.cache_key, rows)
    return cache


def test_predictions_say_where_they_come_from(tmp_path):
    truth = SMALL_TRUTH
    cache = _synthetic_cache(tmp_path / "c.sqlite", A76, truth, [(8, 8), DENSE_BLOCK])
    model = CostModel(A76, cache=cache)
    measured = model.predict(768, 1024, 128, (8, 8), 0.5)
    assert measured.source == "measured"
    fitted = model.predict(512, 640, 64, (8, 8), 0.7)  # a shape never measured
    assert fitted.source == "fitted"
    expected = analytical.latency_from_features(truth, analytical.features(A76, 512, 640, 64, (8, 8), 0.3))
    assert float(fitted) == pytest.approx(expected, rel=0.02)
    assert model.predict(512, 640, 64, (16, 16), 0.7).source == "analytical"
    dense = model.predict(512, 640, 64, (16, 16), 0.0)  # sparsity 0: the dense kernel
    assert dense.source == "fitted" and dense == model.predict(512, 640, 64, (1, 1), 0.0)
    assert isinstance(measured, Prediction) and float(measured) == measured.seconds


def test_fitted_parameters_are_kept_in_the_cache_and_refitted_when_damaged_or_measurements_change(tmp_path, monkeypatch):
    cache = _synthetic_cache(tmp_path / "c.sqlite", A76, SMALL_TRUTH, [(8, 8)])
    fitted, source = CostModel(A76, cache=cache).params((8, 8))
    assert source == "fitted"
    monkeypatch.setattr(analytical, "fit", lambda *args: pytest.fail("fitted again"))
    assert CostModel(A76, cache=cache).params((8, 8)) == (fitted, "fitted")  # recalled, the very same figures
    for key, in cache._execute("SELECT key FROM records WHERE kind=?", (model_module.FIT_RECORD,)):
        cache.put_record(model_module.FIT_RECORD, key, "[1.0, 2.0]")  # damaged: not the parameters
    with pytest.raises(pytest.fail.Exception, match="fitted again"):
        CostModel(A76, cache=cache).params((8, 8))
    cache.put_many(A76.cache_key, [Measurement(512, 512, 64, (8, 8), 0.3, 1e-4)])
    with pytest.raises(pytest.fail.Exception, match="fitted again"):  # new measurements: a new fit
        CostModel(A76, cache=cache).params((8, 8))


def test_grid_matches_single_predictions(tmp_path):
    cache = _synthetic_cache(tmp_path / "c.sqlite", A76, SMALL_TRUTH, BLOCKS + [DENSE_BLOCK])
    model = CostModel(A76, cache=cache)
    sparsities = np.round(np.arange(0.0, 0.96, 0.05), 2)
    grid = model.predict_grid(768, 1024, 128, BLOCKS, sparsities)
    singles = [[model.predict(768, 1024, 128, b, s).seconds for s in sparsities] for b in BLOCKS]
    np.testing.assert_allclose(grid, singles, rtol=1e-9)


def test_measure_none_refuses_to_measure(tmp_path):
    model = CostModel(A76, measure="none", cache=LatencyCache(tmp_path / "c.sqlite"))
    with pytest.raises(OptionError, match="--measure none"):
        model.measure(64, 64, 16, (8, 8), 0.5)
    with pytest.raises(OptionError, match="sparsity 1.0"):
        model.predict(64, 64, 16, (8, 8), 1.0)
    with pytest.raises(OptionError, match="cannot run on this machine"):
        CostModel(A76, measure="local", cache=model.cache)
    with pytest.raises(OptionError, match="expected local, none or rpc://HOST:PORT/KEY"):
        CostModel(A76, measure="rpc://nohost", cache=model.cache)


class _ContendedRunner:
    """Times from known parameters (off them by up to `noise`), except that the first timing of
    `slow_point` reads 3x slow."""

    device = "fake"

    def __init__(self, target, truth, slow_point, noise: float = 0.0):
        self.target, self.truth, self.slow_point, self.noise, self.calls = target, truth, slow_point, noise, []

    def time_layer(self, out, in_, m, block, density):
        self.calls.append((out, in_, m, block, density))
        seconds = float(analytical.latency_from_features(
            self.truth, analytical.features(self.target, out, in_, m, block, density)))
        seconds *= 1 + self.noise * np.sin(out * 7 + in_ * 3 + m + density * 100)  # off the model, as real times are
        first = self.calls.count((out, in_, m, block, density)) == 1
        return 3 * seconds if first and (out, in_, m, block, density) == self.slow_point else seconds


def test_a_warm_model_fits_to_the_last_bit_what_a_cold_one_fitted_from_its_own_timings(tmp_path):
    """A cold compile fits what it timed, in timing order; a warm one what the cache gives back, in the
    cache's order: the two must rank near-equal plans alike (fits 1e-8 apart had sent a warm BERT-base
    search to plans the cold one never validated)."""
    cold = CostModel(A76, cache=LatencyCache(tmp_path / "c.sqlite"))
    cold.runner = _ContendedRunner(A76, SMALL_TRUTH, None, noise=0.05)
    shapes = [(512, 512, 64), (256, 256, 32), (512, 256, 64), (256, 512, 32)]  # not in the cache's key order
    # 1 - 0.95 and 1 - 0.7: densities as a search asks for them, a few ulps off what the cache keeps
    cold.fill(shapes, blocks=[(8, 8)], densities=[0.75, 1 - 0.95, 0.5, 1 - 0.7], progress=False, recheck=False)
    fitted = cold.params((8, 8))
    assert fitted[1] == "fitted" and CostModel(A76, cache=LatencyCache(tmp_path / "c.sqlite")).params((8, 8)) == fitted


def test_fill_measures_what_is_missing_and_retimes_outliers(tmp_path):
    truth = SMALL_TRUTH
    model = CostModel(A76, cache=LatencyCache(tmp_path / "c.sqlite"))
    slow = (256, 512, 32, (8, 8), 0.5)
    model.runner = _ContendedRunner(A76, truth, slow)
    shapes = [(256, 256, 32), (256, 512, 32), (512, 256, 64), (512, 512, 64)]
    densities = [0.1, 0.25, 0.5, 0.75]
    # per shape: the dense kernel in each of its two block shapes, 8x8 at each density
    assert model.fill(shapes, blocks=[(8, 8)], densities=densities, progress=False) == 4 * (2 + 4)
    assert model.runner.calls.count(slow) == 2  # the outlier was timed again, nothing else was
    assert len(model.runner.calls) == 25
    expected = analytical.latency_from_features(truth, analytical.features(A76, *slow))
    assert model.cache.get(A76.cache_key, *slow) == pytest.approx(float(expected))
    assert model.missing(shapes, [(8, 8)], densities) == []
    assert model.fill(shapes, blocks=[(8, 8)], densities=densities, progress=False) == 0


def test_the_dense_kernel_takes_its_other_block_shape_only_where_that_measured_clearly_faster():
    """`schedule.dense_blocks`: a dense layer runs in 32x16 blocks where those measured at most
    DENSE_SWITCH_GAIN of the default's time; unmeasured, or within noise of it, in the default's."""
    wide = schedule.WIDE_DENSE_BLOCK
    default = Measurement(768, 3072, 1, DENSE_BLOCK, 1.0, 10e-6)
    for wide_seconds, expected in [(9.4e-6, (wide, 9.4e-6)), (9.7e-6, (schedule.DENSE_BLOCK, 10e-6)),
                                   (None, (schedule.DENSE_BLOCK, 10e-6))]:
        rows = [default] + ([Measurement(768, 3072, 1, wide, 1.0, wide_seconds)] if wide_seconds else [])
        model = CostModel.from_measurements(A76, rows)
        options = model.dense_options(768, 3072, 1)
        assert set(options) == {schedule.DENSE_BLOCK} | ({wide} if wide_seconds else set())
        block, prediction = model_module.faster_dense(options)
        assert (block, prediction.seconds) == (expected[0], pytest.approx(expected[1]))
        assert model.predict(768, 3072, 1, (8, 8), 0.0) == prediction  # sparsity 0 is that kernel
    gpu = resolve_target("cuda:sm_90")  # one dense block shape on CUDA: a 32x16 time there is not used
    model = CostModel.from_measurements(gpu, [Measurement(768, 3072, 1, DENSE_BLOCK, 1.0, 10e-6),
                                              Measurement(768, 3072, 1, wide, 1.0, 1e-6)])
    assert set(model.dense_options(768, 3072, 1)) == {schedule.DENSE_BLOCK}
    assert model.predict(768, 3072, 1, (8, 8), 0.0).seconds == pytest.approx(10e-6)
