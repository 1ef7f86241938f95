"""Whole CUDA artifacts against the dense model in PyTorch on the same GPU.

    python tools/bench_cuda_model.py --dense examples/cnn/model.onnx out/cnn-b1 [out/cnn-b32 ...]
        [--rounds 20] [--number 50]

Needs a CUDA GPU, TVM's runtime (not its compiler: the artifacts are built elsewhere, e.g. with
`python -m pruneaug.compile ... --target cuda:sm_90`), torch and onnx2torch (`pip install -e ".[gpu-bench]"`).

On a GPU users would not run onnxruntime's CPU build, so the baseline is the dense ONNX model converted
to torch by onnx2torch and run by cuBLAS/cuDNN in float32 (TF32 off: the same arithmetic as ours):
"torch eager" as it comes, and "torch graph" with its launches captured in a CUDA graph, which takes
the per-op launch cost out and is the stronger competitor (our artifacts replay a CUDA graph too).
Before timing, each artifact's output is checked against `pruned.onnx` in onnxruntime with the
compile's gate tolerance, and torch's against the dense model in onnxruntime (the gate's relative
error, `gate.relative_error`). Every figure is the median over rounds of GPU time per call (CUDA
events around `number` calls; TVM's time evaluator for ours), the competitors taking turns round by
round. Ratios are baseline / ours (higher is better).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cuda import median_per_call, torch_timer  # noqa: E402


def torch_dense(dense_file: Path, inputs: dict[str, np.ndarray]):
    """(eager call, CUDA-graph replay, first output as numpy) of the dense ONNX model in torch."""
    import onnx
    import torch
    from onnx2torch import convert

    module = convert(onnx.load(dense_file)).cuda().eval()
    tensors = [torch.from_numpy(np.ascontiguousarray(array)).cuda() for array in inputs.values()]

    def eager():
        with torch.no_grad():
            return module(*tensors)

    side = torch.cuda.Stream()  # warm-up on a side stream before capture, as torch's CUDA graph docs ask
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(side)
    output = eager()
    first = output if isinstance(output, torch.Tensor) else output[0]
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            eager()
    except RuntimeError as err:  # a converted op that reads a tensor's value on the host cannot be captured
        print(f"bench_cuda_model: {dense_file}: torch cannot capture the model in a CUDA graph "
              f"({str(err).splitlines()[0]}); eager only", file=sys.stderr)
        torch.cuda.synchronize()
        return eager, None, first.cpu().numpy()
    return eager, graph.replay, first.cpu().numpy()


def bench_folder(folder: Path, dense_file: Path, calib: dict | None, rounds: int, number: int) -> str:
    """One table row: the artifact in `folder` against the dense model in torch, eager and graph."""
    import onnx

    from pruneaug.deploy import sample_inputs
    from pruneaug.gate import GATE_RTOL, onnxruntime_outputs, output_mismatch, relative_error
    from pruneaug.runtime import load, read_signature

    artifact = folder / "model.cuda.so"
    signature = read_signature(artifact)
    pruned_file = folder / "pruned.onnx"
    pruned = onnx.load(pruned_file)
    inputs = sample_inputs(pruned, {value["name"]: value["shape"] for value in signature["inputs"]}, calib)
    model = load(artifact, "cuda")
    expected = onnxruntime_outputs(pruned_file, inputs)
    mismatch = output_mismatch(pruned, model.run(inputs), expected, GATE_RTOL)
    if mismatch is not None:
        return f"| {folder.name} | output {mismatch[0]!r} differs from onnxruntime's ({mismatch[1]:.2e}): not timed |"
    eager, replay, torch_out = torch_dense(dense_file, inputs)
    torch_error = relative_error(torch_out, onnxruntime_outputs(dense_file, inputs)[0])

    t = median_per_call({"ours": lambda: float(np.median(model.time_runs(inputs, number))),
                         "eager": torch_timer(eager, number),
                         "graph": torch_timer(replay, number) if replay is not None else None}, rounds)
    graph_ratio = f"{t['graph'] / t['ours']:.2f}x" if t["graph"] else "n/a"
    graph = f"{t['graph'] * 1e6:.1f}" if t["graph"] else "n/a"
    graph = f"{graph} | {t['eager'] / t['ours']:.2f}x | {graph_ratio}"
    plan = json.loads((folder / "plan.json").read_text())
    batch = "x".join(str(d) for d in signature["inputs"][0]["shape"])
    return (f"| {folder.name} | {batch} | {plan['totals']['weight_sparsity']:.1%} | {t['ours'] * 1e6:.1f} "
            f"| {t['eager'] * 1e6:.1f} | {graph} | {torch_error:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="compile output folders with model.cuda.so")
    parser.add_argument("--dense", type=Path, required=True, help="the dense ONNX model the folders were compiled from")
    parser.add_argument("--calib", type=Path, help=".npz of inputs (the compile's --calib)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--number", type=int, default=50)
    args = parser.parse_args()

    from pruneaug.runtime import has_cuda_gpu

    if not has_cuda_gpu():
        sys.exit("bench_cuda_model: no CUDA GPU here (or TVM's runtime was built without CUDA)")
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    calib = dict(np.load(args.calib)) if args.calib else None
    print(f"\n## {args.dense} on {torch.cuda.get_device_name(0)}, float32; median of {args.rounds} rounds "
          f"of {args.number} calls, GPU time")
    print("| artifact | input | sparsity | ours µs | torch eager µs | torch graph µs | eager/ours | graph/ours "
          "| torch vs onnxruntime (rel. err) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for folder in args.folders:
        print(bench_folder(folder, args.dense, calib, args.rounds, args.number), flush=True)


if __name__ == "__main__":
    main()
