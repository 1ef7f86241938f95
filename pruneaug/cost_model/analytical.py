"""The analytical latency of one block-sparse (or dense) layer `Y[m, out] = X[m, in] @ W.T`.

    >>> latency(resolve_target("arm64"), 768, 768, 128, (8, 8), 0.9)   # seconds
    0.00026

The kernel walks block rows in parallel over the cores (on the calling thread alone, one core and
no parallel region, where its schedule finds too little work for a fork and join:
`schedule.runs_parallel`); inside a block row it visits each kept
`r x c` block (its column index read from `indices`) once per tile of m and accumulates `r x m`
outputs. So, per core:

    overhead = t_call                         # the call
             + t_launch * launches            # parallel regions (each a fork and join of the pool)
    compute  = t_flop * flops                 # FMAs of the kept blocks, padded to the vector width and tiles
             + t_block * visits               # per kept block and m tile: index load, loop set-up
             + t_row * row_tiles              # per block row and m tile: accumulator set-up, indptr reads
             + t_out * r*m_pad * rows         # per block row: storing r x m outputs
             + t_in * m_pad*in / cores        # per input element: packing (transposing) X once, where done
             + t_l2 * l2_bytes                # operand bytes whose reuse distance outgrows L1 (read from L2)
             + t_l3 * l3_bytes                # operand bytes whose reuse distance outgrows L2 (read from L3/DRAM)
             + t_conflict * conflict_lines    # X lines re-read because an m tile's rows share one L1 set
    memory   = t_byte * bytes                 # weights of kept blocks + indices + indptr + X + Y
    latency  = overhead + max(compute, memory)   # roofline

where the work is the busiest core's share (block rows are dealt out whole, so `ceil(block_rows /
cores)` of them, or whole tasks of several block rows where the kernel groups them: the parallel
efficiency). Ragged edges are padded to full blocks, as the kernels do; the layout and tiles are the
kernels' own (codegen's `schedule.kernel_schedule`), and so is the loop order that the cache terms
follow:
- rowvec (`cpu_kernels.rowvec_matmul`): for each column chunk and pass over m (the kernel's own
  chunks and passes: fewer chunks at low density mean more passes, so just below a switch to more
  chunks a layer predicts slower than a denser one, as it runs: 768x3072, m=128, 16x16 at 1 thread
  took 2.55-2.61 ms at density 0.16 and 2.12-2.20 ms at 0.17), every block row walks its m
  tiles. An X element is reused by the next block row (distance: the pass's slice of X); a core's
  weights come from beyond L2 once per pass unless they stay in L2 beside that slice. A block row's
  weights are contiguous and read in order (prefetched), so their re-reads per m tile are not
  counted as misses (counting them, the 1-thread held-out share within ±10% did not move).
  Three more effects, each seen in the 1-thread residuals of `tools/eval_cost_model.py` (leaving
  any one out lowers its held-out share within ±10% from 85% to 82-84%; `_rowvec_terms`): X's L1
  misses are paid only where the neighbouring block column was not kept (kept neighbours are read
  as one stream, which the prefetchers cover); a call whose X, weights and Y overflow L2 reads X
  and writes Y (once per column chunk) beyond it; and X rows a multiple of 4 KiB apart put an m
  tile's lines in one L1 set (`set_conflict_share`: 8x8 blocks on layers 1024 or 3072 wide ran
  10-16% slower per flop than on other widths).
- mvec (`cpu_kernels.mvec_matmul`): X is transposed once into XT, and every block row reads its
  kept columns of the whole XT (distance: XT).
A working set `ws` reused through a cache of `size` misses it for a share `clip(1 - USABLE*size/ws, 0, 1)`
of the reads (a smooth capacity miss; USABLE leaves room for what else lives there).
The dense kernel is codegen's BSR kernel with every `schedule.DENSE_BLOCK` block kept, so
`dense_latency` is that with its own fitted parameters.

On CUDA the kernels are small enough to be bound by latency rather than by the SMs' throughput, so
the compute slots hold the terms of the threads' dependent chains instead (`_CUDA_SLOTS`: steps of
a thread, of a lane, and their turns at an SM's issue slots), and the CUDA defaults are fitted to an
H100's kernel times (`CUDA_CYCLES`) rather than taken from a datasheet.

The eleven parameters (`Params`) come from the target's hardware figures by default and are fitted by
least squares (`fit`) to measured kernel times per (target, block shape) wherever measurements
exist. Features are computed once per distinct layer and broadcast like numpy arrays, so that a
model's whole option grid costs one call.
"""
from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields

