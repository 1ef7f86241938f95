"""Block-sparse Conv2d kernels against onnxruntime's Conv on the same (pruned) dense weight."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from devices import requires_cuda_gpu
from reference import activate

from pruneaug.codegen.bsr import bsr_conv2d_kernel, compile_kernel, kernel_arguments, random_bsr_weight
from pruneaug.codegen.schedule import conv_schedule, kernel_schedule
from pruneaug.cost_model.targets import resolve_target
from pruneaug.errors import CodegenError

tvm = pytest.importorskip("tvm")

X86 = resolve_target("x86")


def _ort_conv(x, w4, bias, strides, pads, dilations) -> np.ndarray:
    inputs = ["x", "W"] + (["B"] if bias is not None else [])
    inits = [numpy_helper.from_array(w4, "W")] + ([numpy_helper.from_array(bias, "B")] if bias is not None else [])
    node = helper.make_node("Conv", inputs, ["y"], strides=list(strides), pads=list(pads),
                            dilations=list(dilations))
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 17)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


CASES = [
    # x_shape, Cout, kernel, strides, pads (t, l, b, r), dilations, block, density, bias
    ((1, 16, 7, 7), 8, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), (8, 1), 0.3, True),     # 1x1 on channels, ragged tile
    ((2, 8, 8, 8), 12, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), (4, 4), 0.5, False),   # 1x1, N=2, read in place
    ((1, 6, 9, 10), 5, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), (1, 1), 0.7, True),    # strided 1x1
    ((1, 8, 10, 12), 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (4, 4), 0.5, True),  # 3x3 same padding
    ((1, 4, 13, 11), 5, (3, 3), (2, 2), (1, 0, 2, 1), (2, 1), (1, 1), 0.6, False),  # asym pads, stride, dilation
    ((2, 6, 9, 7), 10, (1, 3), (2, 1), (0, 2, 1, 0), (1, 2), (3, 2), 0.4, True),    # 1x3, ragged blocks
    ((1, 3, 6, 6), 7, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), (8, 8), 1.0, True),     # unpadded 3x3, dense
    ((1, 5, 5, 5), 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (2, 2), 0.0, True),     # nothing kept: bias only
    # small maps, the channel-vectorised layout's own tiles:
    ((2, 16, 8, 8), 20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (8, 8), 0.3, True),   # 8x8 map, N=2, ragged out
    ((1, 4, 7, 3), 20, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), (16, 4), 0.5, True),   # 5x1 out: 3x1 tiles, ragged h
    ((1, 8, 9, 9), 20, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), (16, 4), 0.4, False),  # 7x7 out: 1x4 tiles, ragged w
    ((1, 6, 14, 14), 16, (3, 3), (2, 2), (1, 1, 1, 1), (2, 2), (16, 2), 0.5, True),  # strided, dilated
]


def _check_conv(case, layout: str | None = None, activation: str | None = None, target=X86):
    """Build the case's kernel for `target`, run it here and compare with onnxruntime; returns the kernel."""
    x_shape, out_c, khw, strides, pads, dilations, block, density, with_bias = case
    rng = np.random.default_rng(0)
    weight = random_bsr_weight(out_c, x_shape[1] * khw[0] * khw[1], block, density)
    bias = rng.standard_normal(out_c).astype(np.float32) if with_bias else None
    x = rng.standard_normal(x_shape).astype(np.float32)
    kernel = bsr_conv2d_kernel(target, x_shape, weight, khw, strides, pads, dilations, bias,
                               activation=activation, layout=layout)
    expected = _ort_conv(x, weight.to_dense().reshape(out_c, x_shape[1], *khw), bias, strides, pads, dilations)
    expected = activate(expected, activation)
    assert [int(d) for d in kernel.primfunc.params[-1].shape] == list(expected.shape)
    args = kernel_arguments(kernel, x, tvm.cpu())
    compile_kernel(kernel, target)[kernel.name](*args)
    np.testing.assert_allclose(args[-1].numpy(), expected, rtol=1e-4, atol=1e-4)
    return kernel


@pytest.mark.parametrize("layout", ["pixvec", "chanvec"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bsr_conv_matches_onnxruntime(case, layout):
    """Both CPU layouts, whichever the schedule would pick, on every stride, pad and dilation."""
    _check_conv(case, layout)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[8], CASES[10]], ids=["1x1", "3x3", "8x8map", "ragged_h"])
@pytest.mark.parametrize("activation", ["relu", "relu6", "hardswish", "gelu"])
def test_activation_epilogues_match_onnxruntime(case, activation):
    _check_conv(case, activation=activation)


