"""BSR format and matmul kernels against numpy, on x86 (run), arm64 and CUDA (build; run where possible)."""
from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices import requires_cuda_gpu
from reference import activate

from pruneaug.codegen.bsr import (
    BSRWeight,
    bsr_matmul_kernel,
    check_block_supported,
    compile_kernel,
    dense_matmul_kernel,
    kernel_arguments,
    random_bsr_weight,
    to_bsr,
)
from pruneaug.codegen.schedule import kernel_schedule
from pruneaug.cost_model.measured import Bench, device_clock
from pruneaug.cost_model.targets import resolve_target
from pruneaug.errors import CodegenError

tvm = pytest.importorskip("tvm")

X86 = resolve_target("x86")
BLOCKS = [(1, 1), (1, 4), (4, 1), (2, 3), (8, 8), (16, 16), (3, 16)]


def _run(kernel, x: np.ndarray) -> np.ndarray:
    module = compile_kernel(kernel, X86)
    args = kernel_arguments(kernel, x, tvm.cpu())
    module[kernel.name](*args)
    return args[-1].numpy()


def _check_matmul(m: int, out: int, in_: int, block, density: float, with_bias: bool, seed: int = 0,
                  activation: str | None = None, profile=X86):
    """The kernel scheduled for `profile` (built and run on this x86 host) against numpy."""
    rng = np.random.default_rng(seed)
    weight = random_bsr_weight(out, in_, block, density, seed=seed)
    bias = rng.standard_normal(out).astype(np.float32) if with_bias else None
    x = rng.standard_normal((m, in_)).astype(np.float32)
    y = _run(bsr_matmul_kernel(profile, m, weight, bias, activation=activation), x)
    expected = x @ weight.to_dense().T + (bias if with_bias else 0)
    expected = activate(expected, activation)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


# --- the format ------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 40), in_=st.integers(1, 40), r=st.integers(1, 9), c=st.integers(1, 9),
       density=st.floats(0, 1), seed=st.integers(0, 10))
