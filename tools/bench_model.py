"""End-to-end latency of a BERT-style encoder: onnxruntime vs our TVM build, dense and block-sparse.

    python tools/bench_model.py                       # hidden 768, FFN 3072, 4 layers, seq 128, batch 1
    python tools/bench_model.py --layers 1 --rounds 5 # a quick look

Competitors: (a) onnxruntime on the dense model, (b) onnxruntime on the pruned model (its zeros do
not make it faster, but it is the model users would otherwise run), (c) our dense build, (d) our build
with every linear layer block-sparse. Our builds are exported and loaded with `pruneaug.load`; each
competitor runs in its own process, driven interleaved round by round by `pruneaug.timing` (so that
load from other processes hits them alike and no runtime's spinning threads take another's cores),
all with the same thread count (TVM_NUM_THREADS; onnxruntime intra_op_num_threads, spinning off).
Weights are random: latency does not depend on their values, only on the pruned blocks' count.
Prints a Markdown table; the ratio is speed-up over (a).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_graph import encoder, random_weights  # noqa: E402


def prune_linears(model: onnx.ModelProto, block: tuple[int, int], sparsity: float) -> tuple[onnx.ModelProto, dict]:
    """Every `.weight` initializer pruned by magnitude at `sparsity` in `block`s of its canonical view W = B.T."""
    from pruneaug.ir.layer import BlockSpec
    from pruneaug.passes.blockmask import layer_mask

    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    blocks = {}
    for init in pruned.graph.initializer:
        if init.name.endswith(".weight"):
            w = numpy_helper.to_array(init).T  # MatMul B[K, N] -> W[N, K]
            mask = layer_mask(np.abs(w), BlockSpec(block[0], block[1], sparsity))
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(np.where(mask, w, 0).T), init.name))
            blocks[init.name] = block
    return pruned, blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--block", default="16x16")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10,
                        help="interleaved rounds; each runs every competitor --runs times")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's thread pool starts

    from pruneaug.codegen.export import export_artifact, model_signature
    from pruneaug.codegen.relax_build import build_model, check_against_onnxruntime
    from pruneaug.cost_model.targets import resolve_target
    from pruneaug.timing import Competitor, time_interleaved

    block = tuple(int(side) for side in args.block.split("x"))
    dense = encoder(args.hidden, args.ffn, args.layers, args.seq, args.heads, random_weights(0))
    pruned, blocks = prune_linears(dense, block, args.sparsity)
    inputs = {"input": np.random.default_rng(1).standard_normal((1, args.seq, args.hidden)).astype(np.float32)}
    target = resolve_target("x86")

    with tempfile.TemporaryDirectory(prefix="bench-model-") as folder:
        competitors, compile_s = [], {}
        for label, name, model in (("(a) onnxruntime, dense", "dense", dense),
                                   ("(b) onnxruntime, pruned model", "pruned", pruned)):
            onnx.save(model, Path(folder) / f"{name}.onnx")
            competitors.append(Competitor(label, "onnxruntime", Path(folder) / f"{name}.onnx"))
        ours = (("(c) ours, dense", "ours-dense", dense, {}),
                (f"(d) ours, {args.block} at {args.sparsity:.0%}", "ours-sparse", pruned, blocks))
        for label, name, model, sparse in ours:
            start = time.perf_counter()
            executable = build_model(model, sparse, target)
            compile_s[label] = time.perf_counter() - start
            check_against_onnxruntime(executable, model, inputs, sparse_weights=sparse, target=target)
            artifact = export_artifact(executable, target, Path(folder) / name, model_signature(model))
            competitors.append(Competitor(label, "artifact", artifact))
        run = time_interleaved(competitors, inputs, args.threads, rounds=args.rounds, runs=args.runs)

    base = run.results["(a) onnxruntime, dense"].median_s
    print(f"BERT-style encoder: hidden {args.hidden}, FFN {args.ffn}, {args.layers} layers, seq {args.seq}, batch 1; "
          f"{run.method()}; host {target.tvm_target.get('mcpu')}\n")
    print("| competitor | median ms | p10 ms | p90 ms | speed-up vs (a) | compile s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, timing in run.results.items():
        compiled = f"{compile_s[label]:.1f}" if label in compile_s else ""
        if timing.error:
            print(f"| {label} | failed: {timing.error} | | | | {compiled} |")
            continue
        ratio = f"{base / timing.median_s:.2f}x" if base else "–"
        print(f"| {label} | {timing.median_s * 1e3:.2f} | {timing.p10_s * 1e3:.2f} | {timing.p90_s * 1e3:.2f} | "
              f"{ratio} | {compiled} |")

if __name__ == "__main__":
    main()
