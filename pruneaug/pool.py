"""How many threads TVM's thread pool runs kernels with in a process that imported pruneaug.

TVM sizes its pool once, when a process first uses it: TVM_NUM_THREADS, else on x86 half the
hardware threads, assuming two hyper-threads per core. On a VM whose vCPUs are one thread per core
(this project's 2-core CI machines) that is one thread for two cores. The cost model then measured,
and the artifact ran, kernels built with a parallel loop for two cores on a pool of one: the
encoder's 512x128 kernel at m=16 took 18 µs so against 10 µs built serial and 8.6 µs on two threads,
and its whole model 1.6x as long as its all-serial build. So `import pruneaug` sets TVM_NUM_THREADS,
where the user has not, to the physical cores this process may run on (`physical_cores`), before
pruneaug starts the pool; `pool_threads` is what the pool then holds, whoever sized it.

It also sets TVM_BIND_THREADS=0 where the user has not: TVM otherwise pins each worker thread to
one core, and on a shared VM a pinned worker cannot leave a vCPU the host is slowing. The bundled
CNN's artifact at batch 32 (its parallel build), in 20 fresh processes each: pinned, 4 ran at
131-190 µs (and in other runs single processes at 168 and 263 µs) and the rest at 110-123 µs;
unpinned, all ran at 109-120 µs (its serial build: 168 µs). A slow process stayed slow for its
whole life, so a pick or a benchmark that met one misjudged the build.
"""
from __future__ import annotations

import os
from pathlib import Path

THREADS_VARIABLE = "TVM_NUM_THREADS"
BIND_VARIABLE = "TVM_BIND_THREADS"
CPU_TOPOLOGY = Path("/sys/devices/system/cpu")


def physical_cores(cpus: set[int] | None = None, topology: Path = CPU_TOPOLOGY) -> int:
    """Cores among `cpus` (default: those this process may run on), hyper-threads of one core counted
    once (by their sibling lists); every CPU counts where the topology cannot be read."""
    cpus = os.sched_getaffinity(0) if cpus is None else cpus
    try:
        cores = {(topology / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip() for cpu in cpus}
    except OSError:
        return len(cpus)
    return len(cores)


def size_pool_by_default() -> None:
    """TVM_NUM_THREADS = `physical_cores()` and TVM_BIND_THREADS = 0 (threads not pinned), each unless it is
    set (they must be, before TVM's pool starts, to count)."""
    if not os.environ.get(THREADS_VARIABLE):
        os.environ[THREADS_VARIABLE] = str(physical_cores())
    if not os.environ.get(BIND_VARIABLE):
        os.environ[BIND_VARIABLE] = "0"


def pool_threads() -> int:
    """The threads TVM's pool in this process runs a parallel kernel with (it starts the pool if it has not;
    importing this module ran `size_pool_by_default` first, through the package's import)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())
