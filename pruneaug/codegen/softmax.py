"""Softmax over the last axis for CPUs, as one TIR function with vector partial maxima and sums.

Why not TVM's own: FastMathTransform makes it `topi.nn.fast_softmax`, which DLight's CPU `Reduction` rule
schedules as layer norm's: each row's maximum and sum one scalar chain, and `x - max` and its exp written
to two temporaries the size of the input. This kernel keeps `ACCUMULATORS` vectors of partial maxima and
sums per row, folds them across the vector in log2(lanes) steps (a chain of `lanes` had made rows of 16
1.3x slower), and takes `ROW_TILE` rows step by step together so that their dependent chains overlap
(rows of 16 have too few vectors to hide them). `tools/bench_kernels.py --part softmax` (2 threads,
kernel alone, four runs) ran it 1.3-1.9x faster than TVM's for the bundled encoder's attention (rows
of 16, batch 1 to 32), 3.5-4.4x for rows of 128 and 197 (BERT-base, ViT-B), 1.1-1.4x for rows of 37
(5 of them scalar), and 1.2-13x faster than onnxruntime.
The encoder's whole compiled function, both builds timed side by side: 2-3% faster at batch 1 and 32,
alike at batch 8 (its two softmaxes are 1-2% of it).

exp is `fast_exp`, TVM's `topi.fast_exp` written out: vectorised, 0.4 ns an element against 3.1-4.0 for
`T.exp`, which LLVM lowers to a scalar `expf` call per lane; relative error under 3e-7 (to 1e-5 of
numpy's float32 softmax on rows of +-100).
A row: its maximum; `Y = exp(X - max)`; the sum of Y; `Y *= 1 / sum`.
Parameters: `X[rows, cols], Y[rows, cols]`.
"""
from __future__ import annotations

from functools import lru_cache

from pruneaug.codegen.cpu_kernels import KERNEL_CACHE_SIZE, outer_loop

ACCUMULATORS = 4  # vectors of partial maxima / sums per row: independent chains (one vector: latency-bound)
ROW_TILE = 4  # rows taken step by step together, their chains overlapping: 1.1x faster than 1 (2048x16, 1536x128)
# `worth_parallel` counts elementwise iterations; a softmax element counts as 4, so that at its
# PARALLEL_MIN_WORK of 2^16 rows go to the thread pool from 16384 elements. Serial / parallel time at 2
# threads (kernel alone): rows of 16: 0.54 at 2048 elements, 1.00 at 4096, 1.06 at 8192, 1.26 at 16384,
# 1.66 at 32768 (the encoder at batch 32); rows of 128: 0.61 at 4096, 0.80 at 8192, 1.51 at 16384.
WORK_PER_ELEMENT = 4


def fast_exp(x):
    """TVM's `topi.fast_exp` (what FastMathTransform gives TVM's softmax) for `x <= 0`, as a TIR expression
    (TVM's is a TE compute, not an expression a loop of ours can use).

    `exp(x) = 2^n * exp(f)`, `n = round(x / ln 2)`, `exp(f) = 1 + f + f^2 * p(f)` on |f| <= ln(2) / 2.
    TVM's upper clamp and its final `max(result, x)` are left out: `x <= 0` needs neither."""
    from tvm.script import tirx as T

    x = T.max(x, T.float32(-88.3762626647949))  # from x below about -87.7 (exp: 1e-38) the result is 0
    n = T.floor(x * T.float32(1.44269504088896341) + T.float32(0.5))
    f = x - n * T.float32(0.6931471805599453)
    poly = T.float32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        poly = poly * f + T.float32(c)
    scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", n + T.float32(127)), 23))
    return scale * (poly * f * f + f + T.float32(1))