@pytest.mark.parametrize("out_hw,block,layout,simd_bytes", [  # 32 bytes: AVX2, 64: AVX-512
    ((8, 8), (8, 8), "chanvec", 32),     # a row is one AVX2 vector: vectorise over the block's channels
    ((14, 14), (16, 16), "chanvec", 32),
    ((56, 56), (16, 16), "chanvec", 32),
    ((8, 8), (4, 4), "pixvec", 32),      # the block's rows do not fill a vector
    ((1, 3136), (8, 8), "pixvec", 32),   # 1x1 conv flattened to one long row
    ((1, 196), (8, 8), "chanvec", 32),   # ... to one short row (14x14)
    ((1, 3136), (16, 16), "chanvec", 64),  # AVX-512: any flattened row over channels
    ((1, 3136), (8, 8), "pixvec", 64),     # ... unless the block's rows do not fill a vector
])
def test_short_rows_are_vectorised_over_channels(out_hw, block, layout, simd_bytes):
    """The kernel is built with the schedule's tiles (the cost model reads the same)."""
    host = dataclasses.replace(resolve_target("x86"), simd_bytes=simd_bytes)
    schedule = conv_schedule(host, out_hw, block, pixels=1 << 20, nnz_blocks=1 << 10)
    assert schedule.layout == layout
    lanes = simd_bytes // 4
    if layout == "chanvec":
        assert schedule.tiles["tile_h"] * schedule.tiles["tile_w"] * -(-block[0] // lanes) <= 8
        weight = random_bsr_weight(block[0] * 2, 4 * 9, block, 0.5)
        kernel = bsr_conv2d_kernel(host, (1, 4, out_hw[0] + 2, out_hw[1] + 2), weight, (3, 3), (1, 1),
                                   (0, 0, 0, 0), (1, 1))
        acc = re.search(r"acc = T.alloc_buffer\(\((\d+), (\d+), (\d+)\)", kernel.primfunc.script()).groups()
        assert tuple(int(d) for d in acc) == (schedule.tiles["tile_h"], schedule.tiles["tile_w"], block[0])


@pytest.mark.parametrize("out_w, tile", [(8, 8), (5, 8), (3, 4), (16, 16), (20, 32)])
def test_a_pixvec_row_shorter_than_a_register_takes_the_power_of_two_lanes_that_cover_it(out_w, tile):
    """On a 16-lane host an 8-pixel row was one 16-lane vector: half its FMAs on lanes past the row, its
    store lane by lane. The kernel at that tile still matches onnxruntime."""
    avx512 = dataclasses.replace(resolve_target("x86"), simd_bytes=64)
    schedule = conv_schedule(avx512, (4, out_w), (1, 1), pixels=4 * out_w, nnz_blocks=64)
    assert schedule.layout == "pixvec" and schedule.tiles["tile"] == tile
    case = ((1, 4, 4, out_w), 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (1, 1), 0.3, False)
    assert f"T.vectorized({tile})" in _check_conv(case, target=avx512).primfunc.script()


@pytest.mark.parametrize("x_shape,out_c,parallel", [
    ((1, 8, 8, 8), 16, 0),      # 8x8 map, 16 -> 16 channels at batch 1: 37k multiply-adds, serial
    ((1, 64, 14, 14), 64, 1),   # 14x14, 64 -> 64: 3.6M, on the thread pool
])
def test_small_convs_run_on_the_calling_thread(x_shape, out_c, parallel):
    """The conv decides as the matmul kernel the cost model times for it does (m = pixels), padding
    copy included."""
    two_cores = dataclasses.replace(resolve_target("x86"), cores=2, simd_bytes=32)
    kernel = _check_conv((x_shape, out_c, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (8, 8), 0.5, False), target=two_cores)
    nnz_blocks = random_bsr_weight(out_c, x_shape[1] * 9, (8, 8), 0.5).nnz_blocks  # _check_conv's (seeded) weight
    pixels = x_shape[2] * x_shape[3]
    assert kernel_schedule(two_cores, pixels, out_c, x_shape[1] * 9, (8, 8), nnz_blocks).tiles["parallel"] == parallel
    assert kernel.primfunc.script().count("T.parallel") == 2 * parallel  # the padded copy and the product


def test_conv_weight_shape_mismatch_is_a_codegen_error():
    weight = random_bsr_weight(8, 20, (4, 4), 0.5)
    with pytest.raises(CodegenError, match=r"does not match input channels 3 x kernel 3x3"):
        bsr_conv2d_kernel(X86, (1, 3, 8, 8), weight, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))


def test_unknown_activation_is_a_codegen_error():
    weight = random_bsr_weight(8, 27, (4, 4), 0.5)
    with pytest.raises(CodegenError, match="activation 'tanh' is not supported by the block-sparse kernels"):
        bsr_conv2d_kernel(X86, (1, 3, 8, 8), weight, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), activation="tanh")


