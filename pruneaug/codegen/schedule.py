"""Which layout and tiles a block-sparse (or dense) matmul or conv kernel gets, per target: decided here alone.

    >>> kernel_schedule(resolve_target("x86"), 128, 768, 768, (8, 8), 864)
    Schedule(layout='rowvec', tiles={'m_tile': 8, 'k_chunks': 1, 'x_bytes_per_pass': 262144, 'parallel': 1})
    >>> conv_schedule(resolve_target("x86"), (8, 8), (8, 8), 64, 40)   # an AVX2 host: 64 pixels, 40 kept blocks
    Schedule(layout='chanvec', tiles={'tile_h': 1, 'tile_w': 8, 'parallel': 1})

`bsr.py` builds its kernels with these tiles and `cost_model/analytical.py` counts the work of the
same tiles, so the two cannot drift apart; hence this module imports no TVM (the cost model runs
without it). `tiles` are the keyword arguments of the layout's TIR builder: `cpu_kernels.rowvec_matmul`,
`cpu_kernels.mvec_matmul`, `cuda_kernels.bsr_matmul` ("cuda"); for convs `conv.conv_primfunc`
("pixvec", "chanvec") and `cuda_kernels.bsr_conv2d` ("cuda"). The choices come from the figures of
`tools/bench_kernels.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a runtime import would be circular: cost_model imports this module
    from pruneaug.cost_model.targets import TargetProfile

DENSE_BLOCK = (16, 32)  # the dense kernel is the BSR kernel with every block of this shape kept, by default
WIDE_DENSE_BLOCK = (32, 16)  # ... or of this one, where it measured faster for the layer (`dense_blocks`)
MIN_BLOCKS_PER_CHUNK = 16  # kept blocks per block row and column chunk that pay for a chunk's pass over Y
X_BYTES_IN_L2 = 256 * 1024  # the part of X a rowvec kernel keeps hot while all block rows go over it
W_L1_SHARE = 8  # a block row's weights in one column chunk: at most this fraction of L1 (where m tiles are thin)
MAX_L1_CHUNKS = 4  # ... in at most this many chunks (each a pass over Y; 4 is the most measured)
CUDA_THREADS_PER_BLOCK = 256  # conv: threads of a block, (block row, pixel) each
CUDA_WARP = 32
CUDA_ACCUMULATORS = 32  # float registers a matmul thread may hold its outputs in (64: 16x16 ran 1.2-1.3x slower)
CUDA_WARPS_PER_SM = 8  # fewer left the SMs waiting on loads (H100, m=128: 4 per SM ran 1.1-1.2x slower)
CUDA_SPLIT_MAX_M = 128  # the largest m whose layout is the cost model's pick (the largest measured); above it
# threads along m, which reuse each weight load over more rows
CUDA_CONV_SPLIT_MIN_ROWS = 4  # a conv that gathers im2col entries (kernel over 1x1) splits from 4-row blocks on:
# the split reads an entry once for all r rows of its block, threads along (channel, pixel) once per row;
# on an H100 it ran 3x3 convs on 8x8 maps at batch 32 and 56x56 at batch 1 faster in 15 of 16 cases with
# 4x4 to 32x32 blocks (up to 5.5x) and slower with 1x1 blocks; a 1x1 conv (256->64, 56x56) from 32x32
# blocks on (`tools/bench_cuda.py --part conv`). (On those times the CUDA cost model would pick the faster
# conv layout in 97% of rows against this rule's 95%, but once 3.5x off the faster; the rule at most 1.6x.)
ACCUMULATOR_VECTORS = 8  # register tile of the rowvec and chanvec layouts, in SIMD registers
PIXVEC_TILE_VECTORS = 4  # vectors of pixels per accumulator row of the pixvec conv
PIXVEC_MAX_ACCUMULATORS = 12  # pixvec accumulator registers (row group x output rows x tile vectors)
CHANVEC_MAX_ROW_VECTORS = 32  # on AVX2, a flattened 1x1 conv row of at most this many vectors: over channels
CHANVEC_ANY_ROW_LANES = 16  # from this many lanes (AVX-512) every flattened 1x1 conv: over channels
PARALLEL_MIN_LANE_MACS = 1 << 17  # SIMD-lane multiply-adds from which a CPU kernel runs on all cores (`runs_parallel`)


def dense_blocks(target: TargetProfile) -> tuple[tuple[int, int], ...]:
    """The block shapes a layer's dense kernel may be built in, the default first. No one shape suits every
    layer on a CPU (`tools/bench_kernels.py --part dense`, AVX-512): 32x16 ran a 1x1 256->64 conv on a
    56x56 map 1.5x faster, ResNet's 3x3 convs 1.1-1.2x and a 768x3072 matmul at m=1 1.3x, but MobileNetV2's
    projections to 24 and 96 channels 1.2-1.3x slower; so each layer runs the one measured faster
    (`cost_model.model.faster_dense`). CUDA's dense kernel keeps its one shape (the other is unmeasured there)."""
    return (DENSE_BLOCK,) if target.kind == "cuda" else (DENSE_BLOCK, WIDE_DENSE_BLOCK)


