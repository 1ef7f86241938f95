"""Measuring real kernels: the timing protocol, locally, and through a TVM RPC tracker on loopback."""
from __future__ import annotations

import importlib.util
import socket
import time

import pytest

from pruneaug.cost_model import CostModel, Prediction
from pruneaug.cost_model.cache import LatencyCache
from pruneaug.cost_model.measured import measure_peaks, occupancy, stable_median, uncontended
from pruneaug.cost_model.targets import resolve_target

needs_kernels = pytest.mark.skipif(importlib.util.find_spec("pruneaug.codegen.bsr") is None,
                                   reason="pruneaug/codegen/bsr.py (the kernels to measure) is not there yet")
SHAPE = (64, 96, 16)  # out, in, m: small enough to compile and time in about a second


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache."""
    monkeypatch.setenv("PRUNEAUG_CACHE", str(tmp_path / "latency.sqlite"))


def test_stable_median_batches_to_a_few_milliseconds_and_repeats_when_noisy():
    calls = []

    def noisy(number, repeat):
        calls.append(number)
        return [1e-5, 3e-5] * (repeat // 2) + [2e-5] * (repeat % 2)

    assert stable_median(noisy, first_call_s=1e-5) == pytest.approx(2e-5)
    assert calls == [400, 400, 400]  # 4 ms batches; too spread out, so every round is used
    calls.clear()
    assert stable_median(lambda n, r: calls.append(n) or [1e-3] * r, first_call_s=1e-2) == 1e-3
    assert calls == [1]  # stable at once


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
    assert again.fill([SHAPE], blocks=[(8, 8)], densities=[0.5], progress=False) == 1
    assert timed == [(0, 0)]  # only the dense kernel was missing
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


def test_occupancy_sees_a_descheduled_process():
    """A sleeping process holds no core: what a timing looks like when another process has ours."""
    result, share = occupancy(lambda: time.sleep(0.05) or "done", threads=1)
    assert result == "done" and share < 0.2


def test_contended_timings_are_retried_and_the_fastest_kept(monkeypatch):
    shares = iter([0.5, 0.95])
    monkeypatch.setattr("pruneaug.cost_model.measured.occupancy", lambda run, threads: (run(), next(shares)))
    times = iter([2e-3, 1e-3])
    assert uncontended(lambda: next(times), threads=2) == (1e-3, True)
    monkeypatch.setattr("pruneaug.cost_model.measured.occupancy", lambda run, threads: (run(), 0.5))
    times = iter([3e-3, 2e-3, 4e-3])
    assert uncontended(lambda: next(times), threads=2, tries=3) == (2e-3, False)