import numpy as np
from scipy.optimize import least_squares

from pruneaug.codegen import schedule
from pruneaug.cost_model.targets import TargetProfile, hardware_peaks
from pruneaug.ir.layer import removed_block_count

_F32 = 4
_INDEX_BYTES = 4
USABLE = 0.75  # share of a cache that one working set gets (the rest: other operands, conflicts)
L1_SET_SPAN = 4096  # bytes after which L1 set indices repeat (the page size a VIPT L1 indexes within)
_OVERHEAD = slice(0, 2)  # feature columns: [1, launches | compute terms ... | bytes]
_COMPUTE = slice(2, 10)


@dataclass(frozen=True)
class Params:
    """Seconds per unit of each cost term (see the module docstring)."""

    t_call: float
    t_launch: float
    t_flop: float
    t_block: float
    t_row: float
    t_out: float
    t_in: float
    t_l2: float
    t_l3: float
    t_conflict: float
    t_byte: float

    def array(self) -> np.ndarray:
        return np.array(astuple(self), dtype=np.float64)

    @classmethod
    def from_array(cls, values: np.ndarray) -> "Params":
        return cls(*(float(v) for v in values))


PARAM_NAMES = tuple(f.name for f in fields(Params))
FEATURE_NAMES = ("call", "launches", "flops", "visits", "row_tiles", "outs", "ins", "l2_bytes", "l3_bytes",
                 "conflict_lines", "bytes")


# CUDA parameters in cycles at the profile's clock (`t_call` in seconds: the launch, host side), fitted
# by `tools/fit_cuda_cost_model.py` to 260 kernel times of an H100 (tools/data/bench_cuda_h100.md:
# matmuls of two BERT-base weight shapes and stride-1 3x3 convs, both layouts). Held out: the other
# two weight shapes' 168 matmul times 67% within 25% (39% within 10%), the faster layout predicted
# in 95% of their rows; the stride-2 and 1x1 convs' 60 times 72% within 25% (the faster layout: 97%).
# The throughput terms these replace had 26% of those matmul times within 25% and the faster layout
# in 57%.
CUDA_CALL_S = 3.55e-6
CUDA_CYCLES = {"t_launch": 119.0, "t_flop": 44.8, "t_block": 247.0, "t_row": 16.0, "t_out": 96.3, "t_in": 3.18,
               "t_l2": 1.75, "t_l3": 18.1, "t_conflict": 2.1e-3}


def default_params(target: TargetProfile, dense: bool = False) -> Params:
    """Parameters from the target's datasheet figures: what is assumed before anything is measured.
    On CUDA, the terms fitted to an H100's kernels (`CUDA_CYCLES`), scaled to the profile's clock.

    Sparse kernels are assumed to reach half of the per-core fp32 peak (index indirection, short
    inner loops), dense ones 70%; a block visit costs about 12 cycles of bookkeeping, a row tile 40,
    a parallel region 2000; L2 delivers about 32 bytes a cycle, beyond it a quarter of that; a line
    lost to an L1 set conflict costs about 4 cycles (an L2 hit, mostly overlapped).
    """
    gflops, gbps = hardware_peaks(target)
    per_core_flops = gflops * 1e9 / target.cores
    freq_hz = (target.freq_ghz or 2.0) * 1e9
    if target.kind == "cuda":  # the same kernels dense and sparse (every DENSE_BLOCK kept): one set
        return Params(t_call=CUDA_CALL_S, **{name: cycles / freq_hz for name, cycles in CUDA_CYCLES.items()},
                      t_byte=1.0 / (gbps * 1e9))
    efficiency = 0.7 if dense else 0.5
    return Params(
        t_call=target.call_overhead_s,
        t_launch=2000.0 / freq_hz,
        t_flop=1.0 / (per_core_flops * efficiency),
        t_block=12.0 / freq_hz,
        t_row=40.0 / freq_hz,
        t_out=1.0 / (freq_hz * target.simd_lanes),
        t_in=0.5 / freq_hz,
        t_l2=1.0 / (32.0 * freq_hz),
        t_l3=1.0 / (8.0 * freq_hz),
        t_conflict=4.0 / freq_hz,
        t_byte=1.0 / (gbps * 1e9),
    )