@dataclass(frozen=True)
class Schedule:
    """A kernel layout ("rowvec", "mvec", "pixvec", "chanvec" or "cuda") and its tile sizes (see the module docstring)."""

    layout: str
    tiles: dict[str, int]

    def __hash__(self) -> int:  # by value, so that a schedule can key the memoised kernel builders
        return hash((self.layout, tuple(sorted(self.tiles.items()))))


def _tile(extent: int, cap: int) -> int:
    """A tile of at most `cap` along `extent`: the largest divisor of `extent` if it is at least half the cap
    (a clamped tail tile cost up to 2x), else the cap."""
    cap = max(1, min(extent, cap))
    divisor = max(t for t in range(1, cap + 1) if extent % t == 0)
    return divisor if 2 * divisor >= cap else cap


def _pixel_patch(oh: int, ow: int, cap: int) -> tuple[int, int]:
    """(tile_h, tile_w) of at most `cap` pixels covering `oh x ow` in the fewest patches (each patch is one
    pass over a block row's weights), then with the fewest pixels computed past the edges, then the widest."""
    patches = [(th, tw) for tw in range(1, min(ow, cap) + 1) for th in range(1, min(oh, cap // tw) + 1)]

    def cost(patch):
        th, tw = patch
        count = -(-oh // th) * -(-ow // tw)
        return count, count * th * tw, -tw

    return min(patches, key=cost)


def runs_parallel(target: TargetProfile, m: int, block: tuple[int, int], nnz_blocks: int) -> int:
    """1 where a CPU kernel over `m` rows of X (or pixels) with `nnz_blocks` kept `r x c` blocks is worth a
    fork and join of the thread pool, else 0 (it runs on the calling thread).

    The work is counted in multiply-adds as the SIMD lanes do them: a block's rows padded to whole
    vectors where the kernel vectorises over them (rowvec, chanvec), else m padded (mvec, pixvec).
    `tools/bench_kernels.py --part parallel` times 120 kernels both ways (m 1, 4, 16; 128x128 to
    768x3072; 1x1 to 16x16 blocks; densities 0.1, 0.3) on the 2-core host at 2 threads: kernels of a
    few µs ran up to 6x slower on the pool, the largest 1.8-2x faster. Against the faster way of
    each, this rule took 1.07x the time (geometric mean), always parallel 1.39x, always serial 1.21x;
    counting block visits besides the lanes moved that by under 2%, within the run's noise."""
    r, c = block
    lanes = target.simd_lanes
    if r >= lanes or m < lanes:
        lane_macs = nnz_blocks * c * -(-r // lanes) * lanes * m
    else:
        lane_macs = nnz_blocks * r * c * -(-m // lanes) * lanes
    return int(target.cores > 1 and lane_macs >= PARALLEL_MIN_LANE_MACS)


def kernel_schedule(target: TargetProfile, m: int, out: int, in_: int, block: tuple[int, int],
                    nnz_blocks: int, layout: str | None = None) -> Schedule:
    """The schedule of `Y[m, out] = X[m, in] @ W.T` with `nnz_blocks` kept `r x c` blocks on `target`.

    On CPUs: vectorise over a block's rows when they fill a register ("rowvec"), else over m
    ("mvec": thin blocks 1x1, 1x4, 4x1), unless m is too small to fill one. Register tiles of 8
    accumulators; a rowvec m tile that divides m (a clamped tail tile cost up to 2x); column chunks
    keep X in L2 (dense 768x3072: 0.69x -> 0.99x of onnxruntime) but each costs a pass over Y, so
    they are used only with enough kept blocks per row and chunk; with m tiles of 1-2 rows (blocks of
    32 rows on AVX2) they also keep a block row's weights in L1 instead; an mvec m tile of a power-of-two
    number of vectors (a tile of 5 vectors, m=40, ran 4x slower than one of 8). On CUDA threads along
    m ("cuda") or a warp per block row and row of X splitting the block row's columns ("cuda_split"),
    whichever `_faster_cuda_layout` picks; `layout` forces one of the two (benchmarks compare them).
    """
    r, _ = block
    if target.kind == "cuda":
        if layout is None:
            layout = _faster_cuda_layout(target, m, out, in_, block, nnz_blocks)
        if layout == "cuda_split":
            return Schedule("cuda_split", {"lanes": CUDA_WARP})
        return _cuda_matmul_schedule(target, m, out, r)
    lanes = target.simd_lanes
    parallel = runs_parallel(target, m, block, nnz_blocks)
    if r >= lanes or m < lanes:
        m_tile = _tile(m, ACCUMULATOR_VECTORS // -(-r // lanes))
        k_chunks = -(-min(m, 128) * in_ * 4 // X_BYTES_IN_L2)
        blocks_per_row = nnz_blocks / -(-out // r)
        k_chunks = max(1, min(k_chunks, int(blocks_per_row // MIN_BLOCKS_PER_CHUNK)))
        if k_chunks == 1 and m_tile <= 2:
            # Each weight vector loaded feeds at most 2 FMAs: a block row's weights must stay in L1 while the
            # m tiles go over them (W 384x1536, 32x32 at 90%: 19.6 KB a row; 4 chunks ran 1.15-1.2x faster).
            row_bytes = blocks_per_row * block[0] * block[1] * 4
            w_budget = (target.l1_bytes or 32 << 10) // W_L1_SHARE
            k_chunks = max(1, min(-(-int(row_bytes) // w_budget), int(blocks_per_row), MAX_L1_CHUNKS))
        return Schedule("rowvec", {"m_tile": m_tile, "k_chunks": k_chunks, "x_bytes_per_pass": X_BYTES_IN_L2,
                                   "parallel": parallel})
    row_group = 4 if r % 4 == 0 else 2 if r % 2 == 0 else 1
    # at least 8 (the kernel stages X in 8-row strips: 4-lane NEON with m = 4..7 would otherwise get 4)
    m_tile = max(8, min(64 // row_group, lanes * 2 ** (-(-m // lanes) - 1).bit_length()))
    return Schedule("mvec", {"row_group": row_group, "m_tile": m_tile, "out_tile": 2 * lanes, "parallel": parallel})


def _faster_cuda_layout(target: TargetProfile, m: int, out: int, in_: int, block: tuple[int, int],
                        nnz_blocks: int) -> str:
    """The CUDA matmul layout the cost model's defaults, fitted to an H100's kernels, predict faster, up
    to m = `CUDA_SPLIT_MAX_M`; threads along m above it. On that H100's times for the weight shapes
    the fit did not see, it picked the faster layout in 95% of the rows, 1.02x slower than always
    the faster one (geometric mean); a rule by m and block rows had picked it in 79%, 1.22x slower
    (and up to 6x), `tools/fit_cuda_cost_model.py`."""
    if m > CUDA_SPLIT_MAX_M:
        return "cuda"
    from pruneaug.cost_model import analytical  # (at call time: the cost model imports this module)

    params = analytical.default_params(target)
    density = nnz_blocks / (-(-out // block[0]) * -(-in_ // block[1]))
    seconds = {layout: float(analytical.latency_from_features(
        params, analytical.features(target, out, in_, m, block, density, layout))) for layout in ("cuda", "cuda_split")}
    return min(seconds, key=seconds.get)


def cuda_conv_tiles(r: int) -> dict[str, int]:
    """`cuda_kernels.bsr_conv2d`'s tiles: a thread block of `CUDA_THREADS_PER_BLOCK` threads, `r`
    output channels (a block's rows) by `px_tile` pixels."""
    return {"px_tile": max(1, CUDA_THREADS_PER_BLOCK // r)}


def _cuda_matmul_schedule(target: TargetProfile, m: int, out: int, r: int) -> Schedule:
    """`cuda_kernels.bsr_matmul`'s tiles: a warp of threads along m per thread block, each thread with
    as many rows of X (1, 2 or 4) as keeps `CUDA_WARPS_PER_SM` warps per SM busy and its `r` outputs
    per row within `CUDA_ACCUMULATORS` registers: more rows per thread reuse each weight load more,
    fewer give more warps to hide the loads' latency."""
    m_threads = max(1, min(m, CUDA_WARP))
    block_rows = -(-out // r)
    fitting = [rows for rows in (4, 2, 1) if rows == 1 or r * rows <= CUDA_ACCUMULATORS]
    busy = [rows for rows in fitting
            if block_rows * -(-m // (m_threads * rows)) >= CUDA_WARPS_PER_SM * target.cores]
    return Schedule("cuda", {"m_threads": m_threads, "m_per_thread": busy[0] if busy else 1})


def conv_schedule(target: TargetProfile, out_hw: tuple[int, int], block: tuple[int, int], pixels: int,
                  nnz_blocks: int, layout: str | None = None, out_c: int | None = None,
                  kernel_hw: tuple[int, int] | None = None) -> Schedule:
    """The schedule of a group-1 conv whose output rows are `out_hw` (a 1x1 stride-1 unpadded conv is
    one row of all pixels) with `r x c` blocks, `nnz_blocks` of them kept, over `pixels` output pixels
    (all images): those decide, as for its im2col matmul, whether it runs on the thread pool
    (`runs_parallel`).

    On CPUs, where a block's rows fill a register, the kernel vectorises over them, i.e. over output
    channels ("chanvec": a `tile_h x tile_w` patch of pixels times `r` channels, like the rowvec
    matmul), for every conv with real 2-D output rows, and for a flattened 1x1 conv of a small map
    (its one row at most `CHANVEC_MAX_ROW_VECTORS` vectors); else along an output row ("pixvec": a
    `row_group x tile_h x tile` accumulator of pixel vectors, which reads X as contiguous vectors; the
    accumulators a row's vectors and the block's rows leave free go to `tile_h` output rows). On AVX2
    at 90% (`tools/bench_kernels.py --part conv`, 1 thread) chanvec ran 3x3 convs 1.25-1.6x faster
    than pixvec with 16x16 blocks from 7x7 to 56x56 maps and a 1x1 conv on 14x14 1.2x faster;
    pixvec the 1x1 conv on 56x56 1.1x faster. On AVX-512 (2 threads) chanvec ran 1x1 convs on 28x28 and
    56x56 maps 1.2-2.2x faster than pixvec with 16x16 to 32x32 blocks at densities 0.2-1 (alike at 0.1),
    so there every flattened 1x1 conv is chanvec. A row shorter than a register is one vector of the power
    of two lanes that covers it: on a 16-lane host the CNN's 8-pixel rows in 16-lane vectors did half
    their FMAs on lanes past the row and stored it lane by lane.

    On CUDA one thread per (output channel, pixel) ("cuda"), unless those `out_c x pixels` threads
    cannot give every SM `CUDA_WARPS_PER_SM` warps (the CNN's convs at batch 1, 64 channels x 64
    pixels), or the blocks have `CUDA_CONV_SPLIT_MIN_ROWS` rows or more (a warp's worth for a 1x1
    conv, which gathers nothing): then a warp per (block row, pixel) splits the block row's columns
    ("cuda_split"). CUDA needs `out_c` and `kernel_hw`. `layout` forces one of the target's two layouts.
    """
    r, _ = block
    oh, ow = out_hw
    parallel = runs_parallel(target, pixels, block, nnz_blocks)
    if target.kind == "cuda":
        assert layout is not None or (out_c is not None and kernel_hw is not None), \
            "the CUDA conv's layout depends on its output channels and kernel size"
        if layout is None:
            fills_gpu = out_c * pixels >= CUDA_WARPS_PER_SM * CUDA_WARP * target.cores
            split_rows = CUDA_WARP if tuple(kernel_hw) == (1, 1) else CUDA_CONV_SPLIT_MIN_ROWS
            layout = "cuda" if fills_gpu and r < split_rows else "cuda_split"
        if layout == "cuda_split":
            return Schedule("cuda_split", {"lanes": CUDA_WARP})
        return Schedule("cuda", cuda_conv_tiles(r))
    lanes = target.simd_lanes
    row_vectors = -(-ow // lanes)
    vector = min(lanes, 1 << max(ow - 1, 0).bit_length())  # pixvec's: a short row in part of a register
    if layout is None:
        row_over_channels = row_vectors <= CHANVEC_MAX_ROW_VECTORS or lanes >= CHANVEC_ANY_ROW_LANES
        layout = "chanvec" if r >= lanes and (oh > 1 or row_over_channels) else "pixvec"
    if layout == "chanvec":
        cap = max(1, ACCUMULATOR_VECTORS // -(-r // lanes))
        tile_h, tile_w = _pixel_patch(oh, ow, cap)
        return Schedule("chanvec", {"tile_h": tile_h, "tile_w": tile_w, "parallel": parallel})
    row_vectors = -(-ow // vector)
    tiles = -(-row_vectors // PIXVEC_TILE_VECTORS)
    tile_vectors = -(-row_vectors // tiles)
    row_group = max(g for g in (4, 3, 2, 1) if r % g == 0 and g * tile_vectors <= PIXVEC_MAX_ACCUMULATORS)
    tile_h = _tile(oh, PIXVEC_MAX_ACCUMULATORS // (row_group * tile_vectors))  # output rows the rest fill
    return Schedule("pixvec", {"row_group": row_group, "tile": tile_vectors * vector, "tile_h": tile_h,
                               "parallel": parallel})
