"""The analytical latency of one block-sparse (or dense) layer `Y[m, out] = X[m, in] @ W.T`.

    >>> latency(resolve_target("arm64"), 768, 768, 128, (8, 8), 0.9)   # seconds
    4.1e-05

The kernel walks block rows in parallel over the cores; inside a block row it visits each kept
`r x c` block (its column index read from `indices`) once per tile of m and accumulates `r x m`
outputs. So, per core:

    compute = t_flop * flops                  # FMAs of the kept blocks, padded to the vector width and tiles
            + t_block * visits                # per kept block and m tile: index load, loop set-up
            + t_row * row_tiles               # per block row and m tile: accumulator set-up, indptr reads
            + t_out * r*m_pad * rows          # per block row: storing r x m outputs
            + t_in * m_pad*in / cores         # per input element: packing (transposing) X once, where done
            + t_spill * spilled_bytes         # reads of X tiles that miss the per-core cache (X larger than L2)
    memory  = t_byte * bytes                  # weights of kept blocks + indices + indptr + X + Y
    latency = t_call + max(compute, memory)   # roofline, plus the call (or launch) overhead

where the work is the busiest core's share (block rows are dealt out whole, so `ceil(block_rows /
cores)` of them, or whole tasks of several block rows where the kernel groups them: the parallel
efficiency). Ragged edges are padded to full blocks, as the kernels
do; the layout and tiles are the kernels' own (codegen's `schedule.kernel_schedule`), so a row tile
and an output pass are also counted per row group and per column chunk. The dense kernel is
codegen's BSR kernel with every `schedule.DENSE_BLOCK` block kept, so `dense_latency` is that with
its own fitted parameters.

The eight parameters (`Params`) come from the target's hardware figures by default and are fitted by
least squares (`fit`) to measured kernel times per (target, block shape) wherever measurements
exist. Everything is vectorised over numpy arrays so that a model's whole option grid costs one call.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import numpy as np
from scipy.optimize import least_squares

from pruneaug.codegen import schedule
from pruneaug.cost_model.targets import TargetProfile, hardware_peaks

_F32 = 4
_INDEX_BYTES = 4


@dataclass(frozen=True)
class Params:
    """Seconds per unit of each cost term (see the module docstring)."""

    t_call: float
    t_flop: float
    t_block: float
    t_row: float
    t_out: float
    t_in: float
    t_spill: float
    t_byte: float

    def array(self) -> np.ndarray:
        return np.array(astuple(self), dtype=np.float64)

    @classmethod
    def from_array(cls, values: np.ndarray) -> "Params":
        return cls(*(float(v) for v in values))


PARAM_NAMES = tuple(f.name for f in fields(Params))


def default_params(target: TargetProfile, dense: bool = False) -> Params:
    """Parameters from the target's datasheet figures: what is assumed before anything is measured.

    Sparse kernels are assumed to reach half of the per-core fp32 peak (index indirection, short
    inner loops), dense ones 70%; a block visit costs about 12 cycles of bookkeeping, a row tile 40.
    """
    gflops, gbps = hardware_peaks(target)
    per_core_flops = gflops * 1e9 / target.cores
    freq_hz = (target.freq_ghz or 2.0) * 1e9
    efficiency = 0.7 if dense else 0.5
    return Params(
        t_call=target.call_overhead_s,
        t_flop=1.0 / (per_core_flops * efficiency),
        t_block=12.0 / freq_hz,
        t_row=40.0 / freq_hz,
        t_out=1.0 / (freq_hz * target.simd_lanes),
        t_in=0.5 / freq_hz,
        t_spill=4.0 / (gbps * 1e9),
        t_byte=1.0 / (gbps * 1e9),
    )


def kept_blocks(out, in_, block: tuple[int, int], density) -> np.ndarray:
    """Blocks a layer keeps at `density`: round(density * blocks of the ceil-div grid)."""
    rows, cols = block
    n_blocks = -(-np.asarray(out) // rows) * -(-np.asarray(in_) // cols)
    return np.rint(np.asarray(density, dtype=np.float64) * n_blocks).astype(np.int64)


def _cache_bytes(target: TargetProfile) -> int:
    """The per-core cache that holds X's tiles between block rows: L2, else L1 (some little cores have no L2)."""
    return target.l2_bytes or target.l1_bytes or 32 << 10