def kept_blocks(out, in_, block: tuple[int, int], density) -> np.ndarray:
    """Blocks a layer keeps at `density` of the ceil-div grid: those the mask at sparsity `1 - density` keeps."""
    rows, cols = block
    n_blocks = -(-np.asarray(out) // rows) * -(-np.asarray(in_) // cols)
    return n_blocks - removed_block_count(n_blocks, 1.0 - np.asarray(density, dtype=np.float64))


def miss_share(working_set: float, cache_bytes: float) -> float:
    """Share of the reads of a working set, reused through a cache of `cache_bytes`, that miss it."""
    if working_set <= 0 or cache_bytes <= 0:
        return 1.0 if cache_bytes <= 0 else 0.0
    return min(1.0, max(0.0, 1.0 - USABLE * cache_bytes / working_set))


def set_conflict_share(target: TargetProfile, rows: int, stride_bytes: int) -> float:
    """Share of the line reads of `rows` rows, `stride_bytes` apart, that their L1 set cannot hold.

    A rowvec block visit reads the same columns of the `m_tile` rows of X. L1 data caches are
    indexed within a 4 KiB page (`L1_SET_SPAN`; virtually indexed, physically tagged), so rows a
    multiple of 4 KiB apart land in one set of `l1_bytes / 4 KiB` ways, which also holds the weights
    and the next block's lines passing through: up to half the ways the rows keep their lines; a set
    filled by them loses every line before its reuse (linear in between).
    """
    ways = max(1, (target.l1_bytes or 32 << 10) // L1_SET_SPAN)
    sets_used = L1_SET_SPAN // math.gcd(stride_bytes % L1_SET_SPAN or L1_SET_SPAN, L1_SET_SPAN)
    per_set = -(-rows // min(rows, sets_used))
    return min(1.0, max(0.0, 2.0 * per_set / ways - 1.0))


def _caches(target: TargetProfile) -> tuple[int, int]:
    """(L1, L2) bytes per core; a core without an L2 (some little cores) reads past L1 from beyond it."""
    l1 = target.l1_bytes or 32 << 10
    return l1, target.l2_bytes or l1


def _cores(target: TargetProfile, tiles: dict[str, int]) -> int:
    """The cores a CPU kernel's work is dealt out to: one where its schedule keeps it off the thread pool."""
    return target.cores if tiles["parallel"] else 1


def _rowvec_terms(target: TargetProfile, out: int, in_: int, m: int, block: tuple[int, int], nnzb: int,
                  tiles: dict[str, int]) -> list[float]:
    """The busiest core's work in `cpu_kernels.rowvec_matmul` (see the module docstring)."""
    r, c = block
    lanes = target.simd_lanes
    r_pad = -(-r // lanes) * lanes
    m_tile, k_chunks = tiles["m_tile"], tiles["k_chunks"]
    m_tiles = -(-m // m_tile)
    in_chunk = -(-in_ // k_chunks)
    # the kernel's own pass split of m: passes of about x_bytes_per_pass of X, evened out
    per_pass = max(1, min(m_tiles, tiles["x_bytes_per_pass"] // (m_tile * in_chunk * _F32)))
    passes = -(-m_tiles // per_pass)
    per_pass = -(-m_tiles // passes)
    tiles_run = passes * per_pass
    m_pad = tiles_run * m_tile
    block_rows = -(-out // r)
    rows = min(-(-block_rows // _cores(target, tiles)), block_rows)
    blocks = nnzb * rows / block_rows
    l1, l2 = _caches(target)
    x_slice = _F32 * per_pass * m_tile * in_chunk
    row_weights = _F32 * r * c * nnzb / block_rows / k_chunks
    x_reads = _F32 * c * m_pad * blocks
    w_share = _F32 * r * c * blocks
    # X's L1 misses: only where the block column before a kept one was dropped (a random pattern keeps
    # it with the layer's density); runs of kept columns stream through the prefetchers
    gathered = 1.0 - nnzb / (block_rows * -(-in_ // c))
    l2_bytes = x_reads * miss_share(x_slice, l1) * gathered
    l3_bytes = x_reads * miss_share(x_slice + row_weights, l2) + w_share * passes * miss_share(w_share + x_slice, l2)
    # once per call: X read and Y written (and re-read by every further column chunk) beyond L2 where
    # the call's X, weights and Y do not fit there together
    x_bytes, y_share = _F32 * m * in_, _F32 * r * m_pad * rows
    l3_bytes += (x_bytes + y_share * (2 * k_chunks - 1)) * miss_share(x_bytes + w_share + y_share, l2)
    conflict_lines = blocks * tiles_run * m_tile * set_conflict_share(target, m_tile, _F32 * in_)
    return [k_chunks * passes * tiles["parallel"], 2.0 * r_pad * c * m_pad * blocks, blocks * tiles_run,
            rows * tiles_run * k_chunks, r * m_pad * rows * k_chunks, 0.0, l2_bytes, l3_bytes, conflict_lines]


def _mvec_terms(target: TargetProfile, out: int, in_: int, m: int, block: tuple[int, int], nnzb: int,
                tiles: dict[str, int]) -> list[float]:
    """The busiest core's work in `cpu_kernels.mvec_matmul` (see the module docstring)."""
    r, c = block
    row_group, m_tile = tiles["row_group"], tiles["m_tile"]
    rows_per_task = max(1, tiles["out_tile"] // r)
    block_rows = -(-out // r)
    tasks = -(-block_rows // rows_per_task)
    cores = _cores(target, tiles)
    rows = min(-(-tasks // cores) * rows_per_task, block_rows)
    blocks = nnzb * rows / block_rows
    m_pad = -(-m // m_tile) * m_tile
    in_pad = -(-in_ // (16 * c)) * 16 * c  # X is transposed in strips of 16 block columns
    groups = r // row_group
    l1, l2 = _caches(target)
    xt_bytes = _F32 * in_pad * m_pad
    x_reads = _F32 * c * m_pad * blocks * groups
    return [2.0 * tiles["parallel"], 2.0 * r * c * m_pad * blocks, blocks * (m_pad // m_tile) * groups,
            rows * (m_pad // m_tile) * groups, r * m_pad * rows, m_pad * in_pad / cores,
            x_reads * miss_share(xt_bytes, l1), x_reads * miss_share(xt_bytes, l2), 0.0]


def _cuda_terms(target: TargetProfile, out: int, in_: int, m: int, block: tuple[int, int], nnzb: int,
                tiles: dict[str, int]) -> list[float]:
    """Thread blocks of one block row and `m_tile` rows of m (`cuda_kernels.bsr_matmul`). A GPU kernel
    this small is bound by latency, not by the SMs' throughput, so the compute slots hold the terms
    of its threads' dependent chains (`_CUDA_SLOTS`): a thread walks its block row's kept columns one
    by one (`steps`), each step an index load, `m_per_thread` loads of X and `r * m_per_thread` FMAs."""
    r, c = block
    m_per_thread = tiles["m_per_thread"]
    thread_blocks = -(-out // r) * -(-m // (tiles["m_threads"] * m_per_thread))
    steps = nnzb / -(-out // r) * c
    # the 32 threads of a warp read 32 rows of X: a sector each
    sectors = thread_blocks * steps * m_per_thread * tiles["m_threads"]
    return _cuda_slots(thread_blocks / target.cores, along_m=steps, chain_fmas=steps * r * m_per_thread,
                       sectors=sectors)


def _cuda_split_terms(target: TargetProfile, out: int, in_: int, m: int, block: tuple[int, int], nnzb: int,
                      tiles: dict[str, int]) -> list[float]:
    """Thread blocks of one block row and one row of m (`cuda_kernels.bsr_matmul_split`, and
    `bsr_conv2d_split` over a conv's pixels): each lane goes over every `lanes`-th kept column of its
    block row (`steps` of one X load and `r` FMAs), then the lanes' sums meet in shared memory; the
    thread blocks an SM holds (`turns`) take turns at its issue slots. Terms as in `_cuda_terms`."""
    r, c = block
    block_rows = -(-out // r)
    thread_blocks = block_rows * m
    steps = -(-(nnzb / block_rows * c) // tiles["lanes"])
    turns = -(-thread_blocks // target.cores)
    sectors = thread_blocks * steps * tiles["lanes"] * _F32 / 32  # a warp's consecutive columns: whole sectors
    return _cuda_slots(thread_blocks / target.cores, split=(steps, turns * steps, turns * steps * r),
                       chain_fmas=steps * r, sectors=sectors)


def _cuda_conv_terms(target: TargetProfile, out: int, in_: int, pixels: int, block: tuple[int, int], nnzb: int,
                     tiles: dict[str, int], gathers: bool = True) -> list[float]:
    """A conv's thread per (output channel, pixel) (`cuda_kernels.bsr_conv2d`), `r x px_tile` of them
    per thread block: each walks its block row's kept columns, one bounds-checked im2col read and one
    FMA a step (`_CUDA_SLOTS`' conv terms), its thread block's warps taking turns with the others an
    SM holds. A conv that `gathers` nothing (1x1, unpadded: its im2col matrix is X) reads a plain
    load a step, as a matmul's thread does (the gather's step cost had put it up to 5x too slow)."""
    r, c = block
    block_rows = -(-out // r)
    thread_blocks = block_rows * -(-pixels // tiles["px_tile"])
    steps = nnzb / block_rows * c
    warps = -(-r * tiles["px_tile"] // 32)
    turns = -(-thread_blocks // target.cores)
    if not gathers:  # its steps cost what a matmul thread's and a split lane's plain steps do
        return _cuda_slots(thread_blocks / target.cores, along_m=steps, split=(0.0, turns * warps * steps, 0.0),
                           chain_fmas=steps)
    return _cuda_slots(thread_blocks / target.cores, conv=(steps, turns * warps * steps), chain_fmas=steps)


def _cuda_pointwise_conv_terms(target: TargetProfile, out: int, in_: int, pixels: int, block: tuple[int, int],
                               nnzb: int, tiles: dict[str, int]) -> list[float]:
    """`_cuda_conv_terms` of a conv that gathers nothing: a layout of its own, so that its features keep apart."""
    return _cuda_conv_terms(target, out, in_, pixels, block, nnzb, tiles, gathers=False)


# `_CUDA_SLOTS`: what the feature slots after `call` hold on CUDA (their parameters are named for the
# CPU terms): launches - thread blocks per SM; flops - a matmul thread's steps along m; visits - a conv
# thread's steps; row_tiles - a conv's warps' steps in turns; outs - a split lane's steps; ins - split
# steps in turns; l2_bytes - split FMAs in turns; l3_bytes - a thread's FMAs; conflict_lines - 32-byte
# sectors of X read.
def _cuda_slots(blocks_per_sm: float, along_m: float = 0.0, conv: tuple = (0.0, 0.0), split: tuple = (0.0, 0.0, 0.0),
                chain_fmas: float = 0.0, sectors: float = 0.0) -> list[float]:
    """The feature slots after `call` of a CUDA layout's terms, in `_CUDA_SLOTS`' order (above): each
    layout's chain terms have slots (and so fitted costs) of their own."""
    return [float(blocks_per_sm), float(along_m), *map(float, conv), *map(float, split), float(chain_fmas),
            float(sectors)]


_TERMS = {"rowvec": _rowvec_terms, "mvec": _mvec_terms, "cuda": _cuda_terms, "cuda_split": _cuda_split_terms,
          "cuda_conv": _cuda_conv_terms, "cuda_conv_1x1": _cuda_pointwise_conv_terms}
MATMUL_LAYOUTS = frozenset(_TERMS)  # the layouts `features` can cost
CUDA_CONV_LAYOUT = "cuda_conv"  # the conv kernel's "cuda" layout (`schedule.conv_schedule`), costed as such
CUDA_POINTWISE_CONV_LAYOUT = "cuda_conv_1x1"  # ... for a conv whose im2col matrix is X itself


_MEMO: dict[tuple, list[float]] = {}  # feature rows by (target's identity and caches, layer): a model's
_MEMO_MAX = 1 << 16                   # layers repeat (BERT-base: 72 layers of 3 shapes), its grid is re-asked


def _layer_features(target: TargetProfile, identity: tuple, out: int, in_: int, m: int, block: tuple[int, int],
                    nnzb: int, layout: str | None) -> list[float]:
    """The feature row of one layer (see `features`), memoised under the target's `identity`."""
    key = (identity, out, in_, m, block, nnzb, layout)
    if key not in _MEMO:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[key] = _work_features(target, out, in_, m, block, nnzb, layout)
    return _MEMO[key]


def _work_features(target: TargetProfile, out: int, in_: int, m: int, block: tuple[int, int], nnzb: int,
                   layout: str | None) -> list[float]:
    """The feature row of one layer, worked out from its kernel schedule."""
    r, c = block
    if layout in (CUDA_CONV_LAYOUT, CUDA_POINTWISE_CONV_LAYOUT):
        sched = schedule.Schedule(layout, schedule.cuda_conv_tiles(r))
    else:
        sched = schedule.kernel_schedule(target, m, out, in_, block, nnzb, layout)
    block_rows = -(-out // r)
    bytes_moved = _F32 * nnzb * r * c + _INDEX_BYTES * (nnzb + block_rows + 1) + _F32 * m * (in_ + out)
    return [1.0, *_TERMS[sched.layout](target, out, in_, m, block, nnzb, sched.tiles), float(bytes_moved)]


def features(target: TargetProfile, out, in_, m, block: tuple[int, int], density,
             layout: str | None = None) -> np.ndarray:
    """The work terms (FEATURE_NAMES) of the busiest core, shape (..., 11).

    `block` (0, 0) means the dense kernel. `layout` forces one of the target's matmul layouts
    (`schedule.kernel_schedule`), as a conv's kernel may run its im2col product in another layout than
    the matmul of that shape would. Arguments broadcast like numpy arrays; each distinct layer is
    worked out once per process.
    """
    out, in_, m, density = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (out, in_, m, density)))
    if tuple(block) == (0, 0):
        block, density = schedule.DENSE_BLOCK, np.ones_like(density)
    block = (int(block[0]), int(block[1]))
    nnzb = kept_blocks(out, in_, block, density)
    identity = (target.cache_key, target.simd_bytes, target.l1_bytes, target.l2_bytes)
    layers = zip(*(a.ravel().astype(np.int64).tolist() for a in (out, in_, m, nnzb)))
    rows = [_layer_features(target, identity, o, i, mm, block, k, layout) for o, i, mm, k in layers]
    return np.array(rows, dtype=np.float64).reshape(*out.shape, len(FEATURE_NAMES))


def latency_from_features(params: Params | np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Seconds for each row of `features(...)` under `params` (overheads plus the roofline of compute and memory)."""
    p = params.array() if isinstance(params, Params) else np.asarray(params)
    overhead = feats[..., _OVERHEAD] @ p[_OVERHEAD]
    compute = feats[..., _COMPUTE] @ p[_COMPUTE]
    memory = feats[..., -1] * p[-1]
    return overhead + np.maximum(compute, memory)


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
