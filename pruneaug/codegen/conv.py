"""Block-sparse Conv2d (group 1) as a BSR product over an implicit im2col (CPU here; CUDA in cuda_kernels).

The canonical weight is `W[Cout, C*kh*kw]` (im2col order: cin major, then kh, kw). Column `j` of
the im2col matrix at output pixel `(ho, wo)` is `Xp[cin, ho*sh + dy*dh, wo*sw + dx*dw]` of the
padded input `Xp`: one flat offset per column (`col_offsets`, a kernel constant) plus a per-pixel
base. So nothing but the padded input is materialised (and not even that for an unpadded conv whose
rows the tiles divide), and the kernel is the m-vectorised BSR product with NCHW output for free:
vectorised over a tile of `wo` within an output row, `acc[row_group, tile] += data[b, row, k] *
Xp[off[col] + base : ... : sw]`. A 1x1, stride-1, unpadded conv is one row of `H*W` pixels.
Parameters: `X[N, C, H, W], data[nnzb, r, c], indices, indptr, col_offsets, bias, Y[N, Cout, Ho, Wo]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm.script import tirx as T

from pruneaug.codegen import cuda_kernels
from pruneaug.codegen.bsr_format import BSRWeight, nonempty_blocks, padded_bias
from pruneaug.cost_model.targets import TargetProfile
from pruneaug.errors import CodegenError

MAX_TILE_VECTORS = 4  # vectors of pixels per accumulator row


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


def _tiles(out_w: int, lanes: int, r: int) -> tuple[int, int]:
    """(row_group, pixel tile): at most 12 accumulator registers, tiles that waste little of a row."""
    vectors = -(-out_w // lanes)
    tiles = -(-vectors // MAX_TILE_VECTORS)
    tile_vectors = -(-vectors // tiles)
    row_group = max(g for g in (4, 3, 2, 1) if r % g == 0 and g * tile_vectors <= 12)
    return row_group, tile_vectors * lanes


def conv_primfunc(x_shape, out_c: int, geo: ConvGeometry, block: tuple[int, int], nnzb: int,
                  columns: int, lanes: int):
    """The CPU PrimFunc: a padded copy of X unless it can be read in place, then per (image, block
    row, output row) task the `row_group x tile` register tiles over the kept blocks."""
    n, c, h, w = x_shape
    r, cb = block
    block_rows = -(-out_c // r)
    row_group, tile = _tiles(geo.out_w, lanes, r)
    groups = r // row_group
    w_tiles = -(-geo.out_w // tile)
    ragged_w = w_tiles * tile != geo.out_w
    ragged_out = out_c % r != 0
    direct = geo.direct and not ragged_w
    flattened = geo.padded_w == h * w and geo.padded_h == 1 and h > 1
    image = c * geo.padded_h * geo.padded_w
    image_pad = image + (w_tiles * tile - geo.out_w) * geo.stride_w + 1  # reads past a row's end
    oh, ow, sh, sw = geo.out_h, geo.out_w, geo.stride_h, geo.stride_w
    hp, wp, top, left = geo.padded_h, geo.padded_w, geo.pad_top, geo.pad_left
    out_shape = (n, out_c, *geo.y_hw)
    y_flat = n * out_c * oh * ow

    @T.prim_func
    def kernel(X: T.Buffer((n, c, h, w), "float32"), data: T.Buffer((nnzb, r, cb), "float32"),
               indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((block_rows + 1,), "int32"),
               col_offsets: T.Buffer((columns,), "int32"), bias: T.Buffer((block_rows * r,), "float32"),
               Y: T.Buffer(out_shape, "float32")):
        T.func_attr({"tir.noalias": True})
        Yf = T.decl_buffer((y_flat,), "float32", data=Y.data)
        if direct:
            Xp = T.decl_buffer((n * image,), "float32", data=X.data)
        else:
            Xp = T.alloc_buffer((n * image_pad,), "float32", scope="global")
            for nc in T.parallel(n * c):
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
        for task in T.parallel(n * block_rows * oh):
            for g in range(groups):
                for wt in range(w_tiles):
                    acc = T.alloc_buffer((row_group, tile), "float32", scope="global")
                    for rr in T.unroll(row_group):
                        for px in T.vectorized(tile):
                            acc[rr, px] = T.float32(0)
                    for b in range(indptr[task // oh % block_rows], indptr[task // oh % block_rows + 1]):
                        for k in T.unroll(cb):
                            for rr in T.unroll(row_group):
                                for px in T.vectorized(tile):
                                    acc[rr, px] = acc[rr, px] + data[b, g * row_group + rr, k] * Xp[
                                        task // (oh * block_rows) * (image if direct else image_pad)
                                        + col_offsets[indices[b] * cb + k]
                                        + task % oh * sh * wp + (wt * tile + px) * sw]
                    for rr in T.unroll(row_group):
                        if not ragged_out or (task // oh % block_rows) * r + g * row_group + rr < out_c:
                            if not ragged_w or wt < w_tiles - 1:
                                for px in T.vectorized(tile):
                                    Yf[((task // (oh * block_rows) * out_c + (task // oh % block_rows) * r + g * row_group + rr) * oh + task % oh) * ow + wt * tile + px] = (
                                        acc[rr, px] + bias[(task // oh % block_rows) * r + g * row_group + rr])
                            else:
                                stage = T.alloc_buffer((tile,), "float32", scope="global")
                                for px in T.vectorized(tile):
                                    stage[px] = acc[rr, px] + bias[(task // oh % block_rows) * r + g * row_group + rr]
                                for px in range(ow - wt * tile):
                                    Yf[((task // (oh * block_rows) * out_c + (task // oh % block_rows) * r + g * row_group + rr) * oh + task % oh) * ow + wt * tile + px] = stage[px]

    return kernel


def bsr_conv2d(target: TargetProfile, x_shape, weight: BSRWeight, kernel_hw, strides, pads, dilations,
               bias) -> tuple:
    """PrimFunc and constants of the conv (for `bsr.bsr_conv2d_kernel`, which checks the block)."""
    n, c, h, w = x_shape
    out_c, cols = weight.shape
    kh, kw = kernel_hw
    if cols != c * kh * kw:
        raise CodegenError(f"conv weight {weight.shape} does not match input channels {c} x kernel {kh}x{kw}")
    geo = conv_geometry(x_shape, kernel_hw, strides, pads, dilations)
    data, indices = nonempty_blocks(weight)
    bias_padded = padded_bias(bias, out_c, weight.block_rows * weight.block[0])
    if target.kind == "cuda":
        func = cuda_kernels.bsr_conv2d(tuple(x_shape), out_c, geo.y_hw, weight.block, len(indices),
                                       kernel_hw, strides, pads, dilations)
        return func, [np.ascontiguousarray(data, np.float32), indices.astype(np.int32),
                      weight.indptr.astype(np.int32), bias_padded]
    columns = weight.block_cols * weight.block[1]
    func = conv_primfunc(tuple(x_shape), out_c, geo, weight.block, len(indices), columns,
                         max(1, target.simd_bytes // 4))
    return func, [np.ascontiguousarray(data, np.float32), indices.astype(np.int32),
                  weight.indptr.astype(np.int32), column_offsets(geo, kernel_hw, dilations, columns), bias_padded]
