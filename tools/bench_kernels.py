"""Block-sparse kernels against onnxruntime's dense MatMul/Conv, TVM dense and scipy's BSR product.

    TVM_NUM_THREADS is set from --threads before TVM loads; onnxruntime gets the same intra-op count,
    spinning off (`ort_session`).
    python tools/bench_kernels.py [--threads 2] [--rounds 40] [--number 5] [--quick]
    python tools/bench_kernels.py --threads 1 --clock thread   # CPU time: robust to a loaded machine
    python tools/bench_kernels.py --threads 1 --clock thread --baked   # pattern baked in vs read at run time
    python tools/bench_kernels.py --threads 1 --clock thread --part conv   # only the conv table
    python tools/bench_kernels.py --part parallel   # small kernels on the calling thread vs the thread pool
    python tools/bench_kernels.py --part norm   # our layer norm kernel vs TVM's scheduled Relax op
    python tools/bench_kernels.py --part mean   # our mean over trailing axes vs TVM's (global average pools)
    python tools/bench_kernels.py --part softmax   # our softmax kernel vs TVM's scheduled Relax op
    python tools/bench_kernels.py --part pool   # our max and average pool kernels vs TVM's scheduled Relax ops
    python tools/bench_kernels.py --part attention   # activation matmuls: padded to whole vectors or not
    python tools/bench_kernels.py --part depthwise   # depthwise convs: widened to whole tiles or not
    python tools/bench_kernels.py --part padding   # depthwise convs: padded copies in chunks or per channel
    python tools/bench_kernels.py --part dense   # the dense kernels in 16x32 blocks or 32x16
    python tools/bench_kernels.py --part convtranspose   # ConvTranspose as a conv of its phases vs TVM's

Every competitor of one row is timed in the same rounds, interleaved (round-robin, `number` calls
each), so that load from other processes hits them alike; a figure is the median over rounds of the
mean call time. Ratios are onnxruntime dense / ours (higher is better). Also printed: the ratio of
the best rounds (min), which is what the kernel does on a quiet machine. `--clock thread` times
the calling thread's CPU time instead of the wall clock (with one thread every competitor runs in
the calling thread): on a machine shared with other jobs it is the figure that does not move.
The parallel table times every kernel both ways, on the thread pool and on the calling thread, and
scores `schedule.runs_parallel`'s choice against the faster of the two (PARALLEL_MIN_LANE_MACS).
The conv table times both CPU conv layouts (`schedule.conv_schedule`: "pixvec" along output rows,
"chanvec" over output channels) against onnxruntime in the same rounds, and marks the one the
schedule picks.
The norm, softmax and pool tables time each kernel alone, ours against the one PrimFunc that the artifacts'
pipeline makes of TVM's Relax op (`relax_op_kernel`); "ours" is what the artifacts' rewrite
(`relax_build._rewrite_cpu_ops`) puts in its place.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

MATMUL_SHAPES = [(1536, 384), (384, 1536)]  # W[out, in]
BLOCKS = [(1, 1), (1, 4), (4, 1), (16, 1), (4, 4), (8, 8), (16, 16), (32, 32)]
CONVS = [  # name, x_shape, Cout, kernel, pads
    ("3x3 64->64 56x56", (1, 64, 56, 56), 64, (3, 3), (1, 1, 1, 1)),
    ("1x1 256->64 56x56", (1, 256, 56, 56), 64, (1, 1), (0, 0, 0, 0)),
    ("3x3 256->256 14x14", (1, 256, 14, 14), 256, (3, 3), (1, 1, 1, 1)),
    ("1x1 256->256 14x14", (1, 256, 14, 14), 256, (1, 1), (0, 0, 0, 0)),
    ("3x3 64->128 8x8", (1, 64, 8, 8), 128, (3, 3), (1, 1, 1, 1)),
    ("3x3 512->512 7x7", (1, 512, 7, 7), 512, (3, 3), (1, 1, 1, 1)),
]
CONV_BLOCKS = [(1, 1), (4, 1), (16, 1), (4, 4), (8, 8), (16, 16), (32, 32)]
CONV_LAYOUTS = ["pixvec", "chanvec"]


CLOCK = time.perf_counter


def time_interleaved(calls: dict[str, Callable[[], object]], rounds: int, number: int) -> dict[str, list[float]]:
    """Seconds per call of each callable, one figure per round, the callables taking turns."""
    for call in calls.values():
        call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = CLOCK()
            for _ in range(number):
                call()
            samples[name].append((CLOCK() - start) / number)
    return samples


def ort_session(model, threads: int):
    """onnxruntime with its intra-op threads sleeping between runs: spinning, they took the cores that TVM's
    thread pool needed next (parallel kernels of a few µs ran 1 ms, a scheduler time slice, beside them)."""
    from pruneaug.passes.ort_run import make_session

    return make_session(model, threads, spinning=False)


def one_node_model(op: str, x_shape, *constants: np.ndarray, opset: int = 17, **attrs):
    """`y = op(x, *constants)` as an ONNX model (the constants are initializers)."""
    from onnx import TensorProto, helper, numpy_helper

    names = [f"c{i}" for i in range(len(constants))]
    node = helper.make_node(op, ["x", *names], ["y"], **attrs)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(c, name) for c, name in zip(constants, names)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def tvm_call(kernel, target, x: np.ndarray) -> Callable[[], object]:
    import tvm

    from pruneaug.codegen.bsr import compile_kernel, kernel_arguments

    module = compile_kernel(kernel, target)
    args = kernel_arguments(kernel, x, tvm.cpu())
    func = module[kernel.name]
    return lambda: func(*args)


def summarise(samples: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    return {name: (statistics.median(times), min(times)) for name, times in samples.items()}


def print_against_ours(label: str, calls: dict[str, Callable[[], object]], rounds: int, number: int) -> None:
    """Time `calls` ("ours", "other", "ort") interleaved and print their table row: the label, the three
    medians in µs, then other/ours and ort/ours (the tables of one alternative to our kernel and onnxruntime)."""
    t = {name: median for name, (median, _) in summarise(time_interleaved(calls, rounds, number)).items()}
    print(f"| {label} | {t['ours'] * 1e6:.1f} | {t['other'] * 1e6:.1f} | {t['ort'] * 1e6:.1f} "
          f"| {t['other'] / t['ours']:.2f}x | {t['ort'] / t['ours']:.2f}x |", flush=True)


def bench_matmul(target, m: int, rounds: int, number: int, threads: int, blocks, densities) -> None:
    import scipy.sparse

    from pruneaug.codegen.bsr import bsr_matmul_kernel, dense_matmul_kernel, random_bsr_weight

    print(f"\n## MatMul, m={m}, x86 host, {threads} threads (TVM_NUM_THREADS={threads}, ort intra_op={threads})")
    print("| W (out x in) | sparsity | block | ours µs | ort dense µs | TVM dense µs | scipy BSR µs "
          "| ort/ours (median) | ort/ours (min) | ort/TVM dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for out, in_ in MATMUL_SHAPES:
        x = rng.standard_normal((m, in_)).astype(np.float32)
        dense_w = rng.standard_normal((out, in_)).astype(np.float32)  # no zero blocks for to_bsr to drop
        tvm_dense = tvm_call(dense_matmul_kernel(target, m, dense_w), target, x)
        for density in densities:
            for block in blocks:
                weight = random_bsr_weight(out, in_, block, density, seed=1)
                w2d = weight.to_dense()
                session = ort_session(one_node_model("MatMul", x.shape, np.ascontiguousarray(w2d.T)), threads)
                scipy_w = scipy.sparse.bsr_matrix(w2d, blocksize=block)
                calls = {
                    "ours": tvm_call(bsr_matmul_kernel(target, m, weight), target, x),
                    "ort": lambda s=session: s.run(None, {"x": x}),
                    "tvm_dense": tvm_dense,
                    "scipy": lambda w=scipy_w: w @ x.T,
                }
                t = summarise(time_interleaved(calls, rounds, number))
                print(f"| {out}x{in_} | {1 - density:.0%} | {block[0]}x{block[1]} | {t['ours'][0] * 1e6:.0f} "
                      f"| {t['ort'][0] * 1e6:.0f} | {t['tvm_dense'][0] * 1e6:.0f} | {t['scipy'][0] * 1e6:.0f} "
                      f"| {t['ort'][0] / t['ours'][0]:.2f}x | {t['ort'][1] / t['ours'][1]:.2f}x "
                      f"| {t['ort'][0] / t['tvm_dense'][0]:.2f}x |", flush=True)


PARALLEL_MS = (1, 4, 16)  # rows of X: batch 1 to a few tokens, where a layer's work is small
PARALLEL_SHAPES = [(128, 128), (256, 256), (512, 512), (768, 768), (768, 3072)]
PARALLEL_BLOCKS = [(1, 1), (4, 1), (8, 8), (16, 16)]


def bench_parallel(target, rounds: int, number: int, threads: int) -> None:
    from pruneaug.codegen.bsr import bsr_matmul_kernel, random_bsr_weight
    from pruneaug.codegen.schedule import PARALLEL_MIN_LANE_MACS, runs_parallel

    print(f"\n## Thread pool or calling thread, x86 host, {threads} threads; picked = `runs_parallel` "
          f"(from {PARALLEL_MIN_LANE_MACS} SIMD-lane multiply-adds)")
    print("| m | W (out x in) | density | block | serial µs | parallel µs | ort dense µs | parallel/serial "
          "| picked | picked/best |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    scores: dict[str, list[float]] = {"picked": [], "always parallel": [], "always serial": []}
    for m in PARALLEL_MS:
        for out, in_ in PARALLEL_SHAPES:
            x = rng.standard_normal((m, in_)).astype(np.float32)
            for density in (0.1, 0.3):
                for block in PARALLEL_BLOCKS:
                    weight = random_bsr_weight(out, in_, block, density, seed=1)
                    session = ort_session(one_node_model("MatMul", x.shape, np.ascontiguousarray(weight.to_dense().T)),
                                          threads)
                    calls = {way: tvm_call(bsr_matmul_kernel(target, m, weight, parallel=flag), target, x)
                             for way, flag in (("serial", 0), ("parallel", 1))}
                    calls["ort"] = lambda s=session: s.run(None, {"x": x})
                    t = {name: v[0] for name, v in summarise(time_interleaved(calls, rounds, number)).items()}
                    picked = "parallel" if runs_parallel(target, m, block, weight.nnz_blocks) else "serial"
                    best = min(t["serial"], t["parallel"])
                    for name, way in (("picked", picked), ("always parallel", "parallel"), ("always serial", "serial")):
                        scores[name].append(t[way] / best)
                    print(f"| {m} | {out}x{in_} | {density} | {block[0]}x{block[1]} | {t['serial'] * 1e6:.2f} "
                          f"| {t['parallel'] * 1e6:.2f} | {t['ort'] * 1e6:.2f} | {t['parallel'] / t['serial']:.2f} "
                          f"| {picked} | {t[picked] / best:.2f} |", flush=True)
    for name, ratios in scores.items():
        print(f"{name}: time over the faster way, geometric mean {np.exp(np.mean(np.log(ratios))):.3f}, "
              f"worst {max(ratios):.2f} ({len(ratios)} kernels)")


NORM_SHAPES = [(16, 128), (512, 128), (128, 768), (2048, 768)]  # rows x columns: the encoder, BERT-base


def relax_op_kernel(target, op: Callable, inputs: list[np.ndarray], rewrite: Callable | None = None
                    ) -> Callable[[], object]:
    """The one PrimFunc that `main(*inputs) = op(*inputs)` (`op` makes the Relax calls on the inputs' variables)
    becomes with the pipeline the artifacts use (DLight's CPU rules for TVM's own ops), after
    `rewrite(mod, target)` where given; compiled alone and called on the inputs.

    The kernel alone, as in a model: through the Relax VM each call from Python costs about 4 µs more,
    which a model pays once, not per op."""
    import tvm
    from tvm import relax, tirx

    from pruneaug.codegen.relax_build import _pipeline

    builder = relax.BlockBuilder()
    variables = [relax.Var(f"x{i}", relax.TensorType(list(a.shape), "float32")) for i, a in enumerate(inputs)]
    with builder.function("main", variables):
        with builder.dataflow():  # as TVM's ONNX frontend emits them: FuseOps fuses within dataflow blocks only
            y = builder.emit_output(op(*variables))
        builder.emit_func_output(y)
    mod = builder.get() if rewrite is None else rewrite(builder.get(), target)
    with target.tvm():
        lowered = _pipeline(target)(mod)
    [(gv, func)] = [(gv, f) for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)]
    kernel = tvm.compile(tvm.IRModule({gv.name_hint: func}), target=target.tvm()).mod[gv.name_hint]
    dev = tvm.cpu()
    tensors = {f"x{i}": tvm.runtime.tensor(a, dev) for i, a in enumerate(inputs)}  # the variables, as named above
    names = [str(param) for param in func.params[:-1]]
    # TVM's fused ops name their parameters after the variables, and an input read twice (x * x) is two of them;
    # our own kernels name theirs (X, gamma, ...) and take what the rewrite's call passes them, constants too
    args = [tensors[name] for name in names] if set(names) <= set(tensors) else [
        tensors[str(arg)] if isinstance(arg, relax.Var) else tvm.runtime.tensor(arg.value.numpy(), dev)
        for arg in _call_tir_args(mod)]
    args.append(tvm.runtime.empty([int(d) for d in y.ty.shape], "float32", dev))
    return lambda: kernel(*args)


def _call_tir_args(mod) -> list:
    """The arguments of the one `call_tir` of `mod`'s main: the inputs' variables and any constants."""
    from tvm import relax

    [call] = [binding.value for block in mod["main"].body.blocks for binding in block.bindings
              if isinstance(binding.value, relax.Call) and binding.value.op.name == "relax.call_tir"]
    return list(call.args[1].fields)


def bench_op(target, title: str, header: str, cases, rewrite: Callable, rounds: int, number: int,
             threads: int) -> None:
    """A table of one op per case: ours (what the artifacts' `rewrite` puts in its place), TVM's own and
    onnxruntime's, medians and ratios. `cases` gives `(label, inputs, model, op)`: the op's inputs (X
    first), the one-node ONNX model of it, and `op` making its Relax call."""
    print(title)
    print(f"| {header} | ours µs | TVM's µs | ort µs | TVM's/ours | ort/ours |")
    print("|---|---|---|---|---|---|")
    for label, inputs, model, op in cases:
        session = ort_session(model, threads)
        calls = {"ours": relax_op_kernel(target, op, inputs, rewrite), "other": relax_op_kernel(target, op, inputs),
                 "ort": lambda s=session, v=inputs[0]: s.run(None, {"x": v})}
        print_against_ours(label, calls, rounds, number)


def bench_norm(target, rounds: int, number: int, threads: int) -> None:
    from tvm import relax

    from pruneaug.codegen.relax_build import _rewrite_cpu_ops

    def case(rng, kind: str, rows: int, cols: int):
        x = (rng.standard_normal((rows, cols)) * 3 + 5).astype(np.float32)
        gamma, beta = (rng.standard_normal(cols).astype(np.float32) for _ in range(2))
        label = f"{kind} {rows}x{cols}"
        if kind == "rms":
            model = one_node_model("RMSNormalization", (rows, cols), gamma, axis=-1, epsilon=1e-5, opset=23)
            model.ir_version = 10  # onnxruntime's newest for opset 23
            return label, [x, gamma], model, lambda *v: relax.op.nn.rms_norm(*v, axes=[-1], epsilon=1e-5)
        model = one_node_model("LayerNormalization", (rows, cols), gamma, beta, axis=-1, epsilon=1e-5)
        return label, [x, gamma, beta], model, lambda *v: relax.op.nn.layer_norm(*v, axes=[-1], epsilon=1e-5)

    rng = np.random.default_rng(0)
    bench_op(target, f"\n## Layer and RMS norm over the last axis, x86 host, {threads} threads: `codegen/norm.py` "
             "against TVM's own Relax ops (DLight's CPU Reduction rule) and onnxruntime", "norm, rows x cols",
             [case(rng, kind, rows, cols) for kind in ("layer", "rms") for rows, cols in NORM_SHAPES],
             lambda mod, t: _rewrite_cpu_ops(mod, t, ["layer_norm"]), rounds, number, threads)


# input shapes of global average pools written as ReduceMean over H and W: EfficientNet-B0's squeeze-and-excite
# blocks (early, middle, late), a classifier head's
MEAN_SHAPES = [(1, 96, 112, 112), (1, 240, 28, 28), (1, 672, 14, 14), (1, 1280, 7, 7)]


def bench_mean(target, rounds: int, number: int, threads: int) -> None:
    from tvm import relax

    from pruneaug.codegen.relax_build import _rewrite_cpu_ops

    def case(rng, shape):
        x = rng.standard_normal(shape).astype(np.float32)
        model = one_node_model("ReduceMean", shape, axes=[2, 3], keepdims=1)
        return "x".join(map(str, shape)), [x], model, lambda v: relax.op.mean(v, axis=[2, 3], keepdims=True)

    rng = np.random.default_rng(0)
    bench_op(target, f"\n## Means over H and W (ReduceMean), x86 host, {threads} threads: `codegen/row_mean.py` "
             "against TVM's own Relax op (DLight's CPU Reduction rule) and onnxruntime", "mean, input",
             [case(rng, shape) for shape in MEAN_SHAPES], lambda mod, t: _rewrite_cpu_ops(mod, t, ["mean"]), rounds,
             number, threads)


# rows x columns: the bundled encoder's attention at batch 1, 8 and 32 (4 heads x 16 tokens of 16); BERT-base's
# at 128 tokens, batch 1 and 8 (12 heads); a ragged row (37 = 4 vectors of 8 and 5 left over); ViT-B's 197 tokens
SOFTMAX_SHAPES = [(64, 16), (512, 16), (2048, 16), (1536, 128), (12288, 128), (1000, 37), (2364, 197)]


def bench_softmax(target, rounds: int, number: int, threads: int) -> None:
    from tvm import relax

    from pruneaug.codegen.relax_build import _rewrite_cpu_ops

    def case(rng, rows: int, cols: int):
        x = (rng.standard_normal((rows, cols)) * 4).astype(np.float32)
        return (f"{rows}x{cols}", [x], one_node_model("Softmax", (rows, cols), axis=-1),
                lambda v: relax.op.nn.softmax(v, axis=-1))

    rng = np.random.default_rng(0)
    bench_op(target, f"\n## Softmax over the last axis, x86 host, {threads} threads: `codegen/softmax.py` against "
             "TVM's own Relax op (FastMathTransform's fast_softmax, DLight's CPU Reduction rule) and onnxruntime",
             "rows x cols", [case(rng, rows, cols) for rows, cols in SOFTMAX_SHAPES],
             lambda mod, t: _rewrite_cpu_ops(mod, t, ["softmax"]), rounds, number, threads)


# an LSTM's gates over a batch of 16 (hidden 256); SiLU's maps in EfficientNet-B0's first stages and a YOLO neck's;
# GPT-2's FFN over 128 tokens (its tanh GELU's cube); softplus over the LSTM's gates and a ResNet stage's map;
# mish over YOLOv4's (at 448 pixels) first stage and a late one
ELEMENTWISE = [
    ("sigmoid", (16, 1024)), ("sigmoid", (1, 32, 112, 112)), ("sigmoid", (1, 96, 56, 56)),
    ("sigmoid", (1, 256, 20, 20)), ("pow 3", (128, 3072)), ("softplus", (16, 1024)), ("softplus", (1, 64, 56, 56)),
    ("mish", (1, 32, 224, 224)), ("mish", (1, 512, 28, 28)),
]


def bench_elementwise(target, rounds: int, number: int, threads: int) -> None:
    from tvm import relax

    from pruneaug.codegen.relax_build import _vectorisable_math

    def softplus(v):  # TVM's ONNX frontend's, stable for any v
        return relax.op.maximum(v, relax.const(0.0)) + relax.op.log(
            relax.const(1.0) + relax.op.exp(relax.op.negative(relax.op.abs(v))))

    ops = {"sigmoid": ("Sigmoid", relax.op.sigmoid), "softplus": ("Softplus", softplus),
           "mish": ("Mish", lambda v: v * relax.op.tanh(relax.op.log(relax.const(1.0) + relax.op.exp(v))))}

    def case(rng, op: str, shape: tuple[int, ...]):
        x = (rng.standard_normal(shape) * 4).astype(np.float32)
        label = f"{op} {'x'.join(map(str, shape))}"
        if op in ops:
            return label, [x], one_node_model(ops[op][0], shape, opset=18), ops[op][1]
        exponent = np.array(float(op.split()[1]), np.float32)
        return label, [x], one_node_model("Pow", shape, exponent), lambda v: relax.op.power(v, relax.const(exponent))

    rng = np.random.default_rng(0)
    bench_op(target, f"\n## Elementwise ops TVM lowers to libm per element, x86 host, {threads} threads: "
             "`relax_build._vectorisable_math` (sigmoid through fast_exp, constant powers as products, softplus and "
             "mish's log(1 + exp(x)) by a series) against TVM's own op and onnxruntime", "op, shape",
             [case(rng, *c) for c in ELEMENTWISE], lambda mod, _target: _vectorisable_math(mod), rounds, number,
             threads)


# op, channels x map, kernel, stride, pads: ResNet's stem; VGG's 2x2 pools; GoogLeNet's 3x3 stride-1 pools; the
# late, short rows a strided pool leaves to TVM's kernel (`relax_build._pool`)
POOLS = [
    ("max", (64, 112, 112), 3, 2, 1), ("max", (64, 56, 56), 3, 2, 1), ("max", (64, 56, 56), 2, 2, 0),
    ("max", (128, 28, 28), 3, 1, 1), ("max", (832, 14, 14), 3, 1, 1), ("max", (512, 14, 14), 2, 2, 0),
    ("avg", (128, 28, 28), 3, 1, 1), ("avg", (64, 112, 112), 3, 2, 1), ("avg", (256, 14, 14), 2, 2, 0),
]


def bench_pool(target, rounds: int, number: int, threads: int) -> None:
    from tvm import relax

    from pruneaug.codegen.relax_build import _rewrite_cpu_ops

    def case(rng, kind: str, chw: tuple[int, int, int], kernel: int, stride: int, pad: int):
        x = rng.standard_normal((1, *chw)).astype(np.float32)
        op, onnx_op = (relax.op.nn.max_pool2d, "MaxPool") if kind == "max" else (relax.op.nn.avg_pool2d, "AveragePool")
        model = one_node_model(onnx_op, x.shape, kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[pad] * 4)
        return (f"{kind} {kernel}x{kernel}/{stride} {'x'.join(map(str, chw))}", [x], model,
                lambda v: op(v, kernel, stride, pad))

    rng = np.random.default_rng(0)
    bench_op(target, f"\n## 2-D pooling, x86 host, {threads} threads: `codegen/pooling.py` against TVM's own Relax "
             "op and onnxruntime (where the rewrite leaves a pool to TVM, ours is TVM's)",
             "pool, channels x map", [case(rng, *pool) for pool in POOLS],
             lambda mod, t: _rewrite_cpu_ops(mod, t, ["max_pool", "avg_pool"]), rounds, number, threads)


# heads, tokens, head width: the bundled encoder's; tokens that no vector width divides well (50, 100), BERT's
# 128; ViT-B's 197 (a prime)
ATTENTION_SHAPES = [(4, 16, 16), (12, 50, 64), (12, 100, 64), (12, 128, 64), (12, 197, 64)]


def bench_attention(target, rounds: int, number: int, threads: int) -> None:
    """Attention's two matmuls between activations (scores Q K^T and the weighted sum P V) as the artifacts'
    pipeline schedules them (`relax_build._LoopNestRule`), against the same schedule without its padding to
    whole vectors and tiles (`_tile_factors`) and onnxruntime's MatMul, both operands inputs."""
    from unittest import mock

    from onnx import TensorProto, helper
    from tvm import relax

    from pruneaug.codegen import relax_build

    print(f"\n## Attention matmuls, x86 host, {threads} threads: the artifacts' schedule, the same unpadded, "
          "onnxruntime")
    print("| product | heads x tokens x width | ours µs | unpadded µs | ort µs | unpadded/ours | ort/ours |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for heads, tokens, width in ATTENTION_SHAPES:
        for product, shapes in (("Q K^T", ((heads, tokens, width), (heads, width, tokens))),
                                ("P V", ((heads, tokens, tokens), (heads, tokens, width)))):
            a, b = (rng.standard_normal(shape).astype(np.float32) for shape in shapes)
            ours = relax_op_kernel(target, relax.op.matmul, [a, b])
            with mock.patch.object(relax_build, "_tile_factors", lambda rows, cols, lanes: (1, 1)):
                unpadded = relax_op_kernel(target, relax.op.matmul, [a, b])
            graph = helper.make_graph(
                [helper.make_node("MatMul", ["a", "b"], ["y"])], "matmul",
                [helper.make_tensor_value_info(name, TensorProto.FLOAT, v.shape) for name, v in (("a", a), ("b", b))],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
            session = ort_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), threads)
            calls = {"ours": ours, "other": unpadded, "ort": lambda s=session, a=a, b=b: s.run(None, {"a": a, "b": b})}
            print_against_ours(f"{product} | {heads}x{tokens}x{width}", calls, rounds, number)


# channels, map height and width, stride: the bundled CNN's; MobileNetV2's depthwise convs at 224 pixels
DEPTHWISE_SHAPES = [(64, 8, 8, 1), (144, 56, 56, 1), (192, 28, 28, 1), (576, 14, 14, 1), (960, 7, 7, 1),
                    (144, 56, 56, 2)]
# ... and small maps, whose padded copy per channel is under PAD_CHUNK_BYTES; a strided one (not chunked)
PADDING_SHAPES = [(64, 8, 8, 1), (96, 4, 4, 1), (256, 14, 14, 1), (576, 14, 14, 1), (960, 7, 7, 1), (576, 14, 14, 2)]


def bench_depthwise(target, rounds: int, number: int, threads: int) -> None:
    """3x3 depthwise convs (bias and ReLU fused) as the artifacts' pipeline builds them: widened to whole
    register tiles and sliced back (`relax_build._widen_grouped_convs`), against the same conv not widened
    and onnxruntime's."""
    _depthwise_table(target, rounds, number, threads, DEPTHWISE_SHAPES, "widened to whole tiles or not",
                     "not widened", lambda build: build(widen=False))


def bench_padding(target, rounds: int, number: int, threads: int) -> None:
    """3x3 depthwise convs as the artifacts' pipeline builds them: their padded input copied several
    channels at a time where one channel's copy is small (`relax_build._pad_chunks`), against the same
    conv padded one channel at a time (PAD_CHUNK_BYTES 0), and onnxruntime's."""
    from unittest import mock

    from pruneaug.codegen import relax_build

    def per_channel(build):
        with mock.patch.object(relax_build, "PAD_CHUNK_BYTES", 0):
            return build(widen=True)

    _depthwise_table(target, rounds, number, threads, PADDING_SHAPES, "padded copies in chunks or per channel",
                     "per channel", per_channel)


def _depthwise_table(target, rounds: int, number: int, threads: int, shapes, title: str, other: str,
                     build_other: Callable) -> None:
    """One table: per shape ours (the artifacts' pipeline), `build_other(build)` and onnxruntime, where
    `build(widen)` makes the conv's kernel, widened (`relax_build._widen_grouped_convs`) or not."""
    from tvm import relax

    from pruneaug.codegen.relax_build import _vector_lanes, _widen_grouped_convs

    print(f"\n## Depthwise 3x3 conv + bias + ReLU, x86 host, {threads} threads: {title}, onnxruntime")
    print(f"| channels x map, stride | ours µs | {other} µs | ort µs | {other}/ours | ort/ours |")
    print("|---|---|---|---|---|---|")

    def widened(mod, t):
        return _widen_grouped_convs(mod, _vector_lanes(t))

    rng = np.random.default_rng(0)
    for channels, height, width, stride in shapes:
        x = rng.standard_normal((1, channels, height, width)).astype(np.float32)
        w = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32)
        b = rng.standard_normal(channels).astype(np.float32)

        def op(v, w, b, stride=stride, groups=channels):
            return relax.op.nn.relu(relax.op.add(relax.op.nn.conv2d(v, w, stride, 1, groups=groups), b))

        session = ort_session(one_node_model("Conv", x.shape, w, b, pads=[1, 1, 1, 1], strides=[stride, stride],
                                             group=channels), threads)
        inputs = [x, w, b.reshape(1, channels, 1, 1)]

        def build(widen: bool, op=op, inputs=inputs):
            return relax_op_kernel(target, op, inputs, widened if widen else None)

        calls = {"ours": build(widen=True), "other": build_other(build),
                 "ort": lambda s=session, x=x: s.run(None, {"x": x})}
        print_against_ours(f"{channels}x{height}x{width}, {stride}", calls, rounds, number)


# Cin, Cout, map, kernel side, stride, pad, output padding: U-Net's 2x2 upsampling convs at 224 pixels; DCGAN's
# 4x4 stride-2 ones; a 3x3 stride-2 one that doubles its map (segmentation decoders); HiFi-GAN's 1-D upsampling
CONV_TRANSPOSES = [(64, 32, (56, 56), 2, 2, 0, 0), (128, 64, (28, 28), 2, 2, 0, 0), (256, 128, (14, 14), 2, 2, 0, 0),
                   (512, 256, (7, 7), 2, 2, 0, 0), (256, 128, (14, 14), 4, 2, 1, 0), (128, 64, (16, 16), 4, 2, 1, 0),
                   (64, 32, (56, 56), 3, 2, 1, 1), (512, 256, (64,), 16, 8, 4, 0), (256, 128, (512,), 16, 8, 4, 0)]


def model_call(target, model, x: np.ndarray, rewrite: bool = True) -> Callable[[], object]:
    """The compiled function of `model` built as the artifacts are (`build_model`; with `rewrite` False,
    ConvTranspose left to TVM), called on `x` through the Relax VM (a model's kernels and what runs between
    them)."""
    from unittest import mock

    import tvm
    from tvm import relax

    from pruneaug.codegen import relax_build
    from pruneaug.codegen.workspace import WORKSPACE_FUNCTION, has_workspace

    keep = mock.patch.object(relax_build, "_transposed_convs_as_convs", lambda mod: mod)
    with keep if not rewrite else contextlib.nullcontext():
        executable = relax_build.build_model(model, {}, target, {"x": list(x.shape)})
    vm = relax.VirtualMachine(executable, tvm.cpu())
    workspace = list(vm[WORKSPACE_FUNCTION]()) if has_workspace(target) else []
    vm.save_function("main", "bench_main", tvm.runtime.tensor(x), *workspace)
    func = vm["bench_main"]
    return lambda: func()


def bench_conv_transpose(target, rounds: int, number: int, threads: int) -> None:
    """ConvTranspose as the artifacts build it (`relax_build._transposed_convs_as_convs`: one conv of its output
    phases in our dense kernel, then depth-to-space) against TVM's own conv2d_transpose and onnxruntime's."""
    print(f"\n## ConvTranspose with bias, x86 host, {threads} threads: a conv of its output phases and "
          "depth-to-space, TVM's conv2d_transpose, onnxruntime")
    print("| ConvTranspose | ours µs | TVM's µs | ort µs | TVM's/ours | ort/ours |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for c_in, c_out, spatial, k, stride, pad, extra in CONV_TRANSPOSES:
        x = rng.standard_normal((1, c_in, *spatial)).astype(np.float32)
        w = rng.standard_normal((c_in, c_out, *[k] * len(spatial))).astype(np.float32)
        model = one_node_model("ConvTranspose", x.shape, w, rng.standard_normal(c_out).astype(np.float32),
                               strides=[stride] * len(spatial), pads=[pad] * 2 * len(spatial),
                               output_padding=[extra] * len(spatial))
        session = ort_session(model, threads)
        calls = {"ours": model_call(target, model, x), "other": model_call(target, model, x, rewrite=False),
                 "ort": lambda s=session, x=x: s.run(None, {"x": x})}
        sides = "x".join(map(str, spatial)), "x".join([str(k)] * len(spatial))
        print_against_ours(f"{c_in}->{c_out} {sides[0]}, {sides[1]}/{stride}", calls, rounds, number)


DENSE_MATMULS = [(1, 768, 3072), (16, 768, 768), (128, 768, 768), (128, 3072, 768)]  # m, out, in
DENSE_CONVS = [*CONVS,  # and the rest of ResNet's 3x3 convs and a bottleneck's 1x1 convs
               ("3x3 128->128 28x28", (1, 128, 28, 28), 128, (3, 3), (1, 1, 1, 1)),
               ("1x1 64->256 56x56", (1, 64, 56, 56), 256, (1, 1), (0, 0, 0, 0))]


def bench_dense(target, rounds: int, number: int, threads: int) -> None:
    """The dense kernels (the BSR kernel with every block kept) in the default `schedule.DENSE_BLOCK` and in
    `WIDE_DENSE_BLOCK`, and onnxruntime: the figures behind `schedule.dense_blocks`. 32x16 ran ResNet's 3x3
    convs 1.13-1.2x faster on 56x56 to 14x14 maps (1.05x slower on 7x7) and a 768x3072 matmul 1.2-1.6x
    faster at m=1, but MobileNetV2 at 224 pixels, dense, 1.58x slower as a whole, so neither serves every
    layer."""
    from pruneaug.codegen.bsr import bsr_conv2d_kernel, bsr_matmul_kernel, to_bsr
    from pruneaug.codegen.schedule import DENSE_BLOCK, WIDE_DENSE_BLOCK

    ours, other = DENSE_BLOCK, WIDE_DENSE_BLOCK
    print(f"\n## Dense kernels, x86 host, {threads} threads: {ours[0]}x{ours[1]} blocks (the dense kernel's), "
          f"{other[0]}x{other[1]}, onnxruntime")
    print("| layer | ours µs | other µs | ort µs | other/ours | ort/ours |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    cases = []
    for m, out, in_ in DENSE_MATMULS:
        x, w = rng.standard_normal((m, in_)).astype(np.float32), rng.standard_normal((out, in_)).astype(np.float32)
        cases.append((f"matmul m={m} {out}x{in_}", x, {block: bsr_matmul_kernel(target, m, to_bsr(w, block))
                                                       for block in (ours, other)},
                      one_node_model("MatMul", x.shape, np.ascontiguousarray(w.T))))
    for label, x_shape, out_c, khw, pads in DENSE_CONVS:
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal((out_c, x_shape[1] * khw[0] * khw[1])).astype(np.float32)
        kernels = {block: bsr_conv2d_kernel(target, x_shape, to_bsr(w, block), khw, (1, 1), pads, (1, 1))
                   for block in (ours, other)}
        cases.append((f"conv {label}", x, kernels,
                      one_node_model("Conv", x_shape, w.reshape(out_c, x_shape[1], *khw), pads=list(pads))))
    for label, x, kernels, model in cases:
        session = ort_session(model, threads)
        calls = {"ours": tvm_call(kernels[ours], target, x), "other": tvm_call(kernels[other], target, x),
                 "ort": lambda s=session, x=x: s.run(None, {"x": x})}
        print_against_ours(label, calls, rounds, number)


STRIDED_CONVS = [  # name, x_shape, Cout, kernel, pads (stride 2): the bundled CNN's, ResNet's downsampling convs
    ("3x3 64->64 8x8", (1, 64, 8, 8), 64, (3, 3), (1, 1, 1, 1)),
    ("7x7 3->64 224x224", (1, 3, 224, 224), 64, (7, 7), (3, 3, 3, 3)),
    ("3x3 64->128 56x56", (1, 64, 56, 56), 128, (3, 3), (1, 1, 1, 1)),
    ("1x1 64->128 56x56", (1, 64, 56, 56), 128, (1, 1), (0, 0, 0, 0)),
    ("3x3 128->256 28x28", (1, 128, 28, 28), 256, (3, 3), (1, 1, 1, 1)),
    ("1x1 128->256 28x28", (1, 128, 28, 28), 256, (1, 1), (0, 0, 0, 0)),
    ("3x3 256->512 14x14", (1, 256, 14, 14), 512, (3, 3), (1, 1, 1, 1)),
]
STRIDED_BLOCKS, STRIDED_DENSITY = [(4, 1), (16, 16)], 0.1


def bench_strided(target, rounds: int, number: int, threads: int) -> None:
    """Stride-2 convs as the artifact runs them on CPUs (`conv_lowering.conv_calls`): the stride-phase split,
    then the stride-1 conv over the phases, each timed alone, or the conv alone where it reads X in place at
    the stride; against onnxruntime's dense conv. The split's share says what the split costs a strided layer."""
    from pruneaug.codegen.bsr import random_bsr_weight
    from pruneaug.codegen.conv_lowering import conv_calls

    print(f"\n## Stride-2 convs, x86 host, {threads} threads: the phase split and the conv over the phases "
          f"({1 - STRIDED_DENSITY:.0%} sparse), onnxruntime dense")
    print("| conv | block | split µs | conv µs | ours µs (both) | ort µs | split share | ort/ours |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for (label, x_shape, out_c, khw, pads), block in itertools.product(STRIDED_CONVS, STRIDED_BLOCKS):
        x = rng.standard_normal(x_shape).astype(np.float32)
        weight = random_bsr_weight(out_c, x_shape[1] * khw[0] * khw[1], block, STRIDED_DENSITY, seed=1).to_dense()
        *split, conv = conv_calls(target, x_shape, weight, block, khw, (2, 2), pads, (1, 1))
        session = ort_session(one_node_model("Conv", x_shape, weight.reshape(out_c, x_shape[1], *khw), pads=list(pads),
                                             strides=[2, 2]), threads)
        calls = {"conv": tvm_call(conv.kernel, target, rng.standard_normal(conv.x_shape).astype(np.float32)),
                 "ort": lambda s=session, x=x: s.run(None, {"x": x})}
        if split:
            calls["split"] = tvm_call(split[0].kernel, target, x)
        t = {name: median for name, (median, _) in summarise(time_interleaved(calls, rounds, number)).items()}
        ours = t.get("split", 0.0) + t["conv"]
        split_us = f"{t['split'] * 1e6:.1f}" if split else "in place"
        print(f"| {label} | {block[0]}x{block[1]} | {split_us} | {t['conv'] * 1e6:.1f} | {ours * 1e6:.1f} "
              f"| {t['ort'] * 1e6:.1f} | {t.get('split', 0.0) / ours:.0%} | {t['ort'] / ours:.2f}x |", flush=True)


def bench_conv(target, rounds: int, number: int, threads: int, blocks) -> None:
    from pruneaug.codegen.bsr import bsr_conv2d_kernel, random_bsr_weight
    from pruneaug.codegen.conv import conv_geometry
    from pruneaug.codegen.schedule import conv_schedule

    print(f"\n## Conv, N=1, 90% block sparsity, x86 host, {threads} threads (TVM_NUM_THREADS={threads}, "
          f"ort intra_op={threads}); * = the layout the schedule picks")
    print("| conv | block | " + " | ".join(f"{layout} µs" for layout in CONV_LAYOUTS) + " | ort dense µs | "
          + " | ".join(f"ort/{layout} (median)" for layout in CONV_LAYOUTS) + " | ort/picked (min) |")
    print("|---|---|" + "---|" * (2 * len(CONV_LAYOUTS) + 2))
    rng = np.random.default_rng(0)
    for label, x_shape, out_c, khw, pads in CONVS:
        x = rng.standard_normal(x_shape).astype(np.float32)
        geo = conv_geometry(x_shape, khw, (1, 1), pads, (1, 1))
        for block in blocks:
            picked = conv_schedule(target, (geo.out_h, geo.out_w), block, geo.out_h * geo.out_w, 1).layout
            weight = random_bsr_weight(out_c, x_shape[1] * khw[0] * khw[1], block, 0.1, seed=1)
            w4 = weight.to_dense().reshape(out_c, x_shape[1], *khw)
            session = ort_session(one_node_model("Conv", x_shape, w4, pads=list(pads)), threads)
            calls = {layout: tvm_call(bsr_conv2d_kernel(target, x_shape, weight, khw, (1, 1), pads, (1, 1),
                                                        layout=layout), target, x) for layout in CONV_LAYOUTS}
            calls["ort"] = lambda s=session: s.run(None, {"x": x})
            t = summarise(time_interleaved(calls, rounds, number))
            times = " | ".join(f"{t[layout][0] * 1e6:.0f}{'*' if layout == picked else ''}" for layout in CONV_LAYOUTS)
            ratios = " | ".join(f"{t['ort'][0] / t[layout][0]:.2f}x" for layout in CONV_LAYOUTS)
            print(f"| {label} | {block[0]}x{block[1]} | {times} | {t['ort'][0] * 1e6:.0f} | {ratios} "
                  f"| {t['ort'][1] / t[picked][1]:.2f}x |", flush=True)


def baked_rowvec_kernel(m: int, weight, m_tile: int):
    """The rowvec kernel with the sparsity pattern baked in: per block row, its kept blocks' column
    offsets and data positions as constants, fully unrolled (TVMScript text, parsed). The issue asks
    whether specialising on the pattern beats runtime index arrays; this measures it."""
    from tvm.script import from_source

    from pruneaug.codegen.bsr import Kernel

    (out, in_), (r, c) = weight.shape, weight.block
    assert out % r == 0 and m % m_tile == 0, "kept simple: no ragged edges"
    lines = [
        "@T.prim_func",
        f"def baked(X: T.Buffer(({m}, {in_}), 'float32'), data: T.Buffer(({weight.nnz_blocks}, {c}, {r}), "
        f"'float32'), Y: T.Buffer(({m}, {out}), 'float32')):",
        "    T.func_attr({'tirx.noalias': True})",
        f"    for i in T.parallel({weight.block_rows}):",
        f"        for mo in range({m // m_tile}):",
        f"            acc = T.alloc_buffer(({m_tile}, {r}), 'float32', scope='global')",
        f"            for mi, rr in T.grid({m_tile}, {r}):",
        "                acc[mi, rr] = T.float32(0)",
    ]
    for row in range(weight.block_rows):
        lines.append(f"            {'if' if row == 0 else 'elif'} i == {row}:")
        lines.append("                T.evaluate(0)")
        for b in range(weight.indptr[row], weight.indptr[row + 1]):
            lines += [f"                for k in T.unroll({c}):",
                      f"                    for mi in T.unroll({m_tile}):",
                      f"                        for rr in T.vectorized({r}):",
                      f"                            acc[mi, rr] = acc[mi, rr] + X[mo * {m_tile} + mi, "
                      f"{int(weight.indices[b]) * c} + k] * data[{b}, k, rr]"]
    lines += [f"            for mi in T.unroll({m_tile}):",
              f"                for rr in T.vectorized({r}):",
              f"                    Y[mo * {m_tile} + mi, i * {r} + rr] = acc[mi, rr]"]
    func = from_source("\n".join(lines)).with_attr("global_symbol", "baked")
    return Kernel(func, "baked", [np.ascontiguousarray(weight.data.transpose(0, 2, 1))])


def bench_baked(target, m: int, rounds: int, number: int) -> None:
    from pruneaug.codegen.bsr import bsr_matmul_kernel, random_bsr_weight

    print("\n## Pattern baked into the code vs read at run time (90% sparsity)")
    print("| W | block | runtime index µs | baked µs | baked compile s |")
    print("|---|---|---|---|---|")
    for (out, in_), block, m_tile in [((1536, 384), (32, 32), 2), ((1536, 384), (16, 16), 4),
                                      ((384, 1536), (16, 16), 4)]:
        weight = random_bsr_weight(out, in_, block, 0.1, seed=1)
        x = np.random.default_rng(0).standard_normal((m, in_)).astype(np.float32)
        start = time.perf_counter()
        baked = tvm_call(baked_rowvec_kernel(m, weight, m_tile), target, x)
        compile_s = time.perf_counter() - start
        calls = {"runtime": tvm_call(bsr_matmul_kernel(target, m, weight), target, x), "baked": baked}
        t = summarise(time_interleaved(calls, rounds, number))
        print(f"| {out}x{in_} | {block[0]}x{block[1]} | {t['runtime'][0] * 1e6:.0f} | {t['baked'][0] * 1e6:.0f} "
              f"| {compile_s:.0f} |", flush=True)


PARTS = ["all", "matmul", "conv", "parallel", "norm", "mean", "softmax", "elementwise", "pool", "attention",
         "depthwise", "padding", "dense", "strided", "convtranspose"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--number", type=int, default=5)
    parser.add_argument("--m", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="two blocks, 90%% only, few rounds")
    parser.add_argument("--baked", action="store_true", help="only: pattern baked in vs runtime index arrays")
    parser.add_argument("--part", choices=PARTS, default="all", help="which tables to run")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall clock, or the calling thread's CPU time (needs --threads 1)")
    args = parser.parse_args()
    if args.clock == "thread":
        if args.threads != 1:
            parser.error("--clock thread needs --threads 1 (other threads' work would not be counted)")
        global CLOCK
        CLOCK = time.thread_time
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pruneaug.cost_model.targets import resolve_target

    target = resolve_target("x86")
    if args.quick:
        args.rounds = min(args.rounds, 10)
    print(f"target {target.tvm_target}, simd {target.simd_bytes} bytes; rounds {args.rounds} x {args.number} calls; "
          f"clock: {'thread CPU time' if args.clock == 'thread' else 'wall'}")
    if args.baked:
        bench_baked(target, args.m, args.rounds, args.number)
        return
    blocks = [(1, 1), (16, 16)] if args.quick else BLOCKS
    densities = [0.1] if args.quick else [0.1, 0.5]
    if args.part in ("all", "matmul"):
        bench_matmul(target, args.m, args.rounds, args.number, args.threads, blocks, densities)
    if args.part in ("all", "conv"):
        bench_conv(target, args.rounds, args.number, args.threads, [(8, 8)] if args.quick else CONV_BLOCKS)
    # the parts that take only the timing settings
    tables = {"parallel": bench_parallel, "norm": bench_norm, "mean": bench_mean, "softmax": bench_softmax,
              "elementwise": bench_elementwise, "pool": bench_pool,
              "attention": bench_attention, "depthwise": bench_depthwise, "padding": bench_padding,
              "dense": bench_dense, "strided": bench_strided, "convtranspose": bench_conv_transpose}
    for part, table in tables.items():
        if args.part in ("all", part):
            table(target, args.rounds, args.number, args.threads)


if __name__ == "__main__":
    main()