@lru_cache(maxsize=KERNEL_CACHE_SIZE)
def softmax_primfunc(rows: int, cols: int, lanes: int, parallel: int):
    """`Y = exp(X - max) / sum(exp(X - max))` along each row of `X[rows, cols]`, the rows shared out to
    the thread pool where `parallel` (`relax_build._softmax_rows` decides).

    Memoised as `norm.layer_norm_primfunc` is: parsing the TVMScript takes about 0.1 s."""
    from tvm.script import tirx as T

    assert lanes in (4, 8, 16), lanes  # the halving steps below
    outer = outer_loop(parallel)
    vectors = cols // lanes  # whole vectors in a row; the last `cols % lanes` columns one by one
    accs = max(1, min(ACCUMULATORS, vectors))
    groups = vectors // accs  # vectors in groups of `accs` accumulators, the `vectors % accs` left after them
    tail = vectors * lanes
    lowest = T.float32(-3.4028234663852886e38)

    def add(a, b):
        return a + b

    @T.macro
    def reduce_rows(src, r0, count, acc, stat, i, op, init):
        """stat[k, i] = op over src[r0 + k, :] for each of `count` rows, in `accs` vectors of partial results."""
        for k in T.unroll(count):
            for a in T.unroll(accs):
                for v in T.vectorized(lanes):
                    acc[k, a, v] = init
        for j in range(groups):
            for k in T.unroll(count):
                for a in T.unroll(accs):
                    for v in T.vectorized(lanes):
                        acc[k, a, v] = op(acc[k, a, v], src[r0 + k, (j * accs + a) * lanes + v])
        for k in T.unroll(count):
            for a in T.unroll(vectors % accs):
                for v in T.vectorized(lanes):
                    acc[k, a, v] = op(acc[k, a, v], src[r0 + k, (groups * accs + a) * lanes + v])
            for a in T.unroll(accs - 1):
                for v in T.vectorized(lanes):
                    acc[k, 0, v] = op(acc[k, 0, v], acc[k, a + 1, v])
            # across the vector by halves: log2(lanes) dependent steps, not `lanes`
            if lanes >= 16:
                for v in T.vectorized(8):
                    acc[k, 0, v] = op(acc[k, 0, v], acc[k, 0, v + 8])
            if lanes >= 8:
                for v in T.vectorized(4):
                    acc[k, 0, v] = op(acc[k, 0, v], acc[k, 0, v + 4])
            for v in T.vectorized(2):
                acc[k, 0, v] = op(acc[k, 0, v], acc[k, 0, v + 2])
            stat[k, i] = op(acc[k, 0, 0], acc[k, 0, 1])
            for j in range(cols - tail):
                stat[k, i] = op(stat[k, i], src[r0 + k, tail + j])

    @T.macro
    def store_rows(Y, r0, count, value):
        """Y[r0 + k, c] = value(k, c) for each of `count` rows, vectorised."""
        for j in range(vectors):
            for k in T.unroll(count):
                for v in T.vectorized(lanes):
                    Y[r0 + k, j * lanes + v] = value(k, j * lanes + v)
        for k in T.unroll(count):
            for j in range(cols - tail):
                Y[r0 + k, tail + j] = value(k, tail + j)

    @T.macro
    def softmax_rows(X, Y, r0, count):
        acc = T.alloc_buffer((count, accs, lanes), "float32", scope="global")
        stat = T.alloc_buffer((count, 2), "float32", scope="global")  # each row's maximum, then 1 / its sum
        reduce_rows(X, r0, count, acc, stat, 0, T.max, lowest)
        store_rows(Y, r0, count, lambda k, c: fast_exp(X[r0 + k, c] - stat[k, 0]))
        reduce_rows(Y, r0, count, acc, stat, 1, add, T.float32(0))
        for k in T.unroll(count):
            stat[k, 1] = T.float32(1) / stat[k, 1]
        store_rows(Y, r0, count, lambda k, c: Y[r0 + k, c] * stat[k, 1])

    @T.prim_func(s_tir=True)
    def softmax(X: T.Buffer((rows, cols), "float32"), Y: T.Buffer((rows, cols), "float32")):
        # opaque (pattern 8): nothing is fused into it; TVM's analyses want a root block. "tirx.noalias", not
        # "tir.noalias" (which 0.27 ignores): one function with it gives the whole LLVM module noalias
        # arguments, which TVM's fast_softmax had given the bundled encoder (its matmuls 5-8% faster)
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        with T.sblock("root"):
            for t in outer(rows // ROW_TILE):
                softmax_rows(X, Y, t * ROW_TILE, ROW_TILE)
            if rows % ROW_TILE != 0:
                softmax_rows(X, Y, rows // ROW_TILE * ROW_TILE, rows % ROW_TILE)

    return softmax
