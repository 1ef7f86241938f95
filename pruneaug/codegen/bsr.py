"""Block-sparse (and dense) matmul and conv kernels in TIR, per target, and how to build and time them.

    >>> t = resolve_target("x86")
    >>> k = bsr_matmul_kernel(t, 128, random_bsr_weight(256, 64, (8, 8), 0.1))
    >>> [p.name for p in k.primfunc.params], [a.shape for a in k.constants][:1]
    (['X', 'data', 'indices', 'chunk_ptr', 'bias', 'Y'], [(26, 8, 8)])

A `Kernel` is one PrimFunc in destination-passing style, `X, *constants, Y`, with static shapes and
its constants already in the layout that its schedule wants; `compile_kernel` builds it alone,
Relax embeds the same PrimFunc with `call_tir`. Which layout and tiles a block shape gets on which
target is decided by `schedule.kernel_schedule` and `schedule.conv_schedule`, which the cost model
shares. Every kernel takes an `activation` (None, "relu", "relu6", "hardswish" or "gelu", `ACTIVATIONS`) applied as it
stores Y, so that `relu(layer(x) + bias)` is one call.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pruneaug.codegen import conv, cpu_kernels, cuda_kernels
from pruneaug.codegen.bsr_format import BSRWeight, nonempty_blocks, padded_bias, random_bsr_weight, to_bsr
from pruneaug.codegen.cpu_kernels import ACTIVATIONS
from pruneaug.codegen.schedule import DENSE_BLOCK, Schedule, kernel_schedule
from pruneaug.cost_model.targets import TargetProfile
from pruneaug.errors import CodegenError

__all__ = [
    "ACTIVATIONS", "BSRWeight", "Kernel", "to_bsr", "random_bsr_weight", "check_block_supported", "bsr_matmul_kernel",
    "dense_matmul_kernel", "bsr_conv2d_kernel", "compile_kernel", "kernel_arguments",
]

MAX_BLOCK_SIDE = 64  # larger blocks would unroll into huge code and spill the accumulators
COMPILED_KERNELS_KEPT = 16  # recently compiled kernel modules kept for reuse (least recently used dropped)
_COMPILED: OrderedDict = OrderedDict()  # (structural key of the PrimFunc, target) -> runtime module


@dataclass(frozen=True)
class Kernel:
    """A scheduled PrimFunc `name(X, *constants, Y)` and the arrays it takes besides X and Y."""

    primfunc: "tvm.tirx.PrimFunc"  # noqa: F821 (tvm imported lazily by callers)
    name: str
    constants: list[np.ndarray]


def check_block_supported(target: TargetProfile, block: tuple[int, int]) -> None:
    """Raise `CodegenError` if the target's kernels cannot serve `r x c` blocks."""
    r, c = block
    if not (1 <= r <= MAX_BLOCK_SIDE and 1 <= c <= MAX_BLOCK_SIDE):
        raise CodegenError(
            f"block {r}x{c} is not supported on target {target.name}: "
            f"both sides must be between 1 and {MAX_BLOCK_SIDE}")
    if target.kind not in ("x86", "arm64", "cuda"):
        raise CodegenError(f"block {r}x{c}: target {target.name} has no block-sparse kernels")


def check_activation(activation: str | None) -> None:
    """Raise `CodegenError` for an activation the kernels cannot apply as they store their result."""
    if activation not in ACTIVATIONS:
        known = ", ".join(repr(a) for a in ACTIVATIONS)
        raise CodegenError(f"activation {activation!r} is not supported by the block-sparse kernels (known: {known})")


