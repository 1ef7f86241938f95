"""Block-sparse CUDA kernels against cuBLAS dense (through torch), torch's own BSR product and TVM dense.

    python tools/bench_cuda.py [--target cuda:sm_90] [--part matmul conv] [--m 1 16 128 2048] [--rounds 20]
        [--number 50]

Needs a CUDA GPU, TVM with its compiler (the kernels are built here) and torch (`pip install -e
".[train]"`). On a GPU users would run the dense layer with cuBLAS, so torch's float32 `x @ W.T`
(TF32 off: the same float32 arithmetic as ours) is the baseline. Every figure is GPU time from the
device's own timer: TVM's `time_evaluator` for TVM's kernels, CUDA events for torch's, `number` calls
per sample; a row's competitors take turns round by round and a figure is the median over rounds.
Ratios are cuBLAS / competitor (higher is better). Both layouts of our matmul are timed, threads
along m ("along m") and a warp splitting each block row's columns ("split"); "ours" is the one
`schedule.kernel_schedule` picks. The conv part does the same against cuDNN's float32 conv (torch),
with the layout `schedule.conv_schedule` picks ("along m": a thread per output channel and pixel).
Prints Markdown tables.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MATMUL_SHAPES = [(1536, 384), (384, 1536), (3072, 768), (768, 3072)]  # W[out, in]
BLOCKS = [(1, 1), (4, 4), (8, 8), (16, 16), (32, 32)]
DENSITIES = [0.1, 0.5]
LAYOUTS = {"cuda": "along m", "cuda_split": "split"}  # `schedule.kernel_schedule`'s CUDA layouts


def tvm_timer(kernel, target, x: np.ndarray, number: int) -> Callable[[], float]:
    """Seconds per call of a compiled TVM kernel, from TVM's device timer."""
    import tvm

    from pruneaug.codegen.bsr import compile_kernel, kernel_arguments

    module = compile_kernel(kernel, target)
    args = kernel_arguments(kernel, x, tvm.cuda(0))
    evaluator = module.time_evaluator(kernel.name, tvm.cuda(0), number=number, repeat=1)
    return lambda: float(evaluator(*args).mean)


def torch_timer(call: Callable[[], object], number: int) -> Callable[[], float]:
    """Seconds per call of a torch CUDA call, from CUDA events around `number` calls."""
    import torch

    def sample() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number

    return sample


def median_per_call(timers: dict[str, Callable[[], float] | None], rounds: int) -> dict[str, float | None]:
    """Median over `rounds` of each timer's figure, the timers taking turns (a warm-up sample first)."""
    live = {name: timer for name, timer in timers.items() if timer is not None}
    for timer in live.values():
        timer()
    samples: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(rounds):
        for name, timer in live.items():
            samples[name].append(timer())
    return {name: statistics.median(samples[name]) if name in samples else None for name in timers}


def torch_bsr_call(w2d: np.ndarray, block: tuple[int, int], x_t):
    """torch's BSR product `W @ X.T` on the GPU, or None where torch has none for this block."""
    import torch

    try:
        w = torch.from_numpy(w2d).cuda().to_sparse_bsr(block)
        w @ x_t  # noqa: B018 - raises here when torch has no kernel for this layout
    except (RuntimeError, NotImplementedError, ValueError):
        return None
    return lambda: w @ x_t


