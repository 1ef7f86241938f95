"""Timing the real kernels of `pruneaug.codegen.bsr`, here or on a device behind TVM's RPC tracker.

    >>> runner = make_runner(resolve_target("x86"), "local")
    >>> runner.time_layer(768, 768, 128, (8, 8), 0.2)    # median seconds per call
    0.00021

`--measure` picks the runner: `local` compiles and times on this machine (the host, or its GPU for
cuda); `rpc://HOST:PORT/KEY` asks the tracker at HOST:PORT for a device registered under KEY,
exports each kernel with the target's compiler (`aarch64-linux-gnu-gcc` for arm64), uploads and
times it there; `none` measures nothing. A device that goes away mid-measurement raises
`DeviceLost`, which the cost model turns into a warning and a fall back to predictions.

Each kernel is timed with warm-up calls, then batches of `number` calls sized to last a few
milliseconds, repeated until the median is stable (relative spread under 5%, at most a few rounds).
Locally, a timing during which another process held one of our cores (seen from this process's
CPU time against the wall time, `occupancy`) is taken again after a short pause.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from pruneaug.cost_model.cache import DENSE_BLOCK
from pruneaug.cost_model.targets import TargetProfile
from pruneaug.errors import CodegenError, OptionError

_RPC_RE = re.compile(r"^rpc://(?P<host>[^:/]+):(?P<port>\d+)/(?P<key>[^/]+)$")
_BATCH_S = 4e-3  # each timed repeat lasts about this long
_REPEAT = 9
_MAX_ROUNDS = 3
_UNCONTENDED = 0.9  # share of wall time our threads must have been on a core for a clean timing
_CONTENDED_TRIES = 4
_ARM64_CC = "aarch64-linux-gnu-gcc"
_STABLE_SPREAD = 0.05


class DeviceLost(RuntimeError):
    """The measuring device stopped answering; `device` names it for the warning."""

    def __init__(self, device: str, cause: BaseException):
        super().__init__(f"{device}: {cause}")
        self.device = device


def measure_peaks(seconds: float = 1.0) -> tuple[float, float]:
    """(fp32 GFLOP/s, memory GB/s) of this machine: best of repeated numpy matmuls and big copies."""
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    b = np.empty_like(a)
    best_matmul = float("inf")
    deadline = time.perf_counter() + seconds / 2
    while time.perf_counter() < deadline or best_matmul == float("inf"):
        start = time.perf_counter()
        np.matmul(a, a, out=b)
        best_matmul = min(best_matmul, time.perf_counter() - start)
    src = np.ones(16 << 20, dtype=np.float32)  # 64 MiB, beyond the caches
    dst = np.full_like(src, 2.0)  # touched, so no page faults are timed
    best_copy = float("inf")
    deadline = time.perf_counter() + seconds / 2
    while time.perf_counter() < deadline or best_copy == float("inf"):
        start = time.perf_counter()
        np.copyto(dst, src)
        best_copy = min(best_copy, time.perf_counter() - start)
    return 2 * 1024**3 / best_matmul / 1e9, 2 * src.nbytes / best_copy / 1e9


def stable_median(time_batch, first_call_s: float) -> float:
    """Median seconds per call from `time_batch(number, repeat) -> list[float]`, repeated until stable."""
    number = max(1, int(np.ceil(_BATCH_S / max(first_call_s, 1e-7))))
    samples: list[float] = []
    for _ in range(_MAX_ROUNDS):
        samples.extend(time_batch(number, _REPEAT))
        q1, median, q3 = np.percentile(samples, [25, 50, 75])
        if (q3 - q1) / median < _STABLE_SPREAD:
            break
    return float(np.median(samples))


def build_kernel(target: TargetProfile, out: int, in_: int, m: int, block: tuple[int, int], density: float):
    """The codegen kernel for one layer (random weights; block (0, 0) is the dense kernel)."""
    from pruneaug.codegen import bsr

    if tuple(block) == DENSE_BLOCK:
        w2d = np.random.default_rng(0).standard_normal((out, in_), dtype=np.float32)
        return bsr.dense_matmul_kernel(target, m, w2d)
    weight = bsr.random_bsr_weight(out, in_, tuple(block), density, seed=0)
    return bsr.bsr_matmul_kernel(target, m, weight)


@dataclass
class LocalRunner:
    """Compiles and times kernels on this machine.

    On a CPU, each timing checks that its threads had the cores to themselves (`uncontended`):
    on a shared machine another process's burst can double a kernel's time. `contended` counts
    the times that stayed contended after a few tries (they are upper bounds). After such a time
    the next kernel is tried once only, so lasting contention does not multiply the filling time.
    """

    target: TargetProfile
    device: str = "local"
    contended: int = 0
    _last_clean: bool = True

    def time_layer(self, out: int, in_: int, m: int, block: tuple[int, int], density: float) -> float:
        import tvm

        from pruneaug.codegen import bsr

        kernel = build_kernel(self.target, out, in_, m, block, density)
        module = bsr.compile_kernel(kernel, self.target)
        if self.target.kind == "cuda":
            return _time(module, kernel, m, in_, tvm.cuda(0))
        threads = int(os.environ.get("TVM_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
        tries = _CONTENDED_TRIES if self._last_clean else 1
        seconds, clean = uncontended(lambda: _time(module, kernel, m, in_, tvm.cpu(0)), threads, tries)
        self.contended += not clean
        self._last_clean = clean
        return seconds


@dataclass
class RpcRunner:
    """Times kernels on a device leased from a TVM RPC tracker (`rpc://HOST:PORT/KEY`)."""

    target: TargetProfile
    host: str
    port: int
    key: str
    session_timeout_s: int = 0
    lease_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self._session = None

    @property
    def device(self) -> str:
        return f"rpc://{self.host}:{self.port}/{self.key}"

    def _remote(self):
        if self._session is None:
            from tvm import rpc

            try:
                tracker = rpc.connect_tracker(self.host, self.port)
                # request() waits for a free device without limit; a timeout on the tracker's
                # socket (with a single try) turns "no such device" into an error.
                tracker._sock.settimeout(self.lease_timeout_s)
                self._session = tracker.request(self.key, priority=1, session_timeout=self.session_timeout_s,
                                                max_retry=1)
                tracker.close()
            except Exception as err:  # noqa: BLE001 - any failure to lease the device is the same to us
                raise DeviceLost(self.device, err) from err
        return self._session

    def _fcompile(self):
        if self.target.kind != "arm64":
            return None
        from tvm.support import cc

        if shutil.which(_ARM64_CC) is None:
            raise CodegenError(f"--measure {self.device}: measuring arm64 kernels needs the cross compiler "
                               f"{_ARM64_CC} (Debian package gcc-aarch64-linux-gnu), which is not on PATH")
        return cc.cross_compiler(_ARM64_CC)

    def time_layer(self, out: int, in_: int, m: int, block: tuple[int, int], density: float) -> float:
        from pruneaug.codegen import bsr

        kernel = build_kernel(self.target, out, in_, m, block, density)
        module = bsr.compile_kernel(kernel, self.target)
        remote = self._remote()
        with tempfile.TemporaryDirectory(prefix="pruneaug-rpc-") as tmp:
            name = f"{kernel.name}_{os.getpid()}_{time.monotonic_ns()}.so"
            path = os.path.join(tmp, name)
            fcompile = self._fcompile()
            if fcompile is None:
                module.export_library(path)
            else:
                module.export_library(path, fcompile=fcompile)
            try:
                remote.upload(path)
                remote_module = remote.load_module(name)
                dev = remote.cuda(0) if self.target.kind == "cuda" else remote.cpu(0)
                return _time(remote_module, kernel, m, in_, dev)
            except Exception as err:  # noqa: BLE001 - a broken session surfaces as assorted TVM errors
                self._session = None
                raise DeviceLost(self.device, err) from err


def _time(module, kernel, m: int, in_: int, dev) -> float:
    """Warm up, then the stable median of batched calls."""
    from pruneaug.codegen import bsr

    x = np.random.default_rng(1).standard_normal((m, in_), dtype=np.float32)
    warm = bsr.time_kernel(module, kernel, x, dev, number=1, repeat=3)
    return stable_median(lambda number, repeat: bsr.time_kernel(module, kernel, x, dev, number, repeat), min(warm))


def occupancy(run, threads: int):
    """(run()'s result, the share of its wall time that this process's `threads` spent on a core).

    TVM's pool threads stay busy between back-to-back calls, so an uncontended timing is near 1;
    about 0.5 on two cores means another process held one of them and the time is inflated.
    """
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    result = run()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result, cpu / max(wall * threads, 1e-9)


def uncontended(run, threads: int, tries: int = _CONTENDED_TRIES) -> tuple[float, bool]:
    """Time with `run()` until no other process shared the cores (a few tries with short pauses);
    returns the time and whether it was clean, else the fastest of the contended tries."""
    fastest = float("inf")
    for attempt in range(tries):
        seconds, share = occupancy(run, threads)
        if share >= _UNCONTENDED:
            return seconds, True
        fastest = min(fastest, seconds)
        time.sleep(0.1 * (attempt + 1))
    return fastest, False


def make_runner(target: TargetProfile, measure: str) -> LocalRunner | RpcRunner | None:
    """The runner `--measure` names, or None for `none`; a malformed value is an OptionError."""
    if measure == "none":
        return None
    if measure == "local":
        if target.kind == "arm64":
            raise OptionError(f"--measure local: target {target.name} cannot run on this machine; "
                              "use --measure rpc://HOST:PORT/KEY for a board or --measure none")
        if target.kind == "cuda":
            import tvm

            if not tvm.cuda(0).exist:
                raise OptionError(f"--measure local: target {target.name} needs a CUDA GPU and this machine has "
                                  "none; use --measure rpc://HOST:PORT/KEY or --measure none")
        return LocalRunner(target)
    match = _RPC_RE.match(measure)
    if not match:
        raise OptionError(f"--measure {measure!r}: expected local, none or rpc://HOST:PORT/KEY")
    return RpcRunner(target, match["host"], int(match["port"]), match["key"])
