"""The mean over a tensor's trailing axes for CPUs (a global average pool as ReduceMean: squeeze-and-excite
blocks, classifier heads), as one TIR function with vector accumulators.

Why not TVM's own: DLight's CPU `Reduction` rule sums each row as one scalar chain, as it does a layer
norm's (`norm.py`): EfficientNet-B0's squeeze-and-excite means (rows of up to 112x112 pixels) took 6-9% of
its compiled function at 70% sparsity. Here each row is summed into up to `norm.ACCUMULATORS` vectors of
partial sums, added into one vector, then its lanes (`tools/bench_kernels.py --part mean`: 6-11x faster
than TVM's from 14x14 to 112x112 maps).
Parameters: `X[...]` (rows x cols elements, in its own shape), `Y[...]` (rows elements, in its own shape).
"""
from __future__ import annotations

import math
from functools import lru_cache

from pruneaug.codegen.cpu_kernels import KERNEL_CACHE_SIZE, outer_loop, row_sum_macro
from pruneaug.codegen.norm import ACCUMULATORS


@lru_cache(maxsize=KERNEL_CACHE_SIZE)
def row_mean_primfunc(x_shape: tuple[int, ...], y_shape: tuple[int, ...], lanes: int, parallel: int):
    """`Y = mean(X)` over X's trailing axes that `Y` does not keep (rows: the product of `y_shape`), the rows
    shared out to the thread pool where `parallel` (the caller's `threads.worth_parallel`)."""
    from tvm.script import tirx as T

    rows = math.prod(y_shape)
    cols = math.prod(x_shape) // rows
    outer = outer_loop(parallel)
    accumulators = max(1, min(ACCUMULATORS, cols // lanes))  # a 7x7 map's 49 columns: 3 vectors of 16, not 0 of 64
    sum_row = row_sum_macro(cols, lanes, accumulators)
    inv_cols = 1.0 / cols

    def element(args, c):  # TVMScript evaluates this Python call while parsing
        Xf, r = args
        return Xf[r * cols + c]

    @T.prim_func(s_tir=True)
    def row_mean(X: T.Buffer(x_shape, "float32"), Y: T.Buffer(y_shape, "float32")):
        # opaque (pattern 8): nothing is fused into it; TVM's analyses want a root block
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        with T.sblock("root"):
            Xf = T.decl_buffer((rows * cols,), "float32", data=X.data)
            Yf = T.decl_buffer((rows,), "float32", data=Y.data)
            for r in outer(rows):
                acc = T.alloc_buffer((accumulators, lanes), "float32", scope="global")
                total = T.alloc_buffer((1,), "float32", scope="global")
                sum_row(acc, total, 0, element, (Xf, r))
                Yf[r] = total[0] * T.float32(inv_cols)

    return row_mean
