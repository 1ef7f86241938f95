"""Measuring real kernels: the timing protocol, locally, and through a TVM RPC tracker on loopback."""
from __future__ import annotations

import dataclasses
import importlib.util
import socket
import time

import numpy as np
import pytest

from pruneaug.cost_model import CostModel, Prediction
from pruneaug.cost_model import measured
from pruneaug.cost_model.cache import LatencyCache
from pruneaug.cost_model.conv_shape import ConvShape
from pruneaug.cost_model.measured import (MAX_ROUNDS, MIN_CLEAN, PAUSE_S, REFERENCE, ROUND, LocalRunner, Sample,
                                          batch_calls,
                                          collect, paired, cpu_clock, device_clock, measure_peaks, run_queue_wait_s,
                                          running_profile, sample_clock, steal_s, summarise, wall_clock, build_kernel)
from pruneaug.cost_model.targets import resolve_target

needs_kernels = pytest.mark.skipif(importlib.util.find_spec("pruneaug.codegen.bsr") is None,
                                   reason="pruneaug/codegen/bsr.py (the kernels to measure) is not there yet")
A76 = resolve_target("arm64")
SHAPE = (64, 96, 16)  # out, in, m: small enough to compile and time in about a second


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache."""
    monkeypatch.setenv("PRUNEAUG_CACHE", str(tmp_path / "latency.sqlite"))


def test_samples_last_two_milliseconds_and_stop_once_clean_ones_agree():
    assert batch_calls(1e-5) == 200 and batch_calls(5e-3) == 1  # 200 calls of 10 us: one 2 ms sample
    taken = []

    def steady():
        taken.append(1)
        return Sample(1e-5 * (1 + 0.01 * (len(taken) % 3)))

    seconds, settled = collect(steady, pause=pytest.fail)
    assert settled and seconds == pytest.approx(1.01e-5)
    assert len(taken) == ROUND  # one round was enough


def test_samples_that_never_agree_take_every_round_and_give_the_fallback():
    """Load from other processes only slows a kernel: without agreement the fastest sample is the figure."""
    values = np.random.default_rng(0).permutation(np.linspace(1e-3, 3e-3, ROUND * MAX_ROUNDS))
    times, pauses = iter(values), []
    seconds, settled = collect(lambda: Sample(next(times)), pause=pauses.append)
    assert not settled and seconds == pytest.approx(1e-3)
    assert next(times, None) is None  # all MAX_ROUNDS rounds were sampled
    assert pauses == [PAUSE_S * k for k in range(1, MAX_ROUNDS)]  # growing pauses spread them out
    times = iter(values)
    assert collect(lambda: Sample(next(times)), pause=pauses.append, fallback=np.median)[0] == pytest.approx(2e-3)


def test_contended_samples_are_left_out_of_the_median():
    """A burst of load: the first round is contended (slow), the next round is clean and agrees."""
    taken, pauses = [], []

    def bursty():
        taken.append(1)
        return Sample(5e-3, contended=True) if len(taken) <= ROUND else Sample(1e-3)

    assert collect(bursty, pause=pauses.append) == (1e-3, True)
    assert len(taken) == 2 * ROUND and pauses == [PAUSE_S]
    assert summarise([Sample(2e-3, True)] * 3 + [Sample(1e-3)] * MIN_CLEAN) == (1e-3, True)
    assert summarise([Sample(2e-3, True)] * 9 + [Sample(1.5e-3)] * (MIN_CLEAN - 1)) == (1.5e-3, False)


def test_a_pair_is_the_kernel_over_the_reference_and_load_on_both_cancels():
    """Lasting load slows the kernel and the reference sample taken just before it alike."""
    ratios = [paired(lambda s=slowdown: Sample(3e-3 * s), lambda s=slowdown: Sample(1e-3 * s))
              for slowdown in (1.0, 2.5, 1.7)]
    assert [r.seconds for r in ratios] == pytest.approx([3.0, 3.0, 3.0])
    assert paired(lambda: Sample(3e-3), lambda: Sample(1e-3, contended=True)).contended


class _FakeBench:
    """A compiled kernel whose samples read `seconds` (a machine `load` times slower)."""

    def __init__(self, seconds, load=1.0):
        self.seconds, self.load = seconds, load

    def sample(self):
        return Sample(self.seconds * self.load)


REFERENCE_X = (REFERENCE[2], REFERENCE[1])  # the reference kernel's X: m rows of `in`


def test_local_figures_are_reference_ratios_and_the_reference_is_calibrated_once(tmp_path, monkeypatch):
    """For kernels with a parallel loop (`runs_on_caller` says no)."""
    monkeypatch.setattr(measured, "runs_on_caller", lambda kernel: False)
    host = resolve_target("x86")
    cache = LatencyCache(tmp_path / "c.sqlite")
    quiet = LocalRunner(host, cache=cache)
    monkeypatch.setattr(quiet, "_bench", lambda kernel, x_shape: _FakeBench(1e-3 if x_shape == REFERENCE_X else 3e-3))
    assert quiet.time_layer(64, 64, 16, (8, 8), 0.5) == pytest.approx(3e-3)
    assert cache.get_reference(host.cache_key) == pytest.approx(1e-3)
    loaded = LocalRunner(host, cache=LatencyCache(tmp_path / "c.sqlite"))  # a later fill, on a busy machine
    monkeypatch.setattr(loaded, "_bench", lambda kernel, x_shape: _FakeBench(1e-3 if x_shape == REFERENCE_X else 3e-3, load=2.5))
    assert loaded.reference()[1] == pytest.approx(1e-3)  # the cache's calibration, not a new one
    assert loaded.time_layer(64, 64, 16, (8, 8), 0.5) == pytest.approx(3e-3)
    assert loaded.unsettled == 0


def test_a_serial_kernel_is_timed_by_cpu_time_without_the_reference(tmp_path, monkeypatch):
    """A kernel that runs on the calling thread is not paired with the reference (which runs on the pool,
    so that load did not slow the two alike); the reference is never calibrated for it."""
    host = dataclasses.replace(resolve_target("x86"), cores=2)
    cache = LatencyCache(tmp_path / "c.sqlite")
    runner = LocalRunner(host, cache=cache)
    clocks = []
    monkeypatch.setattr(runner, "_bench", lambda kernel, x_shape, clock=None: clocks.append(clock) or _FakeBench(2e-6))
    assert runner.time_layer(64, 64, 1, (8, 8), 0.2) == pytest.approx(2e-6)  # 13 kept blocks at m=1: serial
    assert clocks == [cpu_clock] and cache.get_reference(host.cache_key) is None
    serial = build_kernel(host, 64, 64, 1, (8, 8), 0.2)
    parallel = build_kernel(host, 1024, 1024, 256, (8, 8), 0.5)
    assert measured.runs_on_caller(serial) and not measured.runs_on_caller(parallel)


def test_wall_clock_flags_run_queue_waits_and_stolen_time():
    waits, steals = iter([0.0, 0.0]), iter([0.0, 0.0])
    clock = wall_clock(2, wait_probe=lambda: next(waits), steal_probe=lambda: next(steals))
    assert clock(lambda: 1e-3, 10) == Sample(1e-3, False)
    waits, steals = iter([0.0, 1.0]), iter([0.0, 0.0])  # our threads queued for a second
    assert clock(lambda: 1e-3, 10).contended
    waits, steals = iter([0.0, 0.0]), iter([5.0, 5.01])  # the hypervisor took a tick
    assert clock(lambda: 1e-3, 10).contended
    assert run_queue_wait_s() >= 0.0 and steal_s() >= 0.0


def test_cpu_clock_does_not_count_time_off_the_core():
    """A one-thread kernel preempted by another process: wall time grows, this thread's CPU time does not."""
    sample = cpu_clock(lambda: time.sleep(0.05) or 0.05, calls=5)
    assert not sample.contended and sample.seconds < 0.005


