"""How many threads TVM's thread pool runs kernels with in a process that imported pruneaug.

TVM sizes its pool once, when a process first uses it: TVM_NUM_THREADS, else on x86 half the
hardware threads, assuming two hyper-threads per core. On a VM whose vCPUs are one thread per core
(this project's 2-core CI machines) that is one thread for two cores. The cost model then measured,
and the artifact ran, kernels built with a parallel loop for two cores on a pool of one: the
encoder's 512x128 kernel at m=16 took 18 µs so against 10 µs built serial and 8.6 µs on two threads,
and its whole model 1.6x as long as its all-serial build. So `import pruneaug` sets TVM_NUM_THREADS,
where the user has not, to the physical cores this process may run on (`physical_cores`), before
pruneaug starts the pool; `pool_threads` is what the pool then holds, whoever sized it.
"""
from __future__ import annotations

import os
from pathlib import Path

THREADS_VARIABLE = "TVM_NUM_THREADS"
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
    """TVM_NUM_THREADS = `physical_cores()`, unless it is set (it must be, before TVM's pool starts, to count)."""
    if not os.environ.get(THREADS_VARIABLE):
        os.environ[THREADS_VARIABLE] = str(physical_cores())


def pool_threads() -> int:
    """The threads TVM's pool in this process runs a parallel kernel with (it starts the pool if it has not;
    importing this module ran `size_pool_by_default` first, through the package's import)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())
