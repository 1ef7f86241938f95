"""2-D max and average pooling (NCHW) for CPUs, one output row per task, vectorised along it by LLVM.

Why not TVM's own: its pool tests every tap against the padding, and LLVM keeps those branches
scalar. ResNet's stem max pool (3x3, stride 2, 64x112x112) took 250-270 µs alone at 2 threads on
an EPYC host (onnxruntime: 260-300 µs), this kernel 79-91 µs; GoogLeNet's 3x3 stride-1 max pool on
832x14x14 245 against 46 µs (`tools/bench_kernels.py --part pool`). ResNet-18 ran 2.6-3.4% faster.

Here the bounds are settled per output row, not per tap. A row's output columns fall into a left
border, an interior whose windows lie inside the input's columns, and a right border. The interior
is a loop with no bounds test, which LLVM vectorises; the borders run one output at a time.
- Max pooling reads each out-of-range tap at the nearest row or column inside the input. The
  window holds that element too (dilation 1, and every window overlaps the input), so the maximum
  is unchanged and no padded copy or -inf fill is needed.
- Average pooling leaves out the taps outside the input and divides by the taps inside
  (`count_include_pad` 0) or by the window's size (1).
Where the pool strides along rows, LLVM gathers the taps; on short interiors (14 or 7 output
columns: ResNet's and VGG's late pools) that ran 1.1-3x slower than TVM's kernel, so `relax_build`
leaves a strided pool whose interior is shorter than a vector to TVM.
Parameters: `X[n, c, h, w], Y[n, c, out_h, out_w]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pruneaug.codegen.cpu_kernels import KERNEL_CACHE_SIZE, outer_loop

KINDS = ("max", "avg")
# the taps of a window, unrolled: with the window's rows in a loop instead, the stem pool ran 2.4x slower;
# a larger window (a global pool written as MaxPool over a whole map) is left to TVM
MAX_TAPS = 64


@dataclass(frozen=True)
class PoolGeometry:
    """A pool's sizes (ONNX pads: top, left, bottom, right) and where its interior columns lie."""

    x_shape: tuple[int, int, int, int]
    kernel_hw: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    out_hw: tuple[int, int]

    @property
    def interior(self) -> tuple[int, int]:
        """The output columns `[first, end)` whose windows read only columns inside the input."""
        w, (kw, sw), left = self.x_shape[3], (self.kernel_hw[1], self.strides[1]), self.pads[1]
        first = -(-left // sw)
        end = max(first, min(self.out_hw[1], (w - kw + left) // sw + 1))
        return first, end

    def windows_overlap_input(self) -> bool:
        """Whether every window holds at least one element of the input (else a window of padding alone:
        the clamped read of max pooling would not be its maximum, nor is its average defined)."""
        for size, kernel, stride, pad, out in zip(self.x_shape[2:], self.kernel_hw, self.strides, self.pads[:2],
                                                  self.out_hw):
            if pad >= kernel or (out - 1) * stride - pad >= size:
                return False
        return True


@lru_cache(maxsize=KERNEL_CACHE_SIZE)
def pool2d_primfunc(kind: str, geo: PoolGeometry, parallel: int, count_include_pad: bool = False):
    """The pooling PrimFunc (see the module docstring); the output rows of all images and channels shared
    out to the thread pool where `parallel` (the caller's `threads.worth_parallel`)."""
    from tvm import tirx
    from tvm.script import tirx as T

    assert kind in KINDS, kind
    n, c, h, w = geo.x_shape
    kh, kw = geo.kernel_hw
    sh, sw = geo.strides
    top, left = geo.pads[:2]
    oh, ow = geo.out_hw
    first, end = geo.interior
    outer = outer_loop(parallel)
    is_max = kind == "max"
    fill = T.float32(-3.4028234663852886e38) if is_max else T.float32(0)

    # a task is one output row: (image, channel, oy) flattened, so that LLVM vectorises along the row (with
    # the rows of a channel in an inner loop, it unrolled them and vectorised across rows with gathers)
    def pixel(X, task, ky, col):  # TVMScript evaluates these Python calls while parsing
        return X[task // (c * oh), task // oh % c, T.min(T.max(task % oh * sh + ky - top, 0), h - 1), col]

    def row_inside(task, ky):
        return tirx.all(0 <= task % oh * sh + ky - top, task % oh * sh + ky - top < h)

    def col_inside(ox, kx):
        return tirx.all(0 <= ox * sw + kx - left, ox * sw + kx - left < w)

    def clamped_col(ox, kx):
        return T.min(T.max(ox * sw + kx - left, 0), w - 1)

    def tap(X, task, ky, ox, kx):  # max: the tap read clamped; avg: 0 outside the input
        if is_max:
            return pixel(X, task, ky, clamped_col(ox, kx))
        inside = tirx.all(row_inside(task, ky), col_inside(ox, kx))
        return T.if_then_else(inside, pixel(X, task, ky, clamped_col(ox, kx)), T.float32(0))

    def combine(acc, value):
        return T.max(acc, value) if is_max else acc + value

    def count(task, cols):  # avg: the taps that count, over `cols` columns of the window
        oy = task % oh
        return T.Cast("float32", (T.min(oy * sh - top + kh, h) - T.max(oy * sh - top, 0)) * cols)

    def result(acc, task, ox, interior):  # max: the maximum; avg: the sum over the taps that count
        if is_max:
            return acc
        if count_include_pad:
            return acc * T.float32(1.0 / (kh * kw))
        cols = kw if interior else T.min(ox * sw - left + kw, w) - T.max(ox * sw - left, 0)
        return acc / count(task, cols)

    @T.macro
    def border_output(X, Y, task, ox):
        acc = T.alloc_buffer((1,), "float32", scope="global")
        acc[0] = fill
        for ky in T.unroll(kh):
            for kx in T.unroll(kw):
                acc[0] = combine(acc[0], tap(X, task, ky, ox, kx))
        Y[task // (c * oh), task // oh % c, task % oh, ox] = result(acc[0], task, ox, False)

    @T.prim_func(s_tir=True)
    def pool(X: T.Buffer((n, c, h, w), "float32"), Y: T.Buffer((n, c, oh, ow), "float32")):
        # opaque (pattern 8): nothing is fused into it; TVM's analyses want a root block
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        with T.sblock("root"):
            for task in outer(n * c * oh):
                for ox in range(first):
                    border_output(X, Y, task, ox)
                for ox in range(first, end):  # no clamp on columns: LLVM vectorises this loop
                    acc = T.alloc_buffer((1,), "float32", scope="global")
                    acc[0] = fill
                    for ky in T.unroll(kh):
                        if is_max or row_inside(task, ky):
                            for kx in T.unroll(kw):
                                acc[0] = combine(acc[0], pixel(X, task, ky, ox * sw + kx - left))
                    Y[task // (c * oh), task // oh % c, task % oh, ox] = result(acc[0], task, ox, True)
                for ox in range(end, ow):
                    border_output(X, Y, task, ox)

    return pool
