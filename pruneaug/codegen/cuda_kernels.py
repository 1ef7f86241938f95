"""TIR for the block-sparse matmul and conv on CUDA: block rows over thread blocks.

Plain CUDA-core kernels: no tensor cores yet. The tiles are `schedule.kernel_schedule`'s and
`schedule.conv_schedule`'s: the matmul puts threads along m (`bsr_matmul`), or, where m is too small
to fill a warp, splits each block row's kept columns over a warp (`bsr_matmul_split`). Parameters: `X, data[nnzb, r, c], indices, indptr, bias[block_rows * r], Y`.
"""
from __future__ import annotations

from functools import lru_cache

from tvm.script import tirx as T

from pruneaug.codegen.cpu_kernels import KERNEL_CACHE_SIZE, activation_epilogue, kept_block_count


@lru_cache(maxsize=KERNEL_CACHE_SIZE)
def bsr_matmul(m: int, out: int, in_: int, block: tuple[int, int], m_threads: int, m_per_thread: int,
               activation: str | None = None):
    """`Y[m, out] = act(X[m, in] @ W.T + bias)` for a BSR `W`, for CUDA.

    A thread block per (block row, tile of `m_threads * m_per_thread` rows of X); each thread holds
    the block row's `r` outputs for `m_per_thread` rows (`r * m_per_thread` accumulators in
    registers). All threads of a warp read the same weight (one broadcast load feeds
    `m_per_thread` FMAs) and each reads its own rows of X, which stay in L1 across a block's `c`
    columns. (The first kernel put a block's rows on threads instead: every weight load was a
    strided gather, 2-6x slower than this on an H100.)"""
    r, c = block
    act = activation_epilogue(activation)
    block_rows = -(-out // r)
    nnzb = kept_block_count()
    m_tile = m_threads * m_per_thread
    m_tiles = -(-m // m_tile)

    @T.prim_func
    def kernel(X: T.Buffer((m, in_), "float32"), data: T.Buffer((nnzb, r, c), "float32"),
               indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((block_rows + 1,), "int32"),
               bias: T.Buffer((block_rows * r,), "float32"), Y: T.Buffer((m, out), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in T.thread_binding(block_rows, thread="blockIdx.x"):
            for mo in T.thread_binding(m_tiles, thread="blockIdx.y"):
                for t in T.thread_binding(m_threads, thread="threadIdx.x"):
                    acc = T.alloc_buffer((r, m_per_thread), "float32", scope="local")
                    xs = T.alloc_buffer((m_per_thread,), "float32", scope="local")
                    for rr in T.unroll(r):
                        for j in T.unroll(m_per_thread):
                            acc[rr, j] = T.float32(0)
                    for b in range(indptr[i], indptr[i + 1]):
                        for k in range(c):  # nvcc unrolls it; the accumulators' indices stay constants
                            for j in T.unroll(m_per_thread):
                                xs[j] = X[T.min(mo * m_tile + j * m_threads + t, m - 1),
                                          T.min(indices[b] * c + k, in_ - 1)]
                            for rr in T.unroll(r):
                                for j in T.unroll(m_per_thread):
                                    acc[rr, j] = acc[rr, j] + data[b, rr, k] * xs[j]
                    for rr in T.unroll(r):
                        for j in T.unroll(m_per_thread):
                            if mo * m_tile + j * m_threads + t < m and i * r + rr < out:
                                Y[mo * m_tile + j * m_threads + t, i * r + rr] = act(acc[rr, j] + bias[i * r + rr])

    return kernel


@lru_cache(maxsize=KERNEL_CACHE_SIZE)
def bsr_matmul_split(m: int, out: int, in_: int, block: tuple[int, int], lanes: int, activation: str | None = None):
    """`bsr_matmul` for small m: a thread block per (block row, row of X) whose `lanes` threads split
    the block row's kept columns between them, each summing its share of the block row's `r` outputs,
    then adding up the lanes' shares through shared memory.

    With threads along m, m = 1 left one thread per block row: the MLP's 256x256 layer in 16x16
    blocks ran on 16 threads of the whole GPU (36 us on an H100). Consecutive lanes take consecutive
    columns, so a warp's loads of X and of a block's weight rows are contiguous runs."""
    r, c = block
    act = activation_epilogue(activation)
    block_rows = -(-out // r)
    nnzb = kept_block_count()
    sums = -(-r // lanes)  # output rows each lane adds up at the end

    @T.prim_func
    def kernel(X: T.Buffer((m, in_), "float32"), data: T.Buffer((nnzb, r, c), "float32"),
               indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((block_rows + 1,), "int32"),
               bias: T.Buffer((block_rows * r,), "float32"), Y: T.Buffer((m, out), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in T.thread_binding(block_rows, thread="blockIdx.x"):
            for row in T.thread_binding(m, thread="blockIdx.y"):
                for t in T.thread_binding(lanes, thread="threadIdx.x"):
                    acc = T.alloc_buffer((r,), "float32", scope="local")
                    # a lane's shares, padded by one so that its r stores fall in different banks
                    shares = T.alloc_buffer((lanes, r + 1), "float32", scope="shared")
                    total = T.alloc_buffer((1,), "float32", scope="local")
                    for rr in T.unroll(r):
                        acc[rr] = T.float32(0)
                    for step in range(((indptr[i + 1] - indptr[i]) * c - t + lanes - 1) // lanes):
                        for rr in T.unroll(r):
                            acc[rr] = acc[rr] + data[indptr[i] + (step * lanes + t) // c, rr, (step * lanes + t) % c] * X[
                                row, T.min(indices[indptr[i] + (step * lanes + t) // c] * c + (step * lanes + t) % c, in_ - 1)]
                    for rr in T.unroll(r):
                        shares[t, rr] = acc[rr]
                    T.tvm_storage_sync("shared")
                    for s in range(sums):
                        if s * lanes + t < r:
                            total[0] = T.float32(0)
                            for lane in range(lanes):
                                total[0] = total[0] + shares[lane, s * lanes + t]
                            if i * r + s * lanes + t < out:
                                Y[row, i * r + s * lanes + t] = act(total[0] + bias[i * r + s * lanes + t])

    return kernel


@lru_cache(maxsize=KERNEL_CACHE_SIZE)
def bsr_conv2d(x_shape, out_c: int, out_hw: tuple[int, int], block: tuple[int, int],
               kernel_hw, strides, pads, dilations, px_tile: int, activation: str | None = None):
    """Conv `X[N, C, H, W] -> Y[N, Cout, Ho, Wo]` with a BSR `W[Cout, C*kh*kw]`: one thread per
    (output channel, pixel), the im2col column decoded and bounds-checked in place (no padded copy)."""
    n, c, h, w = x_shape
    r, cb = block
    act = activation_epilogue(activation)
    kh, kw = kernel_hw
    (sh, sw), (dh, dw), (top, left) = strides, dilations, pads[:2]
    oh, ow = out_hw
    block_rows = -(-out_c // r)
    nnzb = kept_block_count()
    columns = c * kh * kw
    pixels = n * oh * ow
    px_tile = min(pixels, px_tile)
    px_tiles = -(-pixels // px_tile)

    @T.prim_func
    def kernel(X: T.Buffer((n, c, h, w), "float32"), data: T.Buffer((nnzb, r, cb), "float32"),
               indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((block_rows + 1,), "int32"),
               bias: T.Buffer((block_rows * r,), "float32"), Y: T.Buffer((n, out_c, oh, ow), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in T.thread_binding(block_rows, thread="blockIdx.x"):
            for po in T.thread_binding(px_tiles, thread="blockIdx.y"):
                for pi in T.thread_binding(px_tile, thread="threadIdx.y"):
                    for rr in T.thread_binding(r, thread="threadIdx.x"):
                        acc = T.alloc_buffer((1,), "float32", scope="local")
                        acc[0] = T.float32(0)
                        for b in range(indptr[i], indptr[i + 1]):
                            for k in T.unroll(cb):
                                acc[0] = acc[0] + data[b, rr, k] * T.if_then_else(
                                    indices[b] * cb + k < columns
                                    and 0 <= (po * px_tile + pi) % (oh * ow) // ow * sh - top + (indices[b] * cb + k) // kw % kh * dh
                                    and (po * px_tile + pi) % (oh * ow) // ow * sh - top + (indices[b] * cb + k) // kw % kh * dh < h
                                    and 0 <= (po * px_tile + pi) % ow * sw - left + (indices[b] * cb + k) % kw * dw
                                    and (po * px_tile + pi) % ow * sw - left + (indices[b] * cb + k) % kw * dw < w
                                    and po * px_tile + pi < pixels,
                                    X[T.min((po * px_tile + pi) // (oh * ow), n - 1),
                                      T.min((indices[b] * cb + k) // (kh * kw), c - 1),
                                      T.min(T.max((po * px_tile + pi) % (oh * ow) // ow * sh - top + (indices[b] * cb + k) // kw % kh * dh, 0), h - 1),
                                      T.min(T.max((po * px_tile + pi) % ow * sw - left + (indices[b] * cb + k) % kw * dw, 0), w - 1)],
                                    T.float32(0))
                        if po * px_tile + pi < pixels and i * r + rr < out_c:
                            Y[(po * px_tile + pi) // (oh * ow), i * r + rr, (po * px_tile + pi) % (oh * ow) // ow,
                              (po * px_tile + pi) % ow] = act(acc[0] + bias[i * r + rr])

    return kernel