def test_clocks_per_target_and_thread_count():
    host = resolve_target("x86")
    assert sample_clock(host, 1) is cpu_clock
    assert sample_clock(resolve_target("cuda"), 4) is device_clock
    assert sample_clock(host, 2) not in (cpu_clock, device_clock)


def test_host_cores_are_the_threads_tvm_runs_with(monkeypatch):
    """Figures timed with one thread are cached, fitted and predicted for one core (what sizes the
    pool: tests/test_pool.py)."""
    host = resolve_target("x86")
    monkeypatch.setattr(measured, "host_threads", lambda: 1)
    assert running_profile(host).cores == 1 and running_profile(host).cache_key != host.cache_key
    assert CostModel("x86").target.cores == 1
    assert running_profile(A76) is A76  # a board's cores are its own
    monkeypatch.setattr(measured, "host_threads", lambda: host.cores)
    assert running_profile(host) is host


def test_measure_peaks_gives_plausible_figures():
    gflops, gbps = measure_peaks(seconds=0.2)
    assert 0.1 < gflops < 1e5 and 0.1 < gbps < 1e4


@needs_kernels
@pytest.mark.slow
def test_local_measurement_is_cached_and_never_repeated(tmp_path, monkeypatch):
    host = resolve_target("x86")
    cache = LatencyCache(tmp_path / "c.sqlite")
    model = CostModel(host, measure="local", cache=cache)
    seconds = model.measure(*SHAPE, (8, 8), 0.5)
    assert 0 < seconds < 0.1
    assert cache.get(host.cache_key, *SHAPE, (8, 8), 0.5) == seconds
    again = CostModel(host, measure="local", cache=LatencyCache(tmp_path / "c.sqlite"))
    timed = []
    monkeypatch.setattr(again.runner, "time_layer", lambda out, in_, m, block, density: timed.append(block) or 1e-4)
    assert again.measure(*SHAPE, (8, 8), 0.5) == seconds
    assert again.predict(*SHAPE, (8, 8), 0.5).source == "measured"
    assert again.fill([SHAPE], blocks=[(8, 8)], densities=[0.5], progress=False) == 2
    assert timed == [(0, 0), (32, 16)]  # only the dense kernel was missing, in each of its block shapes
    assert again.predict(*SHAPE, (8, 8), 0.0) == Prediction(1e-4, "measured")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rpc_device():
    """A TVM RPC tracker and one server registered under a key, both on 127.0.0.1 only."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    port = _free_port()
    tracker = Tracker(host="127.0.0.1", port=port, port_end=port + 1, silent=True)
    server_port = _free_port()
    server = rpc.Server(host="127.0.0.1", port=server_port, port_end=server_port + 1,
                        tracker_addr=("127.0.0.1", tracker.port), key="pruneaug-test", silent=True)
    yield tracker, server
    server.terminate()
    tracker.terminate()


@needs_kernels
@pytest.mark.slow
def test_rpc_measurement_is_cached_and_a_lost_device_falls_back(tmp_path, rpc_device):
    tracker, server = rpc_device
    url = f"rpc://127.0.0.1:{tracker.port}/pruneaug-test"
    host = resolve_target("x86")
    cache = LatencyCache(tmp_path / "c.sqlite")
    model = CostModel(host, measure=url, cache=cache)
    seconds = model.measure(*SHAPE, (4, 1), 0.5)
    assert 0 < seconds < 0.1
    assert cache.get(host.cache_key, *SHAPE, (4, 1), 0.5) == seconds
    rows = cache._execute("SELECT device FROM latency")
    assert rows == [(url,)]
    conv = ConvShape(8, (1, 4, 9, 9), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1))  # a strided conv: two kernels each
    assert model.fill([], blocks=[(4, 1)], densities=[0.5], progress=False, convs=[conv]) == 3  # 2 dense, 4x1
    assert model.predict_conv(conv, (4, 1), 0.5).source == "measured"
    assert cache._execute("SELECT device FROM conv_latency") == [(url,)] * 3

    server.terminate()  # the board goes away mid-way through filling the cache
    with pytest.warns(RuntimeWarning, match=f"device {url} stopped answering after 0 of"):
        assert model.fill([SHAPE], blocks=[(4, 1)], densities=[0.25], progress=False) == 0
    assert model.runner is None
    assert model.predict(*SHAPE, (4, 1), 0.75).source in ("fitted", "analytical")
    assert model.predict(*SHAPE, (4, 1), 0.5).source == "measured"


def test_rpc_spec_is_parsed_and_arm64_needs_the_cross_compiler(monkeypatch):
    from pruneaug.cost_model.measured import make_runner
    from pruneaug.errors import CodegenError

    runner = make_runner(resolve_target("arm64"), "rpc://127.0.0.1:9190/rk3588")
    assert (runner.host, runner.port, runner.key, runner.device) == (
        "127.0.0.1", 9190, "rk3588", "rpc://127.0.0.1:9190/rk3588")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(CodegenError, match="needs the cross compiler aarch64-linux-gnu-gcc"):
        runner._fcompile()


class _SpreadBench(_FakeBench):
    """A kernel whose samples swing 1x-2x from one to the next, while the reference stays put."""

    def __init__(self, seconds):
        super().__init__(seconds)
        self.calls = 0

    def sample(self):
        self.calls += 1
        return Sample(self.seconds * (1 + self.calls % 2))


def test_a_fill_whose_samples_never_agree_warns_how_many_and_why(tmp_path, monkeypatch):
    host = resolve_target("x86")
    model = CostModel(host, measure="local", cache=LatencyCache(tmp_path / "c.sqlite"))
    monkeypatch.setattr(model.runner, "_bench", lambda kernel, x_shape, clock=None: _FakeBench(1e-3)
                        if x_shape == REFERENCE_X else _SpreadBench(1e-3))
    # the layer's 8x8 kernel and its dense one in each of its two block shapes
    never_agreed = r"^3 kernels' samples never agreed within 5% \(a loaded or noisy machine\)"
    with pytest.warns(RuntimeWarning, match=never_agreed):
        assert model.fill([(64, 64, 16)], blocks=[(8, 8)], densities=[0.5], progress=False, recheck=False) == 3
    assert model.runner.unsettled == 3
