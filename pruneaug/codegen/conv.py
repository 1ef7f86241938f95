"""Block-sparse Conv2d (group 1) as a BSR product over an implicit im2col (CPU here; CUDA in cuda_kernels).

The canonical weight is `W[Cout, C*kh*kw]` (im2col order: cin major, then kh, kw). Column `j` of
the im2col matrix at output pixel `(ho, wo)` is `Xp[cin, ho*sh + dy*dh, wo*sw + dx*dw]` of the
padded input `Xp`: one flat offset per column (`col_offsets`, a kernel constant) plus a per-pixel
base. So nothing but the padded input is materialised (and not even that for an unpadded conv whose
rows the tiles divide). Two layouts, chosen by `schedule.conv_schedule`:

* "pixvec": vectorised over a tile of `wo` within an output row, `acc[row_group, tile_h, tile] +=
  data[b, row, k] * Xp[off[col] + base(row y) : ... : sw]` for `tile_h` output rows at once (they
  share each weight load and are independent FMA chains: a short map's row is one vector, and with
  1x1 blocks one row per task waited on one accumulator), data `[nnzb, r, c]`; NCHW output rows
  stored as they are.
* "chanvec": vectorised over the `r` output channels of a block, `acc[tile_h, tile_w, r] +=
  Xp[off[col] + base(pixel)] * data[b, k, :]`, data prepacked `[nnzb, c, r]`: on short output rows
  (8x8, 14x14 maps) a row is one or two vectors, so "pixvec" has few pixels per kept weight to reuse
  it on, while here each weight vector serves `tile_h * tile_w` pixels; the tile is stored transposed.

A 1x1, stride-1, unpadded conv is one row of `H*W` pixels. The bias and an optional activation are
applied as the accumulators are stored.
Parameters: `X[N, C, H, W], data, indices, indptr, col_offsets, bias, Y[N, Cout, Ho, Wo]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from tvm.script import tirx as T

from pruneaug.codegen import cuda_kernels
from pruneaug.codegen.bsr_format import BSRWeight, nonempty_blocks, padded_bias
from pruneaug.codegen.cpu_kernels import KERNEL_CACHE_SIZE, activation_epilogue, kept_block_count, outer_loop
from pruneaug.codegen.schedule import Schedule, conv_schedule
from pruneaug.cost_model.targets import TargetProfile
from pruneaug.errors import CodegenError

@dataclass(frozen=True)
class ConvGeometry:
    """Output size and the padded input's layout, with a 1x1 stride-1 unpadded conv flattened."""

    n: int
    channels: int
    out_h: int
    out_w: int  # per "row" of pixels: H*W when flattened
    stride_h: int
    stride_w: int
    pad_top: int
    pad_left: int
    padded_h: int
    padded_w: int
    direct: bool  # X can be read in place (no padding)
    y_hw: tuple[int, int]  # the real (Ho, Wo) of Y, also when the pixels are flattened


