"""Loop-annotated TIR for `Y[m, out] = X[m, in] @ W.T + bias` with `W` in BSR, for CPUs.

Two layouts, chosen per block shape by `bsr.py` (see `tools/bench_kernels.py` for the figures):

* `rowvec_matmul`: vectorised over the `r` rows of a block, data prepacked `[nnzb, c, r]`;
  a register tile of `m_tile` rows of X times `r` outputs; X is read in place (broadcasts).
  The choice for blocks whose `r` fills a SIMD register (8x8 and up on AVX2); also the dense kernel.
* `mvec_matmul`: vectorised over `m`, data `[nnzb, r, c]`; X is transposed once into a workspace
  so that a kept weight multiplies a contiguous run of X; the tile is `row_group` block rows times
  `m_tile` values of m. The choice for thin blocks (1x1, 1x4, 4x1).

Every function is built by TVMScript with the shapes and tile sizes baked in as constants, and
the pattern (`indices`, block pointers) read at run time: with the pattern baked in, a 90%-sparse
1536x384 layer ran 2-3.5x slower and compiled for 10-80 s (`tools/bench_kernels.py --baked`).
The kept-block count is the one symbolic size (`kept_block_count`): it only sizes `data` and
`indices`, so one compiled function serves a layer shape at every sparsity with the same tiles
(BERT-base, 72 pruned layers: 72 kernels to compile became a handful). The builders are memoised
(`KERNEL_CACHE_SIZE`): layers of one shape, block and schedule parse their TVMScript once.
Parameters are `X, data, indices, <block pointers>, bias, Y`: `chunk_ptr[block_rows, k_chunks + 1]`
for rowvec, `indptr[block_rows + 1]` for mvec.
Accumulators are `global`-scope allocations under 1 KiB: TVM 0.27 turns those into stack
arrays that LLVM keeps in registers, while a `local`-scope one becomes a heap workspace.
An `activation` ("relu", "relu6", "hardswish", "gelu") is applied as the results are stored
(`activation_epilogue`), so that a following ReLU costs no pass of its own over Y.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

ACTIVATIONS = (None, "relu", "relu6", "hardswish", "gelu")  # what the kernels apply to their result as they store it
# erf(x) for float32 as TVM's fast_erf computes it (the rational approximation of Eigen's generic_fast_erf_float):
# x * P(x^2) / Q(x^2) over x clipped to [-4, 4], the coefficients highest power first
ERF_CLIP = 4.0
ERF_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                 -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                   -1.42647390514189e-02)


KERNEL_CACHE_SIZE = 256  # parsed kernels kept per builder: parsing TVMScript (~0.1 s) was most of a model's rewrite


def kept_block_count() -> tirx.Var:
    """The symbolic length of `data` and `indices`, bound from the arrays at each call.

    Read by no loop bound (the block pointers are), so the code is the one a constant would give,
    and layers that differ only in sparsity share one function (the Relax BlockBuilder keeps one
    copy of structurally equal functions)."""
    return tirx.Var("nnzb", "int32")


def activation_epilogue(activation: str | None) -> Callable:
    """`f(value) -> value` for TVMScript: the activation applied to a result before it is stored.

    (TVMScript evaluates a Python call on TIR expressions while parsing, so the kernels stay one text.)"""
    assert activation in ACTIVATIONS, activation
    if activation == "relu":
        return lambda value: T.max(value, T.float32(0))
    if activation == "relu6":  # Clip(0, 6): MobileNets'
        return lambda value: T.min(T.max(value, T.float32(0)), T.float32(6))
    if activation == "hardswish":  # x * relu6(x + 3) / 6: MobileNetV3's, as TVM imports ONNX's HardSwish
        return lambda value: value * (T.min(T.max(value + T.float32(3), T.float32(0)), T.float32(6)) / T.float32(6))
    if activation == "gelu":  # x * (1 + erf(x / sqrt 2)) / 2: BERT's, ViT's and ConvNeXt's, as torch exports it
        return lambda value: value * T.float32(0.5) * (T.float32(1) + fast_erf(value * T.float32(0.5 ** 0.5)))
    return lambda value: value


def fast_erf(value):
    """erf(`value`) as TVM's own fast_erf computes it: plain multiply-adds and one division, which vectorise (a
    call of libm's erff would not)."""
    x = T.min(T.max(value, T.float32(-ERF_CLIP)), T.float32(ERF_CLIP))
    square = x * x
    numerator, denominator = T.float32(ERF_NUMERATOR[0]), T.float32(ERF_DENOMINATOR[0])
    for coefficient in ERF_NUMERATOR[1:]:
        numerator = numerator * square + T.float32(coefficient)
    for coefficient in ERF_DENOMINATOR[1:]:
        denominator = denominator * square + T.float32(coefficient)
    return x * numerator / denominator


