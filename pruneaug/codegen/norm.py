"""Layer and RMS normalisation over the last axis for CPUs, as one TIR function with vector accumulators.

Why not TVM's own: its Relax layer norm, scheduled by DLight's CPU `Reduction` rule, sums each row as
one scalar chain (rfactor does not combine with its compute_at), so a row of 128 waits on 128
dependent adds twice. On the bundled encoder at batch 32 (512 rows of 128) each layer norm took
72-93 µs at 2 threads, 14% of the compiled function. This kernel keeps `ACCUMULATORS` vectors of
partial sums per row: `tools/bench_kernels.py --part norm` (2 threads) ran it 3.3-7.2x faster than
TVM's op from 16x128 to 2048x768, each called through the Relax VM (BERT-base at 2048 tokens: 306 µs
against 2,193 µs; onnxruntime 769); the kernels alone, as the tool now times them, 2.2-6.6x. TVM's RMS
norm is alike: this kernel ran 2.9-5.1x faster, from 16x128 to 2048x768.

Two passes over a row, as TVM's: the mean, then the sum of squared deviations (not E[x^2] - mean^2,
which cancels badly for rows far from zero), then the normalised row, vectorised. Each pass adds its
accumulators into one vector before summing lanes: summed one scalar after another, the 4 x 8
partial sums were a chain of 32 dependent adds per pass. Kernel alone, new / old time over three
runs: 0.57-0.58 at 16x128, 0.56-0.65 at 512x128 (on the pool), 0.84-0.87 at 128x768, 1.00 at 64x16.
Parameters: `X[rows, cols], gamma[cols], beta[cols], Y[rows, cols]` (a residual `R[rows, cols]` after X).
"""
from __future__ import annotations

from functools import lru_cache

from pruneaug.codegen.cpu_kernels import KERNEL_CACHE_SIZE, outer_loop, row_sum_macro

ACCUMULATORS = 4  # vectors of partial sums per row: independent add chains (one vector: latency-bound)


@lru_cache(maxsize=KERNEL_CACHE_SIZE)
def layer_norm_primfunc(rows: int, cols: int, epsilon: float, lanes: int, parallel: int, residual: bool = False,
                        centred: bool = True):
    """`Y = (X - mean) / sqrt(var + epsilon) * gamma + beta` along each row of `X[rows, cols]`, the rows
    shared out to the thread pool where `parallel` (the caller's `threads.worth_parallel`). With
    `residual`, the rows are `X + R` (a residual add before the norm, read where X is read: one call
    and one pass over the rows fewer; parameters `X, R, gamma, beta, Y`). Not `centred`, it is an RMS norm
    (T5's, LLaMA's): `Y = X / sqrt(mean(X^2) + epsilon) * gamma + beta`, no mean and so one pass fewer.

    Memoised: parsing the TVMScript takes about 0.1 s, and BERT-base has 25 layer norms of one shape
    (the rewrite took 2.6 s unmemoised)."""
    from tvm.script import tirx as T

    outer = outer_loop(parallel)
    sum_row = row_sum_macro(cols, lanes, ACCUMULATORS)
    inv_cols = 1.0 / cols

    def load(X, R, r, c):  # TVMScript evaluates these Python calls while parsing
        return X[r, c] + R[r, c] if residual else X[r, c]

    def centre(x, stat):
        return x - stat[0] if centred else x

    # pass 0 sums x into the mean, pass 1 (x - mean)^2 into 1 / standard deviation (the unrolled pass
    # index folds the selects away); an RMS norm runs pass 1 alone, of x^2
    def term(args, c):
        X, R, r, p, stat = args
        x = load(X, R, r, c)
        return T.if_then_else(p == 0, x, centre(x, stat) * centre(x, stat))

    def finish(p, total):
        return T.if_then_else(p == 0, total * T.float32(inv_cols), T.rsqrt(total * T.float32(inv_cols) + T.float32(epsilon)))

    @T.macro
    def normalise(X, R, gamma, beta, Y):
        # opaque (pattern 8): nothing is fused into it; TVM's analyses want a root block
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        with T.sblock("root"):
            for r in outer(rows):
                acc = T.alloc_buffer((ACCUMULATORS, lanes), "float32", scope="global")
                stat = T.alloc_buffer((2,), "float32", scope="global")  # mean, then 1 / standard deviation
                for p in T.unroll(0 if centred else 1, 2):
                    sum_row(acc, stat, p, term, (X, R, r, p, stat))
                    stat[p] = finish(p, stat[p])
                for j in range(cols // lanes):
                    for v in T.vectorized(lanes):
                        Y[r, j * lanes + v] = centre(load(X, R, r, j * lanes + v), stat) * stat[1] \
                            * gamma[j * lanes + v] + beta[j * lanes + v]
                for j in range(cols % lanes):
                    Y[r, cols // lanes * lanes + j] = centre(load(X, R, r, cols // lanes * lanes + j), stat) \
                        * stat[1] * gamma[cols // lanes * lanes + j] + beta[cols // lanes * lanes + j]

    if residual:
        @T.prim_func(s_tir=True)
        def residual_layer_norm(X: T.Buffer((rows, cols), "float32"), R: T.Buffer((rows, cols), "float32"),
                                gamma: T.Buffer((cols,), "float32"), beta: T.Buffer((cols,), "float32"),
                                Y: T.Buffer((rows, cols), "float32")):
            normalise(X, R, gamma, beta, Y)

        return residual_layer_norm

    @T.prim_func(s_tir=True)
    def layer_norm(X: T.Buffer((rows, cols), "float32"), gamma: T.Buffer((cols,), "float32"),
                   beta: T.Buffer((cols,), "float32"), Y: T.Buffer((rows, cols), "float32")):
        normalise(X, X, gamma, beta, Y)

    return layer_norm
