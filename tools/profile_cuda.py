"""Where a CUDA artifact's run goes: its GPU kernels, their time per run, and the host's launch time.

    python tools/profile_cuda.py out/cnn-b1 [out/encoder-b1 ...] [--calib calib.npz] [--runs 50] [--top 12]

Needs a CUDA GPU, TVM's runtime and torch: torch's profiler reads TVM's kernels through CUPTI, since
they run in the same process. Prints, per artifact, the median run (TVM's timer), the GPU busy time
per run, and a Markdown table of the kernels and runtime calls that take the most time per run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profile_folder(folder: Path, calib: dict | None, runs: int, top: int) -> None:
    import onnx
    import torch

    from pruneaug.deploy import sample_inputs
    from pruneaug.runtime import load, read_signature

    artifact = folder / "model.cuda.so"
    signature = read_signature(artifact)
    inputs = sample_inputs(onnx.load(folder / "pruned.onnx"),
                           {value["name"]: value["shape"] for value in signature["inputs"]}, calib)
    model = load(artifact, "cuda")
    median = float(np.median(model.time_runs(inputs, 200)))
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        model.time_runs(inputs, runs)
    kernels = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(event.device_time for event in kernels) / runs
    print(f"\n## {folder}: median run {median * 1e6:.1f} µs; {len(kernels) / runs:.0f} GPU kernels per run, "
          f"busy {busy:.1f} µs of GPU time per run")
    print("| kernel or call | calls per run | host µs per run | GPU µs per run |")
    print("|---|---:|---:|---:|")
    rows = sorted(profiler.key_averages(), key=lambda row: -max(row.cpu_time_total, row.device_time_total))
    for row in rows[:top]:
        print(f"| {row.key[:80]} | {row.count / runs:.1f} | {row.cpu_time_total / runs:.1f} "
              f"| {row.device_time_total / runs:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="compile output folders with model.cuda.so")
    parser.add_argument("--calib", type=Path, help=".npz of inputs (the compile's --calib)")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    from pruneaug.runtime import has_cuda_gpu

    if not has_cuda_gpu():
        sys.exit("profile_cuda: no CUDA GPU here (or TVM's runtime was built without CUDA)")
    calib = dict(np.load(args.calib)) if args.calib else None
    for folder in args.folders:
        profile_folder(folder, calib, args.runs, args.top)


if __name__ == "__main__":
    main()