def test_conv_unsupported_block_is_a_codegen_error():
    weight = random_bsr_weight(8, 27, (1, 1), 0.5)
    object.__setattr__(weight, "block", (1, 200))
    with pytest.raises(CodegenError, match="block 1x200 is not supported on target x86"):
        bsr_conv2d_kernel(X86, (1, 3, 8, 8), weight, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))


def test_conv_compiles_for_arm64(tmp_path):
    arm = resolve_target("arm64")
    weight = random_bsr_weight(16, 8 * 9, (4, 4), 0.5)
    kernel = bsr_conv2d_kernel(arm, (1, 8, 10, 10), weight, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    executable = tvm.compile(tvm.IRModule({kernel.name: kernel.primfunc}), target=arm.tvm())
    executable.export_library(str(tmp_path / "conv.tar"))
    assert (tmp_path / "conv.tar").stat().st_size > 0


@pytest.mark.parametrize("layout", ["cuda", "cuda_split"])
def test_conv_builds_for_cuda(layout):
    cuda = resolve_target("cuda")
    weight = random_bsr_weight(10, 6 * 3, (3, 2), 0.4)
    kernel = bsr_conv2d_kernel(cuda, (2, 6, 9, 7), weight, (1, 3), (2, 1), (0, 2, 1, 0), (1, 2), name="conv_cuda",
                               activation="relu", layout=layout)
    executable = tvm.compile(tvm.IRModule({kernel.name: kernel.primfunc}), target=cuda.tvm())
    source = executable.mod.imports[0].inspect_source("cuda")
    assert "conv_cuda" in source and "max(" in source  # the ReLU epilogue


def test_cuda_split_conv_reads_each_im2col_entry_once_for_all_rows_of_its_block():
    # emitted inside the sum over the block's rows, the bounds-checked read came out r times per column
    cuda = resolve_target("cuda:sm_90")
    weight = random_bsr_weight(64, 32 * 9, (16, 32), 1.0)
    kernel = bsr_conv2d_kernel(cuda, (1, 32, 8, 8), weight, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), layout="cuda_split")
    executable = tvm.compile(tvm.IRModule({kernel.name: kernel.primfunc}), target=cuda.tvm())
    assert executable.mod.imports[0].inspect_source("cuda").count("X_ptr[") == 1


@pytest.mark.parametrize("out_c,pixels,block,kernel_hw,layout", [
    (64, 64, (1, 1), (3, 3), "cuda_split"), (8, 4096, (1, 1), (3, 3), "cuda_split"),  # too few threads to fill it
    (64, 32 * 64, (1, 1), (3, 3), "cuda"), (64, 32 * 64, (4, 4), (3, 3), "cuda_split"),  # rows sharing a gather
    (64, 3136, (16, 16), (1, 1), "cuda"), (64, 3136, (32, 32), (1, 1), "cuda_split"),  # a 1x1 conv gathers nothing
])
def test_cuda_conv_splits_columns_over_a_warp_where_threads_cannot_fill_the_gpu_or_blocks_share_reads(
        out_c, pixels, block, kernel_hw, layout):
    # one thread per (output channel, pixel) gives an H100's 132 SMs 8 warps each from 33792 threads
    cuda = resolve_target("cuda:sm_90")
    assert conv_schedule(cuda, (8, 8), block, pixels, 40, out_c=out_c, kernel_hw=kernel_hw).layout == layout


@requires_cuda_gpu
@pytest.mark.parametrize("case,activation", [(CASES[3], None), (CASES[4], None), (CASES[5], "relu"), (CASES[8], "relu"),
                                             (CASES[9], None)])
@pytest.mark.parametrize("layout", ["cuda", "cuda_split"])
def test_cuda_conv_matches_onnxruntime(case, activation, layout):
    x_shape, out_c, khw, strides, pads, dilations, block, density, with_bias = case
    cuda = resolve_target("cuda")
    rng = np.random.default_rng(0)
    weight = random_bsr_weight(out_c, x_shape[1] * khw[0] * khw[1], block, density)
    bias = rng.standard_normal(out_c).astype(np.float32) if with_bias else None
    x = rng.standard_normal(x_shape).astype(np.float32)
    kernel = bsr_conv2d_kernel(cuda, x_shape, weight, khw, strides, pads, dilations, bias, activation=activation,
                               layout=layout)
    expected = _ort_conv(x, weight.to_dense().reshape(out_c, x_shape[1], *khw), bias, strides, pads, dilations)
    expected = activate(expected, activation)
    args = kernel_arguments(kernel, x, tvm.cuda(0))
    compile_kernel(kernel, cuda)[kernel.name](*args)
    np.testing.assert_allclose(args[-1].numpy(), expected, rtol=1e-4, atol=1e-4)