def _tile_terms(target: TargetProfile, sched: schedule.Schedule, r: int) -> tuple[int, int, int, int, int, bool]:
    """(r_pad, m_tile, row groups, passes over Y, block rows per parallel task, packs X) of a kernel schedule.

    rowvec: a block's rows padded to whole vectors, one pass over Y per column chunk; mvec: X
    transposed once, a block's rows walked in row groups, `out_tile` outputs (whole block rows) per
    parallel task; cuda: a thread per (row of a block, m).
    """
    tiles = sched.tiles
    if sched.layout == "rowvec":
        lanes = target.simd_lanes
        return -(-r // lanes) * lanes, tiles["m_tile"], 1, tiles["k_chunks"], 1, False
    if sched.layout == "mvec":
        return r, tiles["m_tile"], r // tiles["row_group"], 1, max(1, tiles["out_tile"] // r), True
    assert sched.layout == "cuda", sched
    return r, tiles["m_tile"], 1, 1, 1, False


def _kernel_tiles(target: TargetProfile, out: np.ndarray, in_: np.ndarray, m: np.ndarray,
                  block: tuple[int, int], nnzb: np.ndarray) -> list[np.ndarray]:
    """`_tile_terms` per element of the (broadcast) layer arrays, from codegen's own `kernel_schedule`
    (called once per distinct layer)."""
    layers = np.stack([a.ravel() for a in (m, out, in_, nnzb)], axis=-1).astype(np.int64)
    unique, inverse = np.unique(layers, axis=0, return_inverse=True)
    terms = np.array([_tile_terms(target, schedule.kernel_schedule(target, rows, outs, ins, block, kept), block[0])
                      for rows, outs, ins, kept in unique.tolist()], dtype=np.float64).reshape(len(unique), 6)
    return [column[inverse.ravel()].reshape(m.shape) for column in terms.T]


def features(target: TargetProfile, out, in_, m, block: tuple[int, int], density) -> np.ndarray:
    """The work terms [1, flops, visits, row tiles, outs, ins, spilled, bytes] of the busiest core, (..., 8).

    `block` (0, 0) means the dense kernel. Arguments broadcast like numpy arrays.
    """
    out, in_, m, density = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (out, in_, m, density)))
    if tuple(block) == (0, 0):
        block, density = schedule.DENSE_BLOCK, np.ones_like(density)
    r, c = block
    nnzb = kept_blocks(out, in_, block, density).astype(np.float64)
    r_pad, m_tile, groups, y_passes, task_rows, packs_x = _kernel_tiles(target, out, in_, m, block, nnzb)
    m_tiles = np.ceil(m / m_tile)
    m_pad = m_tiles * m_tile
    block_rows = np.ceil(out / r)
    block_cols = np.ceil(in_ / c)
    # parallel tasks of `task_rows` block rows are dealt out whole over the cores
    busiest_rows = np.minimum(np.ceil(block_rows / task_rows / target.cores) * task_rows, block_rows)
    blocks = nnzb * busiest_rows / block_rows  # the busiest core's share of the kept blocks
    flops = 2.0 * r_pad * c * m_pad * blocks
    visits = blocks * m_tiles * groups  # each kept block is walked once per tile of m (and row group)
    row_tiles = busiest_rows * m_tiles * groups * y_passes
    outs = r * m_pad * busiest_rows * y_passes
    ins = np.where(packs_x > 0, m_pad * block_cols * c / target.cores, 0.0)
    # each kept block reads c columns of X (m_pad values each); the share that misses the per-core
    # cache grows as X outgrows it (about 3/4 of it left to X beside weights and outputs)
    x_bytes = _F32 * m_pad * block_cols * c
    miss_share = np.clip(1.0 - 0.75 * _cache_bytes(target) / x_bytes, 0.0, 1.0)
    spilled = miss_share * _F32 * c * m_pad * blocks
    index_bytes = _INDEX_BYTES * (nnzb + block_rows + 1)
    bytes_moved = _F32 * nnzb * r * c + index_bytes + _F32 * m * (in_ + out)
    terms = np.broadcast_arrays(np.ones_like(flops), flops, visits, row_tiles, outs, ins, spilled, bytes_moved)
    return np.stack(terms, axis=-1)


def latency_from_features(params: Params | np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Seconds for each row of `features(...)` under `params` (roofline of compute and memory)."""
    p = params.array() if isinstance(params, Params) else np.asarray(params)
    compute = feats[..., 1:7] @ p[1:7]
    memory = feats[..., 7] * p[7]
    return feats[..., 0] * p[0] + np.maximum(compute, memory)


def latency(target: TargetProfile, out: int, in_: int, m: int, block: tuple[int, int], sparsity: float,
            params: Params | None = None) -> float:
    """Seconds of one block-sparse layer with `sparsity` of its blocks removed (analytical)."""
    params = params or default_params(target)
    return float(latency_from_features(params, features(target, out, in_, m, block, 1.0 - sparsity)))


def dense_latency(target: TargetProfile, out: int, in_: int, m: int, params: Params | None = None) -> float:
    """Seconds of the dense layer (analytical)."""
    params = params or default_params(target, dense=True)
    return float(latency_from_features(params, features(target, out, in_, m, (0, 0), 1.0)))


def fit(feats: np.ndarray, seconds: np.ndarray, start: Params, prior_weight: float = 1e-3) -> Params:
    """Least-squares parameters for measured `seconds` of the layers described by `feats`.

    Residuals are relative errors (what the ±10% goal is about) under a robust loss (soft L1 past
    10%), so that a few times taken while another process shared the cores do not drag the fit;
    parameters are fitted in log space (so they stay positive) with a weak pull towards `start`,
    which keeps terms the data cannot see (say, memory time when every layer is compute-bound) at
    their datasheet values.
    """
    seconds = np.asarray(seconds, dtype=np.float64)
    base = start.array()
    assert np.all(base > 0), "start parameters must be positive (they are fitted as log-scales)"

    def residuals(log_scale: np.ndarray) -> np.ndarray:
        predicted = latency_from_features(base * np.exp(log_scale), feats)
        return np.concatenate([predicted / seconds - 1.0, prior_weight * log_scale])

    result = least_squares(residuals, np.zeros(len(base)), method="trf", loss="soft_l1", f_scale=0.1,
                           max_nfev=2000, bounds=(-30.0, 30.0))
    return Params.from_array(base * np.exp(result.x))
