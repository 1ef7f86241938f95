"""When a loop nest is worth the thread pool: one rule for the PrimFuncs that are not BSR kernels
(TVM's scheduled ops, layer norm, softmax, a strided conv's phase split; the BSR kernels decide by
`schedule.runs_parallel`)."""
from __future__ import annotations

# A block runs in parallel from this many iterations up (elements of an elementwise op, multiply-adds
# of a matmul or a conv): below it a fork and join of the thread pool cost more than they save. At 2
# threads, one plan of each bundled model built at 2^14, 2^16 and 2^18 and timed interleaved (medians):
# CNN batch 1 22.0 / 19.2 / 19.9 µs (its 37k-MAC depthwise conv: 6.1 µs on the pool, 3.4 µs serial),
# encoder batch 1 111.6 / 106.4 / 106.2 µs, encoder batch 32 1913 / 1915 / 2185 µs, CNN batch 32
# 979 / 970 / 1084 µs. (2^14 had been 6-11% faster than always forking on the encoder at batch 1.)
PARALLEL_MIN_WORK = 1 << 16


def worth_parallel(work: int, cores: int) -> int:
    """1 where `work` iterations (elements, or multiply-adds) pay for a fork and join of the thread pool."""
    return int(cores > 1 and work >= PARALLEL_MIN_WORK)
