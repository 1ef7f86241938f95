"""How one group-1 Conv runs: the kernels, in call order, that the artifact calls for it.

One function serves both the codegen (`relax_build` chains these kernels in the model) and the cost
model (`cost_model.measured` times exactly these kernels for a Conv layer): a Conv predicted from its
im2col matmul's kernel was predicted in the wrong order against other plans (the conv kernels' layouts
and a strided conv's phase split are not the matmul's), so what is timed must be what is built.

    >>> calls = conv_calls(resolve_target("x86"), (1, 32, 8, 8), w2d, (8, 8), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1))
    >>> [c.kernel.name for c in calls]
    ['stride_phases', 'bsr_conv2d']
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pruneaug.codegen import bsr, conv
from pruneaug.codegen.cpu_kernels import outer_loop
from pruneaug.codegen.schedule import conv_schedule
from pruneaug.codegen.threads import worth_parallel
from pruneaug.cost_model.targets import TargetProfile


@dataclass(frozen=True)
class ConvCall:
    """One kernel of a Conv and the shape of the input it reads (the Conv's X, or the previous call's output)."""

    kernel: bsr.Kernel
    x_shape: tuple[int, ...]

    @property
    def out_shape(self) -> list[int]:
        return [int(d) for d in self.kernel.primfunc.params[-1].shape]


def conv_calls(target: TargetProfile, x_shape: tuple[int, int, int, int], w2d: np.ndarray, block: tuple[int, int],
               kernel_hw: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int],
               dilations: tuple[int, int], bias: np.ndarray | None = None, activation: str | None = None,
               name: str = "bsr_conv2d") -> list[ConvCall]:
    """The kernels for `Conv(X[x_shape], W)` with the canonical `w2d[Cout, C*kh*kw]` in `block`s (the
    zero blocks dropped; `bsr.DENSE_BLOCK` for the dense conv), pads ONNX-ordered (top, left, bottom,
    right): the conv kernel itself, or on CPUs for a strided conv the stride-phase split, then a
    stride-1 conv over the phases (`StridePhases`), unless the conv reads X at the stride
    (`strided_in_place`)."""
    x_shape = tuple(int(d) for d in x_shape)
    if tuple(strides) == (1, 1) or target.kind == "cuda" or strided_in_place(target, x_shape, block, kernel_hw,
                                                                            strides, pads, dilations):
        kernel = bsr.bsr_conv2d_kernel(target, x_shape, bsr.to_bsr(w2d, block), tuple(kernel_hw), tuple(strides),
                                       tuple(pads), tuple(dilations), bias=bias, name=name, activation=activation)
        return [ConvCall(kernel, x_shape)]
    y_hw = list(conv.conv_geometry(x_shape, kernel_hw, strides, pads, dilations).y_hw)
    phases = StridePhases(x_shape, tuple(kernel_hw), tuple(strides), tuple(pads), tuple(dilations), y_hw)
    wide = np.zeros((w2d.shape[0], phases.columns), np.float32)
    wide[:, : w2d.shape[1]] = w2d
    kernel = bsr.bsr_conv2d_kernel(target, phases.shape, bsr.to_bsr(wide, block), phases.kernel_hw, (1, 1),
                                   (0, 0, 0, 0), (1, 1), bias=bias, name=name, activation=activation)
    split = phases.primfunc(target.cores).with_attr("global_symbol", "stride_phases")
    data, indices, indptr, offsets, padded_bias = kernel.constants
    kernel = bsr.Kernel(kernel.primfunc, kernel.name,
                        [data, indices, indptr, phases.column_offsets(len(offsets)), padded_bias])
    return [ConvCall(bsr.Kernel(split, "stride_phases", []), x_shape), ConvCall(kernel, phases.shape)]


def strided_in_place(target: TargetProfile, x_shape, block, kernel_hw, strides, pads, dilations) -> bool:
    """Whether a strided conv reads X (or its own padded copy of X) at the stride itself, with no phase
    split: where its layout loads X one scalar at a time ("chanvec"), so that a strided read costs what a
    contiguous one does. ResNet's 1x1 stride-2 shortcuts (56x56 to 14x14 inputs, 90% in 16x16 and 32x32
    blocks) ran 1.08-1.5x faster than split into the one phase they read and then convolved, and
    1.65-2.7x faster than split into all four phases as before (56x56, 28x28; scratch A/Bs). Padded 3x3
    and 7x7 stride-2 convs, 70% sparse in 16x1, 16x16 and 32x32 blocks, from 3x224x224 stems to 256x14x14
    inputs, ran 0.99-1.40x as fast over their padded copy as split (median 1.07x; the stems 1.05-1.40x;
    whole convs side by side, 2 threads). The "pixvec" layout reads a vector of pixels a load: at the
    stride that is a gather, 1.4-3.6x slower than the split (4x1 blocks)."""
    geo = conv.conv_geometry(x_shape, kernel_hw, strides, pads, dilations)
    pixels = x_shape[0] * geo.out_h * geo.out_w
    return conv_schedule(target, (geo.out_h, geo.out_w), block, pixels, 1).layout == "chanvec"


SPLIT_PIECE = 16  # output columns a stride-phase split copies at a time: one vector of them per phase


@dataclass(frozen=True)
class StridePhases:
    """A strided conv as a stride-1 conv over the input's stride phases (space-to-depth).

    The conv kernel vectorises along an output row and reads the input at the stride: a strided
    vector load is a gather, which made a stride-2 3x3 conv ~5x slower per kept block than a stride-1
    one. Split the padded input into its phases `Xp[n, c, y * sh + py, x * sw + px]`; tap `(dy, dx)` of
    channel `c` then reads phase `(dy*dh % sh, dx*dw % sw)` at `(dy*dh // sh, dx*dw // sw)`, a stride-1
    read. Only the phases some tap reads are made (`phase_counts`): a 1x1 strided conv reads one, and
    copying all `sh * sw` made its split 40% of the layer's time on 56x56 maps (ResNet's downsampling
    shortcuts). Phase `(iy, ix)` along the axes is `(iy*dh % sh, ix*dw % sw)`: `P[n, (iy * cx + ix) * C +
    c, y, x]` for `cx` phases along x. The kernel runs as a stride-1 unpadded conv of `kernel_hw` taps
    over P with the weight's columns kept in their order (the other columns zero, so no extra blocks):
    only its column offsets, a kernel constant, are replaced by where each original column lies in P.
    """

    x_shape: tuple[int, int, int, int]
    original_hw: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]
    out_hw: list[int]

    @property
    def kernel_hw(self) -> tuple[int, int]:
        return tuple((k - 1) * d // s + 1 for k, d, s in zip(self.original_hw, self.dilations, self.strides))

    @property
    def phase_hw(self) -> tuple[int, int]:
        return tuple(o + k - 1 for o, k in zip(self.out_hw, self.kernel_hw))

    @property
    def phase_counts(self) -> tuple[int, int]:
        """Phases along y and x that some tap reads: tap `d` reads phase `d*dil % stride`, which repeats
        every `stride // gcd(dil, stride)` taps, so phase index `d` modulo that period serves tap `d`."""
        return tuple(min(k, s // math.gcd(d, s)) for k, d, s in zip(self.original_hw, self.dilations, self.strides))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, c, _, _ = self.x_shape
        cy, cx = self.phase_counts
        return (n, cy * cx * c, *self.phase_hw)

    @property
    def columns(self) -> int:
        return self.shape[1] * self.kernel_hw[0] * self.kernel_hw[1]

    def column_offsets(self, length: int) -> np.ndarray:
        """Offset in one image of P of each original im2col column `(c, dy, dx)`; 0 for the padding columns."""
        _, c, _, _ = self.x_shape
        (kh, kw), (sh, sw), (dh, dw) = self.original_hw, self.strides, self.dilations
        hq, wq = self.phase_hw
        cy, cx = self.phase_counts
        j = np.arange(c * kh * kw)
        cin, dy, dx = j // (kh * kw), (j // kw) % kh, j % kw
        channel = ((dy % cy) * cx + dx % cx) * c + cin  # phase index = tap modulo the period (see phase_counts)
        offsets = np.zeros(length, np.int32)
        offsets[: len(j)] = channel * hq * wq + (dy * dh // sh) * wq + dx * dw // sw
        return offsets

    def primfunc(self, cores: int):
        """P from X[N, C, H, W], over images and channels in parallel where the copy is worth the thread
        pool (`threads.worth_parallel`: the CNN's 64x8x8 input split in parallel took 9.2 µs, twice its
        stride-1 conv at 95% sparsity). The rows of each phase that lie inside X are copied, vectorised by
        the width every phase column has inside X, and only what lies outside X is zeroed (the rows above
        and below it, the columns left and right of it in the rows inside): zeroing every phase whole
        first, a memset per phase, took 1.1-1.3x the time of the split on 28x28 to 224x224 inputs (scratch
        A/B side by side, 2 threads; alike on 8x8 and 14x14 inputs). One select per element, as
        this split was first written, took the CNN's 64x8x8 split 1.9 µs against 1.2 µs, and 1.3-1.9x
        the time on 28x28 to 112x112 inputs (a 1x1 stride-2 conv on a 2x8x16x16 input takes 0.9 µs
        against 0.5 µs). The input columns a piece of SPLIT_PIECE output columns reads are read once,
        whole, and every phase takes its columns from that copy: read from X at the stride, each phase's 4
        lanes were a scalar load and three inserts. Old against new, side by side: the CNN's 64x8x8 split
        1.27-1.32x faster, 56x56 to 224x224 inputs 1.14-1.27x, 256x14x14 1.0x, 128x28x28 0.93x (14-lane
        pieces). In pieces, not whole rows: a row vectorised whole is a vector as wide as the row; a Conv1d's
        1000-sample input took 14 s to compile so, and a 16000-sample one more than 100 s.

        (As Relax pad, reshape and transpose ops, TVM fuses them into one loop nest indexed by divisions.)"""
        import builtins

        from tvm import tirx
        from tvm.script import tirx as T

        n, c, h, w = self.x_shape
        (sh, sw), (dh, dw), (hq, wq) = self.strides, self.dilations, self.phase_hw
        (cy, cx), phases_c = self.phase_counts, self.shape[1]
        top, left = self.pads[0], self.pads[1]
        outer = outer_loop(worth_parallel(math.prod(self.shape), cores))

        def phase_y(iy):  # the phase (row offset in Xp) of P's iy-th phase along y; phase_x likewise
            return iy * dh % sh

        def phase_x(ix):
            return ix * dw % sw

        read_px = [phase_x(ix) for ix in range(cx)]  # the x phases made, in P's order
        inside = [_inside(left, px, sw, w, wq, builtins) for px in read_px]
        row = min(end - first for first, end in inside)  # columns every phase has inside X
        # Those are copied in pieces of `piece` columns: the input columns all phases' piece reads (`span`
        # from `lo`), read once, whole, then each phase's columns taken from that copy; the rest one by one.
        piece = max(min(row, SPLIT_PIECE), 1)
        lo = min(first * sw + px - left for px, (first, _) in zip(read_px, inside))
        span = max((first + piece - 1) * sw + px - left for px, (first, _) in zip(read_px, inside)) + 1 - lo

        def channel(nc, iy, ix):  # P's channel of phase (iy, ix) of input channel nc % c
            return (iy * cx + ix) * c + nc % c

        @T.prim_func(s_tir=True)
        def phases(X: T.Buffer((n, c, h, w), "float32"), P: T.Buffer(self.shape, "float32")):
            # opaque (pattern 8): FuseOps would fuse a producer in, which FuseTIR cannot (int32 shapes);
            # TVM's analyses want a root block
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            with T.sblock("root"):
                flat = T.decl_buffer((math.prod(self.shape),), "float32", data=P.data)
                for nc in outer(n * c):
                    for iy in T.serial(cy):
                        rows = T.meta_var(_inside(top, phase_y(iy), sh, h, hq, tirx))
                        for ix in T.unroll(cx):  # the phase's rows outside X: two runs of whole rows
                            for i in T.serial(rows[0] * wq):
                                flat[(nc // c * phases_c + channel(nc, iy, ix)) * hq * wq + i] = T.float32(0)
                            for i in T.serial((hq - rows[1]) * wq):
                                flat[(nc // c * phases_c + channel(nc, iy, ix)) * hq * wq + rows[1] * wq + i] = (
                                    T.float32(0))
                        for y in T.serial(rows[0], rows[1]):
                            line = T.alloc_buffer((span,), "float32", scope="local")
                            for x0 in T.serial(row // piece):
                                for i in T.vectorized(span):
                                    line[i] = X[nc // c, nc % c, y * sh + phase_y(iy) - top, lo + x0 * piece * sw + i]
                                for ix in T.unroll(cx):
                                    cols = T.meta_var(_inside(left, phase_x(ix), sw, w, wq, tirx))
                                    for x in T.vectorized(piece):
                                        P[nc // c, channel(nc, iy, ix), y, cols[0] + x0 * piece + x] = line[
                                            (cols[0] + x) * sw + phase_x(ix) - left - lo]
                            for ix in T.unroll(cx):
                                cols = T.meta_var(_inside(left, phase_x(ix), sw, w, wq, tirx))
                                for x in T.serial(cols[0] + row // piece * piece, cols[1]):
                                    P[nc // c, channel(nc, iy, ix), y, x] = X[
                                        nc // c, nc % c, y * sh + phase_y(iy) - top, x * sw + phase_x(ix) - left]
                                for x in T.serial(cols[0]):  # the row's columns outside X
                                    P[nc // c, channel(nc, iy, ix), y, x] = T.float32(0)
                                for x in T.serial(cols[1], wq):
                                    P[nc // c, channel(nc, iy, ix), y, x] = T.float32(0)

        return phases


def _inside(pad: int, phase, stride: int, extent: int, phase_extent: int, ops):
    """(first, end): the indices of one phase's axis whose input position `index * stride + phase - pad`
    lies inside the input's `extent`, as ints (`ops` = builtins) or as TIR expressions of a loop's
    phase (`ops` = tvm.tirx)."""
    first = ops.max((pad - phase + stride - 1) // stride, 0)
    return first, ops.max(ops.min((pad + extent - 1 - phase) // stride + 1, phase_extent), first)
