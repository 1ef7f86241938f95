"""Timing the real kernels of `pruneaug.codegen.bsr`, here or on a device behind TVM's RPC tracker.

    >>> runner = make_runner(resolve_target("x86"), "local")
    >>> runner.time_layer(768, 768, 128, (8, 8), 0.2)    # median seconds per call
    0.00021

`--measure` picks the runner: `local` compiles and times on this machine (the host, or its GPU for
cuda); `rpc://HOST:PORT/KEY` asks the tracker at HOST:PORT for a device registered under KEY,
exports each kernel with the target's compiler (`aarch64-linux-gnu-gcc` for arm64), uploads and
times it there; `none` measures nothing. A device that goes away mid-measurement raises
`DeviceLost`, which the cost model turns into a warning and a fall back to predictions.

Each kernel is timed as samples of `number` back-to-back calls, `number` sized so that one sample
lasts at least `SAMPLE_S` (timer and scheduler granularity vanish in it), in rounds (`collect`):
on a quiet machine the clean samples agree (interquartile range under STABLE_SPREAD) after a round
or two and the figure is their median; otherwise sampling goes on, spread out by short pauses, to
MAX_ROUNDS rounds, and the figure falls back to the fastest sample (other processes only ever slow
a kernel down).
Locally, on a CPU, a kernel without a parallel loop runs on the calling thread and is timed by that
thread's CPU time alone (`runs_on_caller`). Each sample of any other kernel is paired with a sample
of a fixed REFERENCE kernel taken just before it, and the figure is the ratio's median times the
reference's quiet time (`LocalRunner`): on this shared 2-core VM, load from other processes (which
also slows a thread through a busy sibling core or shared caches, where no clock can see it) lasts
long enough to slow both samples of a pair alike. (A serial kernel paired with the reference, which
runs on the pool, was not slowed alike: four timings of the CNN's 64x288 conv at 1x4 blocks and 5%
read 1.48-2.24 µs paired and 2.28-2.39 µs by CPU time.)
A sample is clean unless its clock says otherwise (`sample_clock`):
- one thread on this machine: the calling thread's CPU time (TVM runs a one-thread kernel on the
  caller), so time spent preempted is not counted at all: the same kernel's wall time swung
  1.4-8 ms where its CPU time stayed within ±6%; such samples are never marked contended.
- several threads on this machine: wall time, marked contended when our threads waited in the
  run queue (`/proc/self/task/*/schedstat`, nanoseconds) for more than `CONTENDED_WAIT` of the
  sample's wall time, or the hypervisor stole CPU time meanwhile (`/proc/stat`).
- a remote device: its own timer, no contention information.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from pruneaug.cost_model.cache import DENSE_BLOCK, LatencyCache
from pruneaug.cost_model.conv_shape import ConvShape
from pruneaug.cost_model.targets import TargetProfile
from pruneaug.errors import CodegenError, OptionError

_RPC_RE = re.compile(r"^rpc://(?P<host>[^:/]+):(?P<port>\d+)/(?P<key>[^/]+)$")
SAMPLE_S = 2e-3  # one sample (a batch of back-to-back calls) lasts at least this long
ROUND = 8  # samples taken between checks of whether the clean ones agree
MAX_ROUNDS = 5
MIN_CLEAN = 5  # clean samples needed for a median
STABLE_SPREAD = 0.05  # interquartile range / median of the clean samples that ends the sampling
CONTENDED_WAIT = 0.05  # run-queue wait per thread, as a share of a sample's wall time, that marks it contended
PAUSE_S = 0.01  # pause after an unsettled round, times the round's number: spreads the samples over time
_ARM64_CC = "aarch64-linux-gnu-gcc"
HOST = "x86"  # the target that is this machine
REFERENCE = (512, 512, 64, (8, 8), 0.5)  # (out, in, m, block, density) of the kernel each local sample is paired with


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


@dataclass(frozen=True)
class Sample:
    """Seconds per call over one batch of calls, and whether other processes slowed it (see the module docstring)."""

    seconds: float
    contended: bool = False


def settled(samples: list[Sample]) -> bool:
    """At least MIN_CLEAN clean samples, and they agree (relative interquartile range under STABLE_SPREAD)."""
    clean = [s.seconds for s in samples if not s.contended]
    if len(clean) < MIN_CLEAN:
        return False
    q1, median, q3 = np.percentile(clean, [25, 50, 75])
    return (q3 - q1) / median < STABLE_SPREAD


def summarise(samples: list[Sample], fallback: Callable[[list[float]], float] = min) -> tuple[float, bool]:
    """(figure, settled): the median of the clean samples where they agree, else `fallback` of all of them."""
    if settled(samples):
        return float(np.median([s.seconds for s in samples if not s.contended])), True
    return float(fallback([s.seconds for s in samples])), False


def collect(take_sample: Callable[[], Sample], pause: Callable[[float], None] = time.sleep,
            fallback: Callable[[list[float]], float] = min) -> tuple[float, bool]:
    """(figure, settled) from `take_sample()`: rounds of ROUND samples until `settled`, at most
    MAX_ROUNDS, with a growing pause after each unsettled round (see `summarise`)."""
    samples: list[Sample] = []
    for round_ in range(1, MAX_ROUNDS + 1):
        samples.extend(take_sample() for _ in range(ROUND))
        if settled(samples):
            break
        if round_ < MAX_ROUNDS:
            pause(PAUSE_S * round_)
    return summarise(samples, fallback)


def batch_calls(first_call_s: float) -> int:
    """Calls per sample: enough back-to-back calls to last SAMPLE_S."""
    return max(1, int(np.ceil(SAMPLE_S / max(first_call_s, 1e-7))))


def paired(kernel: Callable[[], Sample], reference: Callable[[], Sample]) -> Sample:
    """A reference sample, then a kernel sample: their ratio, contended if either was."""
    ref, own = reference(), kernel()
    return Sample(own.seconds / ref.seconds, own.contended or ref.contended)


def host_threads() -> int:
    """The threads TVM runs a kernel with here (`pool.pool_threads`)."""
    from pruneaug.pool import pool_threads

    return pool_threads()


def running_profile(target: TargetProfile) -> TargetProfile:
    """`target` as kernels run on it: the host's `cores` are the threads TVM uses (`host_threads`),
    so that a one-thread figure is neither cached under nor predicted for two threads."""
    if target.name != HOST or target.cores == host_threads():
        return target
    return replace(target, cores=host_threads())


def run_queue_wait_s() -> float:
    """Seconds this process's threads have spent runnable but waiting for a core (Linux schedstat; 0 elsewhere)."""
    waited = 0
    for path in glob.glob("/proc/self/task/*/schedstat"):
        try:
            with open(path, encoding="ascii") as stat:
                waited += int(stat.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile, or no schedstat
    return waited * 1e-9


def steal_s() -> float:
    """Seconds of CPU time the hypervisor has taken from this machine's CPUs (0 where not reported)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def cpu_clock(run: Callable[[], float], calls: int) -> Sample:
    """One-thread kernels: this thread's CPU time per call (preemption is not counted, so never contended)."""
    start = time.thread_time()
    run()
    return Sample((time.thread_time() - start) / calls)


def wall_clock(threads: int, wait_probe: Callable[[], float] = run_queue_wait_s,
               steal_probe: Callable[[], float] = steal_s) -> Callable[[Callable[[], float], int], Sample]:
    """Multi-thread kernels: `run()`'s own wall time per call, contended when our threads waited for a
    core longer than CONTENDED_WAIT of the sample (per thread) or CPU time was stolen meanwhile."""

    def clock(run: Callable[[], float], calls: int) -> Sample:
        waited, stolen, start = wait_probe(), steal_probe(), time.perf_counter()
        seconds = run()
        wall = time.perf_counter() - start
        waited, stolen = wait_probe() - waited, steal_probe() - stolen
        return Sample(seconds, waited > CONTENDED_WAIT * wall * threads or stolen > 0)

    return clock


def device_clock(run: Callable[[], float], calls: int) -> Sample:
    """A remote device: its own timer's figure, with nothing known about contention there."""
    return Sample(run())


def sample_clock(target: TargetProfile, threads: int) -> Callable[[Callable[[], float], int], Sample]:
    """The clock for local kernels of `target` run with `threads` threads (see the module docstring)."""
    if target.kind == "cuda":
        return device_clock  # CUDA events: the host's load does not enter
    return cpu_clock if threads == 1 else wall_clock(threads)


def random_weight(out: int, in_: int, block: tuple[int, int], density: float) -> tuple[np.ndarray, tuple[int, int]]:
    """A layer's canonical weight as the cost model times it (random, seeded: `block`s kept at `density`,
    or for block (0, 0) every weight) and the block the kernel is built with (the dense kernel's for (0, 0))."""
    from pruneaug.codegen import bsr

    if tuple(block) == DENSE_BLOCK:
        return np.random.default_rng(0).standard_normal((out, in_), dtype=np.float32), bsr.DENSE_BLOCK
    return bsr.random_bsr_weight(out, in_, tuple(block), density, seed=0).to_dense(), tuple(block)


def build_kernel(target: TargetProfile, out: int, in_: int, m: int, block: tuple[int, int], density: float):
    """The codegen kernel for one layer (`random_weight`; block (0, 0) is the dense kernel)."""
    from pruneaug.codegen import bsr

    w2d, kernel_block = random_weight(out, in_, block, density)
    return bsr.bsr_matmul_kernel(target, m, bsr.to_bsr(w2d, kernel_block))


def build_conv_calls(target: TargetProfile, conv: ConvShape, block: tuple[int, int], density: float):
    """The kernels the artifact calls for one Conv (`codegen.conv_lowering`), with `random_weight`."""
    from pruneaug.codegen import conv_lowering

    out, in_, _ = conv.matmul
    w2d, kernel_block = random_weight(out, in_, block, density)
    return conv_lowering.conv_calls(target, conv.x_shape, w2d, kernel_block, conv.kernel, conv.strides, conv.pads,
                                    conv.dilations)


class KernelTimer:
    """What a runner times: a matmul layer or a Conv's calls, each through the runner's `time_kernel`."""

    target: TargetProfile

    def time_kernel(self, kernel, x_shape: tuple[int, ...]) -> float:
        raise NotImplementedError

    def time_layer(self, out: int, in_: int, m: int, block: tuple[int, int], density: float) -> float:
        """Seconds of one matmul layer's kernel (block (0, 0): dense)."""
        return self.time_kernel(build_kernel(self.target, out, in_, m, block, density), (m, in_))

    def time_conv(self, conv: ConvShape, block: tuple[int, int], density: float) -> float:
        """Seconds of a Conv's kernels (a strided conv's phase split, then the conv), summed."""
        return sum(self.time_kernel(call.kernel, call.x_shape)
                   for call in build_conv_calls(self.target, conv, block, density))


@dataclass
class LocalRunner(KernelTimer):
    """Compiles and times kernels on this machine: a serial one by its CPU time, each sample of any other
    paired with one of the REFERENCE kernel.

    A paired figure is the median ratio of kernel to reference samples times the reference's quiet time,
    calibrated once per cache (`LatencyCache.get_reference`) or per runner without one. Load that
    lasts longer than a pair (other processes' tests, a busy sibling core) slows both alike and
    cancels out: timing 6 kernels three times on this machine at load 4, the spread of a kernel's
    figures was 9-63% for the fastest sample and 6-15% for the ratio. A reference calibrated under
    load scales every figure of that cache alike, which the search's comparisons do not see.
    `unsettled` counts the kernels whose samples never settled. CUDA kernels are timed alone (the
    host's load does not reach a GPU's events).
    """

    target: TargetProfile
    device: str = "local"
    unsettled: int = 0
    cache: LatencyCache | None = None

    def __post_init__(self) -> None:
        self._reference: tuple[Bench, float] | None = None

    def _bench(self, kernel, x_shape: tuple[int, ...], clock: Callable | None = None) -> Bench:
        import tvm

        from pruneaug.codegen import bsr

        module = bsr.compile_kernel(kernel, self.target)
        dev = tvm.cuda(0) if self.target.kind == "cuda" else tvm.cpu(0)
        return Bench(module, kernel, x_shape, dev, clock or sample_clock(self.target, host_threads()))

    def reference(self) -> tuple[Bench, float]:
        """The REFERENCE kernel and its quiet seconds per call (cached, else calibrated now: the
        median of agreeing samples, or the fastest of MAX_ROUNDS rounds)."""
        if self._reference is None:
            out, in_, m, _, _ = REFERENCE
            bench = self._bench(build_kernel(self.target, *REFERENCE), (m, in_))
            seconds = self.cache.get_reference(self.target.cache_key) if self.cache is not None else None
            if seconds is None:
                seconds, _ = collect(bench.sample)
                if self.cache is not None:
                    self.cache.put_reference(self.target.cache_key, seconds)
            self._reference = (bench, seconds)
        return self._reference

    def time_kernel(self, kernel, x_shape: tuple[int, ...]) -> float:
        """Median seconds per call of one kernel reading an X of `x_shape` (see the class docstring)."""
        if self.target.kind == "cuda":
            seconds, clean = collect(self._bench(kernel, x_shape).sample)
        elif runs_on_caller(kernel):
            seconds, clean = collect(self._bench(kernel, x_shape, cpu_clock).sample)
        else:
            bench = self._bench(kernel, x_shape)
            reference, reference_s = self.reference()
            ratio, clean = collect(lambda: paired(bench.sample, reference.sample), fallback=np.median)
            seconds = ratio * reference_s
        self.unsettled += not clean
        return seconds


@dataclass
class RpcRunner(KernelTimer):
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

    def time_kernel(self, kernel, x_shape: tuple[int, ...]) -> float:
        """Median seconds per call of one kernel on the device, by its own timer."""
        from pruneaug.codegen import bsr

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
                return collect(Bench(remote_module, kernel, x_shape, dev, device_clock).sample)[0]
            except Exception as err:  # noqa: BLE001 - a broken session surfaces as assorted TVM errors
                self._session = None
                raise DeviceLost(self.device, err) from err


def runs_on_caller(kernel) -> bool:
    """Whether a CPU kernel has no parallel loop, so that TVM runs it on the calling thread whatever the
    pool's size (read off its printed TIR: TVM 0.27's Python API has no statement visitor)."""
    return "T.parallel" not in kernel.primfunc.script()


class Bench:
    """One compiled kernel, its arguments made once, sampled with `clock` in batches of `number` calls.

    One evaluator is reused, so a sample times the kernel alone (TVM's evaluator makes one untimed
    call before its batch, hence `number + 1` calls for the clock).
    """

    def __init__(self, module, kernel, x_shape: tuple[int, ...], dev, clock):
        from pruneaug.codegen.bsr import kernel_arguments

        self._args = kernel_arguments(kernel, np.random.default_rng(1).standard_normal(x_shape, dtype=np.float32), dev)
        warm = module.time_evaluator(kernel.name, dev, number=1, repeat=3)(*self._args).results
        self.number = batch_calls(min(warm))
        self._timer = module.time_evaluator(kernel.name, dev, number=self.number, repeat=1)
        self._clock = clock

    def sample(self) -> Sample:
        return self._clock(lambda: float(self._timer(*self._args).mean), self.number + 1)


def make_runner(target: TargetProfile, measure: str, cache: LatencyCache | None = None) -> LocalRunner | RpcRunner | None:
    """The runner `--measure` names, or None for `none`; a malformed value is an OptionError.
    `cache` keeps the local runner's reference time."""
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
        return LocalRunner(target, cache=cache)
    match = _RPC_RE.match(measure)
    if not match:
        raise OptionError(f"--measure {measure!r}: expected local, none or rpc://HOST:PORT/KEY")
    return RpcRunner(target, match["host"], int(match["port"]), match["key"])
