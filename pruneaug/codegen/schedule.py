"""Which layout and tiles a block-sparse (or dense) matmul kernel gets, per target: decided here alone.

    >>> kernel_schedule(resolve_target("x86"), 128, 768, 768, (8, 8), 864)
    Schedule(layout='rowvec', tiles={'m_tile': 8, 'k_chunks': 1, 'x_bytes_per_pass': 262144})

`bsr.py` builds its kernels with these tiles and `cost_model/analytical.py` counts the work of the
same tiles, so the two cannot drift apart; hence this module imports no TVM (the cost model runs
without it). `tiles` are the keyword arguments of the layout's TIR builder: `cpu_kernels.rowvec_matmul`,
`cpu_kernels.mvec_matmul`; for "cuda", `m_tile` is the one `cuda_kernels.bsr_matmul` derives from
`CUDA_THREADS_PER_BLOCK` (a test checks that they agree). The choices come from the figures of
`tools/bench_kernels.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a runtime import would be circular: cost_model imports this module
    from pruneaug.cost_model.targets import TargetProfile

DENSE_BLOCK = (16, 32)  # the dense kernel is the BSR kernel with every block of this shape kept
MIN_BLOCKS_PER_CHUNK = 16  # kept blocks per block row and column chunk that pay for a chunk's pass over Y
X_BYTES_IN_L2 = 256 * 1024  # the part of X a rowvec kernel keeps hot while all block rows go over it
CUDA_THREADS_PER_BLOCK = 256


@dataclass(frozen=True)
class Schedule:
    """A kernel layout ("rowvec", "mvec" or "cuda") and its tile sizes (see the module docstring)."""

    layout: str
    tiles: dict[str, int]


def kernel_schedule(target: TargetProfile, m: int, out: int, in_: int, block: tuple[int, int],
                    nnz_blocks: int) -> Schedule:
    """The schedule of `Y[m, out] = X[m, in] @ W.T` with `nnz_blocks` kept `r x c` blocks on `target`.

    On CPUs: vectorise over a block's rows when they fill a register ("rowvec"), else over m
    ("mvec": thin blocks 1x1, 1x4, 4x1), unless m is too small to fill one. Register tiles of 8
    accumulators; a rowvec m tile that divides m (a clamped tail tile cost up to 2x); column chunks
    keep X in L2 (dense 768x3072: 0.69x -> 0.99x of onnxruntime) but each costs a pass over Y, so
    they are used only with enough kept blocks per row and chunk; an mvec m tile of a power-of-two
    number of vectors (a tile of 5 vectors, m=40, ran 4x slower than one of 8).
    """
    r, _ = block
    if target.kind == "cuda":  # one thread per (row of a block, m) in a thread block
        return Schedule("cuda", {"m_tile": max(1, min(m, CUDA_THREADS_PER_BLOCK // r))})
    lanes = target.simd_lanes
    if r >= lanes or m < lanes:
        cap = max(1, min(m, 8 // -(-r // lanes)))
        divisor = max(t for t in range(1, cap + 1) if m % t == 0)
        k_chunks = -(-min(m, 128) * in_ * 4 // X_BYTES_IN_L2)
        blocks_per_row = nnz_blocks / -(-out // r)
        k_chunks = max(1, min(k_chunks, int(blocks_per_row // MIN_BLOCKS_PER_CHUNK)))
        return Schedule("rowvec", {"m_tile": divisor if 2 * divisor >= cap else cap, "k_chunks": k_chunks,
                                   "x_bytes_per_pass": X_BYTES_IN_L2})
    row_group = 4 if r % 4 == 0 else 2 if r % 2 == 0 else 1
    # at least 8 (the kernel stages X in 8-row strips: 4-lane NEON with m = 4..7 would otherwise get 4)
    m_tile = max(8, min(64 // row_group, lanes * 2 ** (-(-m // lanes) - 1).bit_length()))
    return Schedule("mvec", {"row_group": row_group, "m_tile": m_tile, "out_tile": 2 * lanes})
