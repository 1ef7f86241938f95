"""TIR for the block-sparse matmul and conv on CUDA: block rows over thread blocks.

Plain CUDA-core kernels: no tensor cores yet. The layouts and tiles are `schedule.kernel_schedule`'s
and `schedule.conv_schedule`'s: threads along m (`bsr_matmul`) or along (output channel, pixel)
(`bsr_conv2d`), or a warp per block row and row of the product splitting the block row's kept
columns (`bsr_matmul_split`, `bsr_conv2d_split`): where those threads cannot fill the GPU (small m,
small maps at small batches) or a block's rows share each read of the input.
Parameters: `X, data[nnzb, r, c], indices, indptr, bias[block_rows * r], Y`.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from tvm import tirx
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


def _split_row(block: tuple[int, int], lanes: int, out: int, activation: str | None, x_at: Callable):
    """The body of a split kernel (`bsr_matmul_split`, `bsr_conv2d_split`), for one block row `i` and
    one row of the product (a row of X, or an output pixel) on `lanes` threads: lane `t` goes over
    every `lanes`-th of the block row's kept columns, reading the product row's input at a column
    with `x_at(X, row, column)`; the lanes' sums of the block's `r` outputs are added up through
    shared memory and output `o` is stored at `Yf[base + o * out_stride]` (Y flattened)."""
    r, c = block
    act = activation_epilogue(activation)
    sums = -(-r // lanes)  # output rows each lane adds up at the end
    pitch = r | 1  # odd: lane t's sums at t * pitch put a warp's stores of one output in 32 banks

    @T.macro
    def body(X, data, indices, indptr, bias, Yf, i, row, t, base, out_stride):
        acc = T.alloc_buffer((r,), "float32", scope="local")
        shares = T.alloc_buffer((lanes * pitch,), "float32", scope="shared")
        total = T.alloc_buffer((1,), "float32", scope="local")
        x = T.alloc_buffer((1,), "float32", scope="local")
        for rr in T.unroll(r):
            acc[rr] = T.float32(0)
        for step in range(((indptr[i + 1] - indptr[i]) * c - t + lanes - 1) // lanes):
            # read once per column: written inside the sum, a conv's bounds-checked im2col read was
            # emitted once per output row (r branches and loads) and nvcc merged none of them
            x[0] = x_at(X, row, indices[indptr[i] + (step * lanes + t) // c] * c + (step * lanes + t) % c)
            for rr in T.unroll(r):
                acc[rr] = acc[rr] + data[indptr[i] + (step * lanes + t) // c, rr, (step * lanes + t) % c] * x[0]
        for rr in T.unroll(r):
            shares[t * pitch + rr] = acc[rr]
        T.tvm_storage_sync("shared")
        for s in range(sums):
            if s * lanes + t < r:
                total[0] = T.float32(0)
                for lane in range(lanes):
                    total[0] = total[0] + shares[lane * pitch + s * lanes + t]
                if i * r + s * lanes + t < out:
                    Yf[base + (i * r + s * lanes + t) * out_stride] = act(total[0] + bias[i * r + s * lanes + t])

    return body


@lru_cache(maxsize=KERNEL_CACHE_SIZE)
def bsr_matmul_split(m: int, out: int, in_: int, block: tuple[int, int], lanes: int, activation: str | None = None):
    """`bsr_matmul` for small m: a thread block per (block row, row of X) whose `lanes` threads split
    the block row's kept columns between them (`_split_row`).

    With threads along m, m = 1 left one thread per block row: the MLP's 256x256 layer in 16x16
    blocks ran on 16 threads of the whole GPU (36 us on an H100). Consecutive lanes take consecutive
    columns, so a warp's loads of X and of a block's weight rows are contiguous runs."""
    r, c = block
    block_rows = -(-out // r)
    nnzb = kept_block_count()
    row_body = _split_row(block, lanes, out, activation, lambda X, row, col: X[row, T.min(col, in_ - 1)])

    @T.prim_func
    def kernel(X: T.Buffer((m, in_), "float32"), data: T.Buffer((nnzb, r, c), "float32"),
               indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((block_rows + 1,), "int32"),
               bias: T.Buffer((block_rows * r,), "float32"), Y: T.Buffer((m, out), "float32")):
        T.func_attr({"tirx.noalias": True})
        Yf = T.decl_buffer((m * out,), "float32", data=Y.data)
        for i in T.thread_binding(block_rows, thread="blockIdx.x"):
            for row in T.thread_binding(m, thread="blockIdx.y"):
                for t in T.thread_binding(lanes, thread="threadIdx.x"):
                    row_body(X, data, indices, indptr, bias, Yf, i, row, t, row * out, 1)

    return kernel


def _im2col_at(x_shape, out_hw: tuple[int, int], kernel_hw, strides, pads, dilations) -> Callable:
    """`f(X, pixel, column)`: the implicit im2col matrix's entry of an output pixel (over all images)
    and a column (input channel, kernel row, kernel column), decoded and bounds-checked in place (no
    padded copy): 0 in the padding and past the last pixel or column."""
    n, c, h, w = x_shape
    kh, kw = kernel_hw
    (sh, sw), (dh, dw), (top, left) = strides, dilations, pads[:2]
    oh, ow = out_hw
    columns, pixels = c * kh * kw, n * oh * ow

    def at(X, p, col):
        y = p % (oh * ow) // ow * sh - top + col // kw % kh * dh
        x = p % ow * sw - left + col % kw * dw
        return T.if_then_else(
            tirx.all(col < columns, y >= 0, y < h, x >= 0, x < w, p < pixels),
            X[T.min(p // (oh * ow), n - 1), T.min(col // (kh * kw), c - 1), T.min(T.max(y, 0), h - 1),
              T.min(T.max(x, 0), w - 1)],
            T.float32(0))

    return at


@lru_cache(maxsize=KERNEL_CACHE_SIZE)
def bsr_conv2d(x_shape, out_c: int, out_hw: tuple[int, int], block: tuple[int, int],
               kernel_hw, strides, pads, dilations, px_tile: int, activation: str | None = None):
    """Conv `X[N, C, H, W] -> Y[N, Cout, Ho, Wo]` with a BSR `W[Cout, C*kh*kw]`: one thread per
    (output channel, pixel), reading the im2col matrix in place (`_im2col_at`)."""
    n, c, h, w = x_shape
    r, cb = block
    act = activation_epilogue(activation)
    kh, kw = kernel_hw
    oh, ow = out_hw
    block_rows = -(-out_c // r)
    nnzb = kept_block_count()
    pixels = n * oh * ow
    px_tile = min(pixels, px_tile)
    px_tiles = -(-pixels // px_tile)
    im2col = _im2col_at(x_shape, out_hw, kernel_hw, strides, pads, dilations)

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
                                acc[0] = acc[0] + data[b, rr, k] * im2col(X, po * px_tile + pi, indices[b] * cb + k)
                        if po * px_tile + pi < pixels and i * r + rr < out_c:
                            Y[(po * px_tile + pi) // (oh * ow), i * r + rr, (po * px_tile + pi) % (oh * ow) // ow,
                              (po * px_tile + pi) % ow] = act(acc[0] + bias[i * r + rr])

    return kernel


@lru_cache(maxsize=KERNEL_CACHE_SIZE)
def bsr_conv2d_split(x_shape, out_c: int, out_hw: tuple[int, int], block: tuple[int, int],
                     kernel_hw, strides, pads, dilations, lanes: int, activation: str | None = None):
    """`bsr_conv2d` where its threads cannot fill the GPU: a thread block per (block row, output
    pixel) whose `lanes` threads split the block row's kept columns (`_split_row`). The CNN's 3x3
    convs at batch 1 (8x8 maps) otherwise ran 1 thread per output, each over all its ~100-600 kept
    columns in turn (49 us on an H100 of the model's 80 us of kernels)."""
    n, c, h, w = x_shape
    r, cb = block
    oh, ow = out_hw
    block_rows = -(-out_c // r)
    nnzb = kept_block_count()
    pixels = n * oh * ow
    row_body = _split_row(block, lanes, out_c, activation,
                          _im2col_at(x_shape, out_hw, kernel_hw, strides, pads, dilations))

    @T.prim_func
    def kernel(X: T.Buffer((n, c, h, w), "float32"), data: T.Buffer((nnzb, r, cb), "float32"),
               indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((block_rows + 1,), "int32"),
               bias: T.Buffer((block_rows * r,), "float32"), Y: T.Buffer((n, out_c, oh, ow), "float32")):
        T.func_attr({"tirx.noalias": True})
        Yf = T.decl_buffer((n * out_c * oh * ow,), "float32", data=Y.data)
        for i in T.thread_binding(block_rows, thread="blockIdx.x"):
            for p in T.thread_binding(pixels, thread="blockIdx.y"):
                for t in T.thread_binding(lanes, thread="threadIdx.x"):
                    row_body(X, data, indices, indptr, bias, Yf, i, p, t,
                             p // (oh * ow) * out_c * oh * ow + p % (oh * ow), oh * ow)

    return kernel