def bsr_matmul_kernel(target: TargetProfile, m: int, weight: BSRWeight, bias: np.ndarray | None = None,
                      name: str = "bsr_matmul", activation: str | None = None, parallel: int | None = None,
                      layout: str | None = None) -> Kernel:
    """`Y[m, out] = act(X[m, in] @ W.T (+ bias))` with W block-sparse, scheduled for `target`. `parallel`
    (0 or 1) overrides the CPU schedule's choice of running on the thread pool, `layout` the CUDA
    schedule's layout (benchmarks compare them)."""
    check_block_supported(target, weight.block)
    check_activation(activation)
    out, in_ = weight.shape
    data, indices = nonempty_blocks(weight)
    schedule = kernel_schedule(target, m, out, in_, weight.block, weight.nnz_blocks, layout)
    if parallel is not None and target.kind != "cuda":
        schedule = Schedule(schedule.layout, {**schedule.tiles, "parallel": parallel})
    if target.kind == "cuda":
        build = cuda_kernels.bsr_matmul_split if schedule.layout == "cuda_split" else cuda_kernels.bsr_matmul
        func = build(m, out, in_, weight.block, activation=activation, **schedule.tiles)
        consts = [data, indices, weight.indptr, padded_bias(bias, out, weight.block_rows * weight.block[0])]
        return Kernel(func.with_attr("global_symbol", name), name, consts)
    pointers = weight.indptr.astype(np.int32)
    if schedule.layout == "rowvec":
        func = cpu_kernels.rowvec_matmul(m, out, in_, weight.block, activation=activation,
                                         **schedule.tiles)
        data = data.transpose(0, 2, 1)  # [nnzb, c, r]: a block's rows are contiguous
        pointers = cpu_kernels.chunk_pointers(pointers, indices, weight.block_cols, schedule.tiles["k_chunks"])
    else:
        func = cpu_kernels.mvec_matmul(m, out, in_, weight.block, activation=activation,
                                       **schedule.tiles)
    bias_len = int(func.params[4].shape[0])
    consts = [np.ascontiguousarray(data, np.float32), indices.astype(np.int32), pointers,
              padded_bias(bias, out, bias_len)]
    return Kernel(func.with_attr("global_symbol", name), name, consts)


def dense_matmul_kernel(target: TargetProfile, m: int, w2d: np.ndarray, bias: np.ndarray | None = None,
                        name: str = "dense_matmul", activation: str | None = None) -> Kernel:
    """The dense layer as a BSR product with every block kept: the rowvec layout is a packed GEMM
    micro-kernel (a `m_tile x r` register tile over a `[c, r]`-packed weight panel)."""
    weight = to_bsr(np.asarray(w2d, np.float32), DENSE_BLOCK)
    return bsr_matmul_kernel(target, m, weight, bias, name, activation)


def bsr_conv2d_kernel(target: TargetProfile, x_shape: tuple[int, int, int, int], weight: BSRWeight,
                      kernel_hw: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int],
                      dilations: tuple[int, int], bias: np.ndarray | None = None,
                      name: str = "bsr_conv2d", activation: str | None = None, layout: str | None = None) -> Kernel:
    """Group-1 Conv `X[N, C, H, W] -> Y[N, Cout, Ho, Wo]` with `W[Cout, C*kh*kw]` block-sparse, then
    `activation`. `layout` forces a layout of `schedule.conv_schedule` (benchmarks and tests compare them)."""
    check_block_supported(target, weight.block)
    check_activation(activation)
    func, consts = conv.bsr_conv2d(target, x_shape, weight, kernel_hw, strides, pads, dilations, bias,
                                   activation, layout)
    return Kernel(func.with_attr("global_symbol", name), name, consts)


def compile_kernel(kernel: Kernel, target: TargetProfile) -> "tvm.runtime.Module":  # noqa: F821
    """Build the kernel alone (`tvm.compile` of its PrimFunc) and return the runtime module.

    A kernel structurally equal to one of the last COMPILED_KERNELS_KEPT built here reuses its module:
    the kept-block count is a symbolic size, so the cost model's grid of densities for one layer shape
    and block is mostly one function (same tiles), compiled once instead of once per density."""
    import tvm
    import tvm_ffi

    key = (tvm_ffi.StructuralKey(kernel.primfunc), target.cache_key)
    module = _COMPILED.pop(key, None)
    if module is None:
        module = tvm.compile(tvm.IRModule({kernel.name: kernel.primfunc}), target=target.tvm()).mod
    _COMPILED[key] = module
    while len(_COMPILED) > COMPILED_KERNELS_KEPT:
        _COMPILED.popitem(last=False)
    return module


def kernel_arguments(kernel: Kernel, x: np.ndarray, dev) -> list:
    """The call's arguments on `dev`: X, the kernel's constants, and the output (last) to be written;
    alike for a local device and an RPC session's remote one."""
    import tvm

    out_shape = [int(d) for d in kernel.primfunc.params[-1].shape]
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in (x, *kernel.constants)]
    args.append(tvm.runtime.empty(out_shape, "float32", dev))
    return args