def row_sum_macro(cols: int, lanes: int, accumulators: int) -> Callable:
    """A TVMScript macro `sum_row(acc, total, slot, term, args)`: `total[slot]` = the sum of `term(args, c)`
    over a row's `cols` columns `c`, in `accumulators` vectors of `lanes` partial sums (`acc[accumulators,
    lanes]`): independent add chains, added into one vector before its lanes are summed (one after another,
    4 x 8 partial sums were a chain of 32 dependent adds); the columns past the last whole step one by one.
    `term` is a Python function evaluated while parsing, `args` the buffers and loop variables it reads.
    The row reductions of layer norms and trailing means share it (`norm`, `row_mean`)."""
    step = accumulators * lanes
    body = cols // step * step  # columns the vector accumulators take; the rest one by one

    @T.macro
    def sum_row(acc, total, slot, term, args):
        for a in T.unroll(accumulators):
            for v in T.vectorized(lanes):
                acc[a, v] = T.float32(0)
        for j in range(body // step):
            for a in T.unroll(accumulators):
                for v in T.vectorized(lanes):
                    acc[a, v] = acc[a, v] + term(args, j * step + a * lanes + v)
        for a in T.unroll(1, accumulators):
            for v in T.vectorized(lanes):
                acc[0, v] = acc[0, v] + acc[a, v]
        total[slot] = T.float32(0)
        for j in range(cols - body):
            total[slot] = total[slot] + term(args, body + j)
        for v in T.unroll(lanes):
            total[slot] = total[slot] + acc[0, v]

    return sum_row


def largest_divisor(extent: int, candidates: Sequence[int]) -> int:
    """The first candidate that divides `extent` (candidates in decreasing preference), else 1: a tile
    or vector width that covers a loop without a tail."""
    return next((c for c in candidates if extent % c == 0), 1)


def outer_loop(parallel: int) -> Callable:
    """The kernels' outer loop: `T.parallel`, or `T.serial` for work too small to pay for waking the
    thread pool (`schedule.runs_parallel` decides)."""
    return T.parallel if parallel else T.serial


@lru_cache(maxsize=KERNEL_CACHE_SIZE)
def rowvec_matmul(m: int, out: int, in_: int, block: tuple[int, int], m_tile: int,
                  k_chunks: int, x_bytes_per_pass: int, parallel: int = 1, activation: str | None = None):
    """BSR matmul vectorised over block rows: `acc[m_tile, r] += X[., col] * data[b, k, :]`.

    Cache blocking for X: the columns are cut into `k_chunks` chunks (block row `i`'s blocks in
    chunk `kc` are `chunk_ptr[i, kc]:chunk_ptr[i, kc + 1]`, see `chunk_pointers`; the first chunk
    writes Y, the others add to it) and the rows of X into passes of about `x_bytes_per_pass`, so
    that the part of X in use stays in L2 while every block row goes over it (else a 768x3072 layer
    re-reads X from L3 once per block row, or W once per pass). The activation waits for the last chunk.
    """
    r, c = block
    act = activation_epilogue(activation)
    outer = outer_loop(parallel)

    def finish(value, kc):  # the activation, once the last column chunk is summed in
        if k_chunks == 1 or activation is None:
            return act(value)
        return T.if_then_else(kc == k_chunks - 1, act(value), value)

    block_rows = -(-out // r)
    nnzb = kept_block_count()
    m_tiles = -(-m // m_tile)
    chunk_bytes = m_tile * -(-in_ // k_chunks) * 4
    tiles_per_pass = max(1, min(m_tiles, x_bytes_per_pass // chunk_bytes))
    passes = -(-m_tiles // tiles_per_pass)
    tiles_per_pass = -(-m_tiles // passes)  # even passes: no tile past the end of m
    ragged_m = passes * tiles_per_pass * m_tile != m
    ragged_in = in_ % c != 0
    ragged_out = out % r != 0

    @T.prim_func
    def kernel(X: T.Buffer((m, in_), "float32"), data: T.Buffer((nnzb, c, r), "float32"),
               indices: T.Buffer((nnzb,), "int32"), chunk_ptr: T.Buffer((block_rows, k_chunks + 1), "int32"),
               bias: T.Buffer((block_rows * r,), "float32"), Y: T.Buffer((m, out), "float32")):
        T.func_attr({"tirx.noalias": True})
        for kc, p in T.grid(k_chunks, passes):
            for i in outer(block_rows):
                for mp in range(tiles_per_pass):
                    acc = T.alloc_buffer((m_tile, r), "float32", scope="global")
                    for mi in T.unroll(m_tile):
                        for rr in T.vectorized(r):
                            acc[mi, rr] = T.float32(0)
                    for b in range(chunk_ptr[i, kc], chunk_ptr[i, kc + 1]):
                        for k in T.unroll(c):
                            for mi in T.unroll(m_tile):
                                for rr in T.vectorized(r):
                                    if ragged_in:
                                        acc[mi, rr] = acc[mi, rr] + X[T.min((p * tiles_per_pass + mp) * m_tile + mi, m - 1), T.min(indices[b] * c + k, in_ - 1)] * data[b, k, rr]
                                    else:
                                        acc[mi, rr] = acc[mi, rr] + X[T.min((p * tiles_per_pass + mp) * m_tile + mi, m - 1), indices[b] * c + k] * data[b, k, rr]
                    for mi in T.unroll(m_tile):
                        if not ragged_m or (p * tiles_per_pass + mp) * m_tile + mi < m:
                            if not ragged_out or i < block_rows - 1:
                                for rr in T.vectorized(r):
                                    Y[(p * tiles_per_pass + mp) * m_tile + mi, i * r + rr] = finish(acc[mi, rr] + T.if_then_else(
                                        kc == 0, bias[i * r + rr], Y[(p * tiles_per_pass + mp) * m_tile + mi, i * r + rr]), kc)
                            else:
                                stage = T.alloc_buffer((r,), "float32", scope="global")
                                for rr in T.vectorized(r):
                                    stage[rr] = acc[mi, rr]
                                for rr in range(r):
                                    if i * r + rr < out:
                                        Y[(p * tiles_per_pass + mp) * m_tile + mi, i * r + rr] = finish(stage[rr] + T.if_then_else(
                                            kc == 0, bias[i * r + rr], Y[(p * tiles_per_pass + mp) * m_tile + mi, i * r + rr]), kc)

    return kernel


def chunk_pointers(indptr: np.ndarray, indices: np.ndarray, block_cols: int, k_chunks: int) -> np.ndarray:
    """`chunk_ptr[i, kc]`: where block row `i`'s blocks of column chunk `kc` start (columns sorted)."""
    bounds = np.linspace(0, block_cols, k_chunks + 1).round().astype(np.int64)
    chunk_ptr = np.empty((len(indptr) - 1, k_chunks + 1), np.int32)
    for i in range(len(indptr) - 1):
        cols = indices[indptr[i]:indptr[i + 1]]
        assert np.all(np.diff(cols) > 0), "block columns must be sorted within a row"
        chunk_ptr[i] = indptr[i] + np.searchsorted(cols, bounds)
    return chunk_ptr


@lru_cache(maxsize=KERNEL_CACHE_SIZE)
def mvec_matmul(m: int, out: int, in_: int, block: tuple[int, int], row_group: int,
                m_tile: int, out_tile: int = 8, in_tile: int = 16, parallel: int = 1, activation: str | None = None):
    """BSR matmul vectorised over m: `acc[row_group, m_tile] += data[b, row, k] * XT[col + k, .]`.

    X is transposed in `in_tile`-column strips and the result is staged per `out_tile` output rows
    and written back as contiguous row pieces: a column-wise store into `Y[m, out]` (a row stride
    of a multiple of 512 bytes) thrashes a few L1 sets and was slower than the whole product.
    """
    r, c = block
    act = activation_epilogue(activation)
    outer = outer_loop(parallel)
    assert r % row_group == 0 and m_tile % 8 == 0, (r, row_group, m_tile)
    block_rows = -(-out // r)
    rows_per_tile = max(1, out_tile // r)  # block rows staged together
    out_tile = rows_per_tile * r
    row_tiles = -(-block_rows // rows_per_tile)
    out_pad = row_tiles * out_tile
    in_pad = -(-in_ // (in_tile * c)) * in_tile * c
    m_pad = -(-m // m_tile) * m_tile
    padded_x = in_pad != in_ or m_pad != m
    ragged_out = out % out_tile != 0
    groups = r // row_group
    nnzb = kept_block_count()

    @T.prim_func
    def kernel(X: T.Buffer((m, in_), "float32"), data: T.Buffer((nnzb, r, c), "float32"),
               indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((block_rows + 1,), "int32"),
               bias: T.Buffer((out_pad,), "float32"), Y: T.Buffer((m, out), "float32")):
        T.func_attr({"tirx.noalias": True})
        XT = T.alloc_buffer((in_pad, m_pad), "float32", scope="global")
        for jo in outer(in_pad // in_tile):
            for mm in range(m_pad):
                for jc in T.unroll(in_tile):
                    if padded_x:
                        XT[jo * in_tile + jc, mm] = T.if_then_else(
                            jo * in_tile + jc < in_ and mm < m,
                            X[T.min(mm, m - 1), T.min(jo * in_tile + jc, in_ - 1)], T.float32(0))
                    else:
                        XT[jo * in_tile + jc, mm] = X[mm, jo * in_tile + jc]
        for t in outer(row_tiles):
            stage = T.alloc_buffer((out_tile, m_pad), "float32", scope="global")
            for ti in range(rows_per_tile):
                for g in range(groups):
                    for mo in range(m_pad // m_tile):
                        acc = T.alloc_buffer((row_group, m_tile), "float32", scope="global")
                        for rr in T.unroll(row_group):
                            for mm in T.vectorized(m_tile):
                                acc[rr, mm] = T.float32(0)
                        if t * rows_per_tile + ti < block_rows:
                            for b in range(indptr[t * rows_per_tile + ti], indptr[t * rows_per_tile + ti + 1]):
                                for k in T.unroll(c):
                                    for rr in T.unroll(row_group):
                                        for mm in T.vectorized(m_tile):
                                            acc[rr, mm] = acc[rr, mm] + data[b, g * row_group + rr, k] * XT[indices[b] * c + k, mo * m_tile + mm]
                        for rr in T.unroll(row_group):
                            for mm in T.vectorized(m_tile):
                                stage[ti * r + g * row_group + rr, mo * m_tile + mm] = acc[rr, mm]
            for mm in range(m):
                if not ragged_out or t < row_tiles - 1:
                    for o in T.vectorized(out_tile):
                        Y[mm, t * out_tile + o] = act(stage[o, mm] + bias[t * out_tile + o])
                else:
                    for o in range(out_tile):
                        if t * out_tile + o < out:
                            Y[mm, t * out_tile + o] = act(stage[o, mm] + bias[t * out_tile + o])

    return kernel