def bench_matmul(target, ms: list[int], rounds: int, number: int) -> None:
    import torch

    from pruneaug.codegen.bsr import bsr_matmul_kernel, dense_matmul_kernel, random_bsr_weight
    from pruneaug.codegen.schedule import kernel_schedule

    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"\n## MatMul on {torch.cuda.get_device_name(0)}, target {target.name}, float32; "
          f"median of {rounds} rounds of {number} calls, GPU time")
    print("| m | W (out x in) | sparsity | block | along m µs | split µs | ours | cuBLAS µs | torch BSR µs "
          "| TVM dense µs | cuBLAS/ours | cuBLAS/torch BSR |")
    print("|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for m in ms:
        for out, in_ in MATMUL_SHAPES:
            x = rng.standard_normal((m, in_)).astype(np.float32)
            dense_w = rng.standard_normal((out, in_)).astype(np.float32)
            x_gpu = torch.from_numpy(x).cuda()
            w_gpu = torch.from_numpy(dense_w).cuda()
            dense_timers = {"cublas": torch_timer(lambda: x_gpu @ w_gpu.T, number),
                            "tvm_dense": tvm_timer(dense_matmul_kernel(target, m, dense_w), target, x, number)}
            for density in DENSITIES:
                for block in BLOCKS:
                    weight = random_bsr_weight(out, in_, block, density, seed=1)
                    bsr_call = torch_bsr_call(weight.to_dense(), block, x_gpu.T.contiguous())
                    t = median_per_call({
                        **{layout: tvm_timer(bsr_matmul_kernel(target, m, weight, layout=layout), target, x, number)
                           for layout in LAYOUTS},
                        **dense_timers,
                        "torch_bsr": torch_timer(bsr_call, number) if bsr_call else None,
                    }, rounds)
                    picked = kernel_schedule(target, m, out, in_, block, weight.nnz_blocks).layout
                    ours = t[picked]
                    torch_bsr = f"{t['torch_bsr'] * 1e6:.1f}" if t["torch_bsr"] else "n/a"
                    torch_ratio = f"{t['cublas'] / t['torch_bsr']:.2f}x" if t["torch_bsr"] else "n/a"
                    print(f"| {m} | {out}x{in_} | {1 - density:.0%} | {block[0]}x{block[1]} "
                          f"| {t['cuda'] * 1e6:.1f} | {t['cuda_split'] * 1e6:.1f} | {LAYOUTS[picked]} "
                          f"| {t['cublas'] * 1e6:.1f} | {torch_bsr} | {t['tvm_dense'] * 1e6:.1f} "
                          f"| {t['cublas'] / ours:.2f}x | {torch_ratio} |", flush=True)


CONV_CASES = [  # (x shape N,C,H,W, out channels, kernel, stride, pad): the bundled CNN's 3x3s, ResNet-style ones
    ((1, 32, 8, 8), 64, 3, 1, 1), ((1, 64, 8, 8), 64, 3, 2, 1), ((32, 32, 8, 8), 64, 3, 1, 1),
    ((32, 64, 8, 8), 64, 3, 2, 1), ((1, 64, 56, 56), 64, 3, 1, 1), ((1, 256, 56, 56), 64, 1, 1, 0),
]


def bench_conv(target, rounds: int, number: int) -> None:
    """Our conv in both CUDA layouts against cuDNN's float32 conv (torch) and our dense conv."""
    import torch
    import torch.nn.functional as F

    from pruneaug.codegen.bsr import bsr_conv2d_kernel, random_bsr_weight, to_bsr
    from pruneaug.codegen.schedule import DENSE_BLOCK, conv_schedule
    from pruneaug.cost_model.conv_shape import ConvShape

    torch.backends.cudnn.allow_tf32 = False
    print(f"\n## Conv on {torch.cuda.get_device_name(0)}, target {target.name}, float32; "
          f"median of {rounds} rounds of {number} calls, GPU time")
    print("| x (NCHW) | out | kernel, stride | sparsity | block | along m µs | split µs | ours | cuDNN µs "
          "| our dense µs | cuDNN/ours |")
    print("|---|---|---|---|---|---:|---:|---|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for x_shape, out_c, k, stride, pad in CONV_CASES:
        x = rng.standard_normal(x_shape).astype(np.float32)
        geometry = ((k, k), (stride, stride), (pad, pad, pad, pad), (1, 1))
        conv = ConvShape(out_c, x_shape, *geometry)
        _, cols, pixels = conv.matmul

        def ours(weight, layout=None):
            return tvm_timer(bsr_conv2d_kernel(target, x_shape, weight, *geometry, layout=layout), target, x, number)

        x_gpu = torch.from_numpy(x).cuda()
        dense_w = rng.standard_normal((out_c, cols)).astype(np.float32)
        w_gpu = torch.from_numpy(dense_w.reshape(out_c, x_shape[1], k, k)).cuda()
        base = {"cudnn": torch_timer(lambda: F.conv2d(x_gpu, w_gpu, stride=stride, padding=pad), number),
                "dense": ours(to_bsr(dense_w, DENSE_BLOCK))}
        for density in DENSITIES:
            for block in BLOCKS:
                weight = random_bsr_weight(out_c, cols, block, density, seed=1)
                t = median_per_call({**{layout: ours(weight, layout) for layout in LAYOUTS}, **base}, rounds)
                picked = conv_schedule(target, conv.out_hw, block, pixels, weight.nnz_blocks, out_c=out_c,
                                       kernel_hw=conv.kernel).layout
                print(f"| {'x'.join(map(str, x_shape))} | {out_c} | {k}x{k}, {stride} | {1 - density:.0%} "
                      f"| {block[0]}x{block[1]} | {t['cuda'] * 1e6:.1f} | {t['cuda_split'] * 1e6:.1f} "
                      f"| {LAYOUTS[picked]} | {t['cudnn'] * 1e6:.1f} | {t['dense'] * 1e6:.1f} "
                      f"| {t['cudnn'] / t[picked]:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cuda:sm_90")
    parser.add_argument("--m", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--number", type=int, default=50)
    parser.add_argument("--part", nargs="+", choices=["matmul", "conv"], default=["matmul", "conv"])
    args = parser.parse_args()

    from pruneaug.cost_model.targets import resolve_target
    from pruneaug.runtime import has_cuda_gpu

    if not has_cuda_gpu():
        sys.exit("bench_cuda: no CUDA GPU here (or TVM's runtime was built without CUDA)")
    target = resolve_target(args.target)
    if "matmul" in args.part:
        bench_matmul(target, args.m, args.rounds, args.number)
    if "conv" in args.part:
        bench_conv(target, args.rounds, args.number)


if __name__ == "__main__":
    main()