def test_to_bsr_round_trip(out, in_, r, c, density, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, in_)).astype(np.float32) * (rng.random((out, in_)) < density)
    bsr = to_bsr(w, (r, c))
    np.testing.assert_array_equal(bsr.to_dense(), w)
    assert bsr.data.shape == (bsr.nnz_blocks, r, c) and bsr.indptr.shape == (-(-out // r) + 1,)
    assert bsr.data.dtype == np.float32 and bsr.indices.dtype == np.int32 and bsr.indptr.dtype == np.int32
    assert all(np.any(block != 0) for block in bsr.data)  # all-zero blocks are dropped


def test_to_bsr_small_example():
    bsr = to_bsr(np.array([[1, 0, 0], [0, 0, 2], [0, 3, 0]], np.float32), (2, 2))
    assert bsr.indptr.tolist() == [0, 2, 3] and bsr.indices.tolist() == [0, 1, 0]
    np.testing.assert_array_equal(bsr.data[1], [[0, 0], [2, 0]])  # ragged column block, zero-padded
    assert bsr.shape == (3, 3) and bsr.block == (2, 2)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_random_bsr_weight_keeps_exact_block_count(density):
    weight = random_bsr_weight(37, 50, (4, 8), density, seed=3)
    assert isinstance(weight, BSRWeight)
    assert weight.nnz_blocks == round(density * 10 * 7)
    assert weight.to_dense().shape == (37, 50)


# --- x86 kernels -------------------------------------------------------------------------------

@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.sampled_from([1, 3, 8, 17, 40]), out=st.integers(1, 70), in_=st.integers(1, 70),
       block=st.sampled_from(BLOCKS), density=st.floats(0, 1), with_bias=st.booleans())
def test_bsr_matmul_matches_numpy(m, out, in_, block, density, with_bias):
    _check_matmul(m, out, in_, block, density, with_bias)


@pytest.mark.parametrize("m,out,in_,block,density,with_bias", [
    (128, 96, 64, (8, 8), 0.3, True),     # rows vectorised, m a multiple of the tile
    (37, 50, 45, (16, 16), 0.5, False),   # ragged out, in and m
    (1, 33, 20, (32, 4), 1.0, True),      # m = 1
    (64, 40, 30, (1, 1), 0.2, True),      # m vectorised (unstructured), X transposed in the kernel
    (19, 41, 29, (4, 1), 0.6, False),     # m vectorised with a ragged m tile and out
    (70, 23, 50, (1, 4), 0.0, True),      # nothing kept: bias only
])
def test_bsr_matmul_schedules(m, out, in_, block, density, with_bias):
    _check_matmul(m, out, in_, block, density, with_bias)


@pytest.mark.parametrize("m,out,in_,block,with_bias", [
    (40, 48, 64, (8, 8), True),       # rowvec
    (37, 50, 45, (16, 16), False),    # rowvec, ragged m, in and out (the staged store)
    (33, 40, 30, (1, 1), True),       # mvec
    (19, 41, 29, (4, 1), False),      # mvec, ragged out tile
])
@pytest.mark.parametrize("activation", ["relu", "relu6", "hardswish", "gelu"])
def test_activation_epilogues_match_numpy(m, out, in_, block, with_bias, activation):
    _check_matmul(m, out, in_, block, 0.5, with_bias, activation=activation)


@pytest.mark.parametrize("m,out,in_,activation", [
    (16, 48, 32, None),
    (5, 33, 70, "relu"),
    (64, 20, 1100, None),  # X over 256 KiB: two column chunks, the second adding to Y; ragged in and out
    (64, 20, 1100, "relu"),  # the ReLU only once the last chunk is summed in
])
def test_dense_matmul_matches_numpy(m, out, in_, activation):
    rng = np.random.default_rng(1)
    w, bias = rng.standard_normal((out, in_)).astype(np.float32), rng.standard_normal(out).astype(np.float32)
    x = rng.standard_normal((m, in_)).astype(np.float32)
    kernel = dense_matmul_kernel(X86, m, w, bias, name="dense_test", activation=activation)
    assert kernel.constants[2].shape[1] - 1 == (2 if in_ > 1000 else 1)  # column chunks per block row
    y = _run(kernel, x)
    expected = x @ w.T + bias
    np.testing.assert_allclose(y, activate(expected, activation), rtol=1e-4, atol=1e-4)


AVX2 = dataclasses.replace(X86, simd_bytes=32, l1_bytes=32 << 10)


def test_thin_m_tiles_keep_a_block_rows_weights_in_l1():
    """32-row blocks on AVX2 take m in tiles of 2: a block row's kept weights are cut into column chunks
    of L1 size (at most 4, at least a block each); the dense kernel keeps its X-sized chunks."""
    assert kernel_schedule(AVX2, 128, 384, 1536, (32, 32), 58).tiles["k_chunks"] == 4   # 19.6 KB a row
    assert kernel_schedule(AVX2, 128, 1536, 384, (32, 32), 58).tiles["k_chunks"] == 1   # 1.2 blocks a row
    assert kernel_schedule(AVX2, 128, 384, 1536, (16, 16), 230).tiles["k_chunks"] == 1  # m tiles of 4
    assert kernel_schedule(AVX2, 128, 768, 3072, (16, 32), 48 * 96).tiles["k_chunks"] == 6  # X in L2


def test_weight_chunks_with_relu_match_numpy():
    """Ragged m, in and out, four column chunks of a block row's weights, the ReLU after the last."""
    assert kernel_schedule(AVX2, 19, 70, 1000, (32, 32), 30).tiles["k_chunks"] == 4
    _check_matmul(19, 70, 1000, (32, 32), 30 / (3 * 32), True, activation="relu", profile=AVX2)


@pytest.mark.parametrize("block", [(8, 8), (1, 1)])  # rowvec and mvec layouts
def test_sparsities_of_one_shape_share_one_function_and_one_compiled_module(block):
    """The kept-block count is a symbolic size: two densities give structurally equal PrimFuncs, the
    second compile reuses the first's module, and it computes both layers right."""
    import tvm_ffi

    rng = np.random.default_rng(3)
    weights = [random_bsr_weight(64, 48, block, density, seed=seed) for seed, density in ((0, 0.3), (1, 0.7))]
    kernels = [bsr_matmul_kernel(X86, 16, w) for w in weights]
    assert kernels[0].constants[0].shape[0] != kernels[1].constants[0].shape[0]
    assert tvm_ffi.structural_equal(kernels[0].primfunc, kernels[1].primfunc)
    assert compile_kernel(kernels[0], X86) is compile_kernel(kernels[1], X86)
    x = rng.standard_normal((16, 48)).astype(np.float32)
    for kernel, weight in zip(kernels, weights):
        np.testing.assert_allclose(_run(kernel, x), x @ weight.to_dense().T, rtol=1e-4, atol=1e-4)


def test_unknown_activation_is_a_codegen_error():
    with pytest.raises(CodegenError, match=r"activation 'tanh' is not supported by the block-sparse kernels "
                                           r"\(known: None, 'relu', 'relu6', 'hardswish', 'gelu'\)"):
        bsr_matmul_kernel(X86, 4, random_bsr_weight(8, 8, (4, 4), 0.5), activation="tanh")


def test_kernel_signature_and_timing():
    weight = random_bsr_weight(40, 24, (8, 8), 0.5)
    kernel = bsr_matmul_kernel(X86, 16, weight, name="my_layer")
    assert kernel.name == "my_layer" and kernel.primfunc.attrs["global_symbol"] == "my_layer"
    params = [p.name for p in kernel.primfunc.params]
    assert params[0] == "X" and params[-1] == "Y" and len(params) == 2 + len(kernel.constants)
    bench = Bench(compile_kernel(kernel, X86), kernel, (16, 24), tvm.cpu(), device_clock)
    samples = [bench.sample() for _ in range(3)]
    assert bench.number >= 1 and all(s.seconds > 0 for s in samples)


@pytest.mark.parametrize("target", ["x86", "arm64", "cuda"])
@pytest.mark.parametrize("m,block", [(24, (8, 8)), (40, (1, 1)), (3, (1, 4)), (128, (4, 1)), (96, (16, 32))])
def test_kernels_are_built_with_the_shared_schedule(target, m, block):
    """The cost model counts `kernel_schedule`'s tiles: the kernels must be built with exactly those."""
    profile = resolve_target(target)
    weight = random_bsr_weight(64, 3072, block, 0.5)
    schedule = kernel_schedule(profile, m, 64, 3072, block, weight.nnz_blocks)
    kernel = bsr_matmul_kernel(profile, m, weight)
    script = kernel.primfunc.script()
    tiles = schedule.tiles
    if schedule.layout == "cuda_split":
        assert re.findall(r'thread_binding\((\d+), thread="threadIdx.x"\)', script) == [str(tiles["lanes"])]
        shares = re.search(r"shares = T.alloc_shared\(\((\d+),\)", script).group(1)
        assert int(shares) == tiles["lanes"] * (block[0] | 1)  # each lane's sums of the block's rows, odd pitch
        return
    acc = tuple(int(d) for d in re.search(r"acc = T.alloc_(?:buffer|local)\(\((\d+), (\d+)\)", script).groups())
    if schedule.layout == "cuda":
        assert re.findall(r'thread_binding\((\d+), thread="threadIdx.x"\)', script) == [str(tiles["m_threads"])]
        assert acc == (block[0], tiles["m_per_thread"])
        return
    if schedule.layout == "rowvec":
        assert acc == (tiles["m_tile"], block[0])
        assert kernel.constants[2].shape == (weight.block_rows, tiles["k_chunks"] + 1)
    else:
        assert schedule.layout == "mvec" and acc == (tiles["row_group"], tiles["m_tile"])


@pytest.mark.parametrize("m,out,in_,block,density,parallel", [
    (1, 128, 128, (8, 8), 0.3, 0),        # batch 1, 4.9k kept weights: under a fork and join's worth
    (1, 768, 3072, (1, 1), 0.3, 1),       # batch 1, 700k kept weights
    (4, 512, 512, (16, 16), 0.3, 1),      # 315k multiply-adds
    (16, 256, 256, (4, 1), 0.1, 0),       # m vectorised: 16 rows of X are two vectors of lanes
])
def test_small_kernels_run_on_the_calling_thread(m, out, in_, block, density, parallel):
    """`runs_parallel` decides from the work; the kernel has a parallel loop exactly where it says so,
    and one core never forks."""
    two_cores = dataclasses.replace(X86, cores=2, simd_bytes=32)
    weight = random_bsr_weight(out, in_, block, density, seed=1)
    kernel = bsr_matmul_kernel(two_cores, m, weight)
    assert kernel_schedule(two_cores, m, out, in_, block, weight.nnz_blocks).tiles["parallel"] == parallel
    assert ("T.parallel" in kernel.primfunc.script()) == bool(parallel)
    one_core = bsr_matmul_kernel(dataclasses.replace(two_cores, cores=1), m, weight)
    assert "T.parallel" not in one_core.primfunc.script()


@pytest.mark.parametrize("block", [(1, 1), (8, 8)])
@pytest.mark.parametrize("parallel", [0, 1])
def test_serial_and_parallel_kernels_match_numpy(block, parallel):
    """Both ways of running a kernel (forced, as `tools/bench_kernels.py --part parallel` compares them)."""
    rng = np.random.default_rng(3)
    weight = random_bsr_weight(72, 48, block, 0.4, seed=3)
    bias = rng.standard_normal(72).astype(np.float32)
    x = rng.standard_normal((5, 48)).astype(np.float32)
    kernel = bsr_matmul_kernel(X86, 5, weight, bias, activation="relu", parallel=parallel)
    assert ("T.parallel" in kernel.primfunc.script()) == bool(parallel)
    np.testing.assert_allclose(_run(kernel, x), np.maximum(x @ weight.to_dense().T + bias, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_kernel_timed_through_rpc(tmp_path):
    """The cost model times kernels on boards through TVM RPC with the same code as locally."""
    from tvm import rpc

    weight = random_bsr_weight(32, 16, (4, 4), 0.5)
    kernel = bsr_matmul_kernel(X86, 8, weight)
    lib = tmp_path / "k.so"
    tvm.compile(tvm.IRModule({kernel.name: kernel.primfunc}), target=X86.tvm()).export_library(str(lib))
    server = rpc.Server(host="127.0.0.1", port=9300, port_end=9500)
    try:
        session = rpc.connect("127.0.0.1", server.port)
        session.upload(str(lib))
        remote = session.load_module("k.so")
        bench = Bench(remote, kernel, (8, 16), session.cpu(), device_clock)
        samples = [bench.sample() for _ in range(2)]
    finally:
        server.terminate()
    assert all(s.seconds > 0 for s in samples)


@pytest.mark.parametrize("block", [(0, 4), (4, 0), (65, 1), (1, 128)])
def test_unsupported_block_is_a_codegen_error(block):
    with pytest.raises(CodegenError, match=rf"block {block[0]}x{block[1]} is not supported on target x86"):
        check_block_supported(X86, block)


def test_unsupported_block_rejected_before_building():
    weight = to_bsr(np.ones((4, 200), np.float32), (1, 100))
    with pytest.raises(CodegenError, match="block 1x100"):
        bsr_matmul_kernel(X86, 4, weight)


# --- other targets -----------------------------------------------------------------------------

def test_arm64_kernel_compiles_to_object_code(tmp_path):
    arm = resolve_target("arm64")
    for block in [(8, 8), (1, 1)]:
        kernel = bsr_matmul_kernel(arm, 16, random_bsr_weight(40, 24, block, 0.5), name="arm_k")
        executable = tvm.compile(tvm.IRModule({kernel.name: kernel.primfunc}), target=arm.tvm())
        executable.export_library(str(tmp_path / f"k{block[0]}.tar"))
        assert (tmp_path / f"k{block[0]}.tar").stat().st_size > 0
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc missing (apt-get install gcc-aarch64-linux-gnu): no .so export")
    executable.export_library(str(tmp_path / "k.so"),
                              fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-gcc"))
    assert (tmp_path / "k.so").read_bytes()[:4] == b"\x7fELF"


@pytest.mark.parametrize("m,layout", [(1, "cuda_split"), (129, "cuda"), (2048, "cuda")])
def test_cuda_matmul_splits_columns_over_a_warp_at_m_1_and_threads_along_m_past_the_measured_range(m, layout):
    # (between them the cost model picks: test_cuda_tools checks its picks against an H100's times)
    assert kernel_schedule(resolve_target("cuda"), m, 256, 256, (16, 16), 100).layout == layout


def test_cuda_kernel_builds_source():
    cuda = resolve_target("cuda")
    kernel = bsr_matmul_kernel(cuda, 7, random_bsr_weight(37, 29, (4, 3), 0.5), name="cuda_k", activation="relu")
    executable = tvm.compile(tvm.IRModule({kernel.name: kernel.primfunc}), target=cuda.tvm())
    source = executable.mod.imports[0].inspect_source("cuda")
    assert "cuda_k" in source and "max(" in source  # the ReLU epilogue


@requires_cuda_gpu
@pytest.mark.parametrize("block", [(1, 1), (8, 8), (16, 4), (32, 32)])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("m,layout", [(33, "cuda"), (33, "cuda_split"), (1, "cuda_split"), (3, "cuda")])
def test_cuda_kernel_matches_numpy(block, activation, m, layout):
    # 70 x 45: ragged in both directions for every block but 1x1; 32x32 has more rows than a warp has lanes
    cuda = resolve_target("cuda")
    rng = np.random.default_rng(0)
    weight = random_bsr_weight(70, 45, block, 0.4)
    bias = rng.standard_normal(70).astype(np.float32)
    x = rng.standard_normal((m, 45)).astype(np.float32)
    kernel = bsr_matmul_kernel(cuda, m, weight, bias, activation=activation, layout=layout)
    module = compile_kernel(kernel, cuda)
    args = kernel_arguments(kernel, x, tvm.cuda(0))
    module[kernel.name](*args)
    expected = x @ weight.to_dense().T + bias
    np.testing.assert_allclose(args[-1].numpy(), activate(expected, activation),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [4, 5, 7])
def test_neon_schedule_tiles_small_m_in_whole_strips(m):
    """4-lane NEON with 4 <= m < 8 takes the m-vectorised layout; its m tile must stay a multiple of 8."""
    target = resolve_target("arm64")
    schedule = kernel_schedule(target, m, 32, 40, (1, 1), 12)
    assert schedule.layout == "mvec" and schedule.tiles["m_tile"] % 8 == 0
    kernel = bsr_matmul_kernel(target, m, random_bsr_weight(32, 40, (1, 1), 0.3))
    assert kernel.primfunc is not None


def test_kernels_declare_their_buffers_unaliased():
    # TVM 0.27 reads "tirx.noalias" only ("tir.noalias" is silently ignored): without it LLVM must assume
    # that Y may alias the weights and reloads them (kernels alone 1-14% slower); in a model, the whole
    # module got noalias only when one of TVM's own ops happened to be in it.
    from pruneaug.codegen import conv_lowering, norm, softmax

    matmul = bsr_matmul_kernel(X86, 4, random_bsr_weight(32, 32, (8, 8), 0.5))
    strided = conv_lowering.conv_calls(X86, (1, 4, 9, 9), random_bsr_weight(8, 36, (4, 4), 0.5).to_dense(), (4, 4),
                                       (3, 3), (2, 2), (1, 1, 1, 1), (1, 1))
    funcs = [matmul.primfunc, bsr_matmul_kernel(X86, 64, random_bsr_weight(32, 32, (1, 1), 0.5)).primfunc,
             *(call.kernel.primfunc for call in strided), norm.layer_norm_primfunc(4, 32, 1e-5, 8, 0),
             softmax.softmax_primfunc(4, 32, 8, 0),
             bsr_matmul_kernel(resolve_target("cuda"), 4, random_bsr_weight(32, 32, (8, 8), 0.5)).primfunc]
    for func in funcs:
        assert func.attrs["tirx.noalias"] and "tir.noalias" not in func.attrs
    llvm = tvm.compile(tvm.IRModule({matmul.name: matmul.primfunc}), target=X86.tvm()).mod.inspect_source("ll")
    assert re.search(r"ptr noalias[^,]* %data\b", llvm)  # the compute function's weight argument
