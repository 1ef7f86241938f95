"""How long the full compile (search + codegen) takes on a BERT-base-sized encoder, cold and with a warm cache.

    python tools/bench_compile_time.py [--layers 12 --hidden 768 --seq 128]

Random weights and inputs (timing only): the encoder of tools/encoder_graph.py (static batch 1), one
calibration and one evaluation sequence of `--seq` tokens, `--metric cosine --budget 0.01`. The first compile runs against an empty
latency cache (it measures every kernel it needs), the second against the cache the first filled (which
also holds the first compile's layer sensitivities: the second reads them instead of probing again).
Each compile is the CLI in a fresh process, as a user runs it (TVM's import included in the total).
Prints wall-clock seconds per phase as plan.json records them, the kernels measured and the validations.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_graph import encoder, random_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--no-artifact", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pruneaug-compile-time-"))
    model = encoder(args.hidden, args.ffn, args.layers, args.seq, args.heads, random_weights(0))
    onnx.save(model, work / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    name = model.graph.input[0].name
    rng = np.random.default_rng(0)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    for split in ("calib", "eval"):
        np.savez(work / f"{split}.npz", **{name: rng.standard_normal(shape).astype(np.float32)})
    print(f"encoder: {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, seq {args.seq}; "
          f"{len(os.sched_getaffinity(0))} cores; work folder {work}")
    rows = []
    for run in ("cold", "warm"):
        command = [sys.executable, "-m", "pruneaug.compile", str(work / "model.onnx"), "--calib", str(work / "calib.npz"),
                   "--eval", str(work / "eval.npz"), "--metric", "cosine", "--budget", "0.01", "--out", str(work / run),
                   *(["--no-artifact"] if args.no_artifact else [])]
        started = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "PRUNEAUG_CACHE": str(work / "latency.sqlite")})
        rows.append((run, time.perf_counter() - started, json.loads((work / run / "plan.json").read_text())))
        print(f"{run} compile done in {rows[-1][1]:.1f} s", flush=True)
    phases = list(dict.fromkeys(phase for _, _, plan in rows for phase in plan["phase_seconds"]))
    print(f"\n| run | total s | {' | '.join(f'{p} s' for p in phases)} | search s | kernels measured | sensitivities "
          f"| validations run | recalled | speed-up (pred.) |")
    print("|---|---:|" + "---:|" * len(phases) + "---:|---:|---|---:|---:|---:|")
    for run, total, plan in rows:
        search = plan["search"]
        speedup = search["dense_latency_s"] / search["predicted_latency_s"]
        cells = " | ".join(f"{plan['phase_seconds'].get(p, 0.0):.1f}" for p in phases)
        print(f"| {run} | {total:.1f} | {cells} | {search['time_s']:.1f} | {search['kernels_measured']} | "
              f"{search['sensitivities']} | {search['validations_total']} | {search.get('recalled_total', 0)} | "
              f"{speedup:.2f}x |")


if __name__ == "__main__":
    main()