def conv_geometry(x_shape, kernel_hw, strides, pads, dilations) -> ConvGeometry:
    """ONNX Conv arithmetic (pads top, left, bottom, right); raises CodegenError for an empty output."""
    n, c, h, w = x_shape
    kh, kw = kernel_hw
    (sh, sw), (dh, dw) = strides, dilations
    top, left, bottom, right = pads
    out_h = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    if out_h <= 0 or out_w <= 0:
        raise CodegenError(f"conv of input {tuple(x_shape)} with kernel {kh}x{kw}, pads {pads}: empty output")
    if (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and not any(pads):
        return ConvGeometry(n, c, 1, h * w, 1, 1, 0, 0, 1, h * w, True, (out_h, out_w))
    return ConvGeometry(n, c, out_h, out_w, sh, sw, top, left, h + top + bottom, w + left + right,
                        not any(pads), (out_h, out_w))


def column_offsets(geo: ConvGeometry, kernel_hw, dilations, columns: int) -> np.ndarray:
    """Flat offset in one padded image of every im2col column (0 for the zero-padded columns)."""
    kh, kw = kernel_hw
    dh, dw = dilations
    j = np.arange(geo.channels * kh * kw)
    cin, dy, dx = j // (kh * kw), (j // kw) % kh, j % kw
    offsets = np.zeros(columns, np.int32)
    offsets[: len(j)] = cin * geo.padded_h * geo.padded_w + dy * dh * geo.padded_w + dx * dw
    return offsets


@lru_cache(maxsize=KERNEL_CACHE_SIZE)
def conv_primfunc(x_shape, out_c: int, geo: ConvGeometry, block: tuple[int, int], columns: int,
                  schedule: Schedule, activation: str | None = None):
    """The CPU PrimFunc: a padded copy of X unless it can be read in place, then the register tiles over
    the kept blocks of the schedule's layout (see the module docstring), the bias and `activation` applied
    as the tiles are stored."""
    n, c, h, w = x_shape
    r, cb = block
    block_rows = -(-out_c // r)
    nnzb = kept_block_count()
    ragged_out = out_c % r != 0
    chanvec = schedule.layout == "chanvec"
    assert schedule.layout in ("chanvec", "pixvec"), schedule
    act = activation_epilogue(activation)
    outer = outer_loop(schedule.tiles["parallel"])
    oh, ow, sh, sw = geo.out_h, geo.out_w, geo.stride_h, geo.stride_w
    hp, wp, top, left = geo.padded_h, geo.padded_w, geo.pad_top, geo.pad_left
    image = c * hp * wp
    if chanvec:
        tile_h, tile_w = schedule.tiles["tile_h"], schedule.tiles["tile_w"]
        h_tiles, w_tiles = -(-oh // tile_h), -(-ow // tile_w)
        ragged_h, ragged_w = h_tiles * tile_h != oh, w_tiles * tile_w != ow
        direct = geo.direct  # a tail tile reads the last pixel again (clamped), never past the image
        image_pad = image
        data_shape = (nnzb, cb, r)
    else:
        row_group, tile, tile_h = schedule.tiles["row_group"], schedule.tiles["tile"], schedule.tiles["tile_h"]
        groups = r // row_group
        h_tiles, w_tiles = -(-oh // tile_h), -(-ow // tile)
        ragged_h, ragged_w = h_tiles * tile_h != oh, w_tiles * tile != ow
        direct = geo.direct and not ragged_w
        image_pad = image if direct else image + (w_tiles * tile - ow) * sw + 1  # a tail tile reads past its row's end
        data_shape = (nnzb, r, cb)

    # index arithmetic of the tasks (block row, image, row of tile_h output rows), named (TVMScript
    # evaluates these Python calls while parsing)
    def block_row(task):
        return task // (n * h_tiles)

    def image_of(task):
        return task // h_tiles % n

    def out_y(task, ty):
        return task % h_tiles * tile_h + ty

    def out_channel(task, g, rr):  # pixvec: row rr of group g of the task's block row
        return block_row(task) * r + g * row_group + rr

    def out_row(task, g, rr, ty):  # pixvec: where that channel's output row ty starts in Y
        return ((image_of(task) * out_c + out_channel(task, g, rr)) * oh + out_y(task, ty)) * ow

    clamp_h = (lambda y: T.min(y, oh - 1)) if ragged_h else (lambda y: y)
    clamp_w = (lambda x: T.min(x, ow - 1)) if ragged_w else (lambda x: x)
    flattened = geo.padded_w == h * w and geo.padded_h == 1 and h > 1
    out_shape = (n, out_c, *geo.y_hw)
    y_flat = n * out_c * oh * ow

    @T.prim_func
    def kernel(X: T.Buffer((n, c, h, w), "float32"), data: T.Buffer(data_shape, "float32"),
               indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((block_rows + 1,), "int32"),
               col_offsets: T.Buffer((columns,), "int32"), bias: T.Buffer((block_rows * r,), "float32"),
               Y: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True})
        Yf = T.decl_buffer((y_flat,), "float32", data=Y.data)
        if direct:
            Xp = T.decl_buffer((n * image,), "float32", data=X.data)
        else:
            Xp = T.alloc_buffer((n * image_pad,), "float32", scope="global")
            for nc in outer(n * c):
                for y in range(hp):
                    for x in range(wp):
                        if flattened:
                            Xp[nc // c * image_pad + nc % c * hp * wp + x] = X[nc // c, nc % c, x // w, x % w]
                        else:
                            Xp[nc // c * image_pad + nc % c * hp * wp + y * wp + x] = T.if_then_else(
                                top <= y and y < top + h and left <= x and x < left + w,
                                X[nc // c, nc % c, T.min(T.max(y - top, 0), h - 1),
                                  T.min(T.max(x - left, 0), w - 1)],
                                T.float32(0))
                if nc % c == 0:
                    for z in range(image_pad - image):
                        Xp[nc // c * image_pad + image + z] = T.float32(0)
        if chanvec:
            # task = (block row, image, row of patches); a tile_h x tile_w patch of pixels times the block's r
            # channels. A thread's tasks are a contiguous range: mostly one block row, its weights kept in L1.
            for task in outer(block_rows * n * h_tiles):
                for wt in range(w_tiles):
                    acc = T.alloc_buffer((tile_h, tile_w, r), "float32", scope="global")
                    for ty in T.unroll(tile_h):
                        for tx in T.unroll(tile_w):
                            for rr in T.vectorized(r):
                                acc[ty, tx, rr] = T.float32(0)
                    for b in range(indptr[block_row(task)], indptr[block_row(task) + 1]):
                        for k in T.unroll(cb):
                            for ty in T.unroll(tile_h):
                                for tx in T.unroll(tile_w):
                                    for rr in T.vectorized(r):
                                        acc[ty, tx, rr] = acc[ty, tx, rr] + Xp[
                                            image_of(task) * image_pad + col_offsets[indices[b] * cb + k]
                                            + clamp_h(out_y(task, ty)) * sh * wp + clamp_w(wt * tile_w + tx) * sw
                                        ] * data[b, k, rr]
                    for ty in T.unroll(tile_h):
                        for tx in T.unroll(tile_w):
                            for rr in T.vectorized(r):  # bias and activation on the vectors, then transposed out
                                acc[ty, tx, rr] = act(acc[ty, tx, rr] + bias[block_row(task) * r + rr])
                    for rr in T.unroll(r):
                        for ty in T.unroll(tile_h):
                            for tx in T.unroll(tile_w):
                                if ((not ragged_out or block_row(task) * r + rr < out_c)
                                        and (not ragged_h or out_y(task, ty) < oh)
                                        and (not ragged_w or wt * tile_w + tx < ow)):
                                    Yf[((image_of(task) * out_c + block_row(task) * r + rr) * oh + out_y(task, ty)) * ow
                                       + wt * tile_w + tx] = acc[ty, tx, rr]
        else:
            # task = (block row, image, row of tile_h output rows), as chanvec's; the tile_h rows share each
            # weight load and are independent chains of FMAs (one row of a short map is one vector)
            for task in outer(block_rows * n * h_tiles):
                for g in range(groups):
                    for wt in range(w_tiles):
                        acc = T.alloc_buffer((row_group, tile_h, tile), "float32", scope="global")
                        for rr in T.unroll(row_group):
                            for ty in T.unroll(tile_h):
                                for px in T.vectorized(tile):
                                    acc[rr, ty, px] = T.float32(0)
                        for b in range(indptr[block_row(task)], indptr[block_row(task) + 1]):
                            for k in T.unroll(cb):
                                for rr in T.unroll(row_group):
                                    for ty in T.unroll(tile_h):
                                        for px in T.vectorized(tile):
                                            acc[rr, ty, px] = acc[rr, ty, px] + data[b, g * row_group + rr, k] * Xp[
                                                image_of(task) * image_pad + col_offsets[indices[b] * cb + k]
                                                + clamp_h(out_y(task, ty)) * sh * wp + (wt * tile + px) * sw]
                        for rr in T.unroll(row_group):
                            for ty in T.unroll(tile_h):
                                if ((not ragged_out or out_channel(task, g, rr) < out_c)
                                        and (not ragged_h or out_y(task, ty) < oh)):
                                    if not ragged_w or wt < w_tiles - 1:
                                        for px in T.vectorized(tile):
                                            Yf[out_row(task, g, rr, ty) + wt * tile + px] = act(
                                                acc[rr, ty, px] + bias[out_channel(task, g, rr)])
                                    else:
                                        stage = T.alloc_buffer((tile,), "float32", scope="global")
                                        for px in T.vectorized(tile):
                                            stage[px] = act(acc[rr, ty, px] + bias[out_channel(task, g, rr)])
                                        for px in range(ow - wt * tile):
                                            Yf[out_row(task, g, rr, ty) + wt * tile + px] = stage[px]

    return kernel


def bsr_conv2d(target: TargetProfile, x_shape, weight: BSRWeight, kernel_hw, strides, pads, dilations,
               bias, activation: str | None = None, layout: str | None = None) -> tuple:
    """PrimFunc and constants of the conv (for `bsr.bsr_conv2d_kernel`, which checks the block and the
    activation). `layout` overrides the schedule's layout ("pixvec" or "chanvec" on CPUs, "cuda" or
    "cuda_split" on CUDA; for benchmarks and tests)."""
    n, c, h, w = x_shape
    out_c, cols = weight.shape
    kh, kw = kernel_hw
    if cols != c * kh * kw:
        raise CodegenError(f"conv weight {weight.shape} does not match input channels {c} x kernel {kh}x{kw}")
    geo = conv_geometry(x_shape, kernel_hw, strides, pads, dilations)
    data, indices = nonempty_blocks(weight)
    bias_padded = padded_bias(bias, out_c, weight.block_rows * weight.block[0])
    pixels = n * geo.out_h * geo.out_w  # the rows of the im2col product, as the cost model counts them
    schedule = conv_schedule(target, (geo.out_h, geo.out_w), weight.block, pixels, weight.nnz_blocks,
                             layout=layout, out_c=out_c, kernel_hw=tuple(kernel_hw))
    if target.kind == "cuda":
        build = cuda_kernels.bsr_conv2d_split if schedule.layout == "cuda_split" else cuda_kernels.bsr_conv2d
        func = build(tuple(x_shape), out_c, geo.y_hw, weight.block, kernel_hw, strides, pads, dilations,
                     activation=activation, **schedule.tiles)
        return func, [np.ascontiguousarray(data, np.float32), indices.astype(np.int32),
                      weight.indptr.astype(np.int32), bias_padded]
    columns = weight.block_cols * weight.block[1]
    func = conv_primfunc(tuple(x_shape), out_c, geo, weight.block, columns, schedule, activation)
    if schedule.layout == "chanvec":
        data = data.transpose(0, 2, 1)  # [nnzb, c, r]: a block's rows (output channels) are contiguous
    return func, [np.ascontiguousarray(data, np.float32), indices.astype(np.int32),
                  weight.indptr.astype(np.int32), column_offsets(geo, kernel_hw, dilations, columns), bias_padded]
