"""Run a compile's artifact on the machine it was built for: the correctness gate, then its latency.

    python tools/check_artifact.py out/ [--calib calib.npz] [--repeat 200]

For a target the compiling machine cannot run (cuda without a GPU there, arm64), the compile writes the
artifact ungated. Copy the output folder to the device and run this: it loads `model.<target>.so`
with TVM's runtime alone (`pruneaug.load`; no compiler needed), runs it on the calibration inputs
(seeded random inputs without `--calib`) and compares with `pruned.onnx` in onnxruntime, with the
compile's own gate tolerance; then prints the artifact's median latency and onnxruntime's on this
machine's CPU for reference. Exits non-zero on a mismatch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a compile's output folder (pruned.onnx and model.<target>.so)")
    parser.add_argument("--calib", type=Path, help=".npz of inputs (the compile's --calib)")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()

    import onnx

    from pruneaug.deploy import calib_rows, sample_inputs
    from pruneaug.errors import PruneaugError
    from pruneaug.gate import GATE_RTOL, output_mismatch, tolerance
    from pruneaug.passes.ort_run import make_session
    from pruneaug.runtime import device_for, load, read_signature

    artifacts = sorted(args.folder.glob("model.*.so"))
    if not artifacts:
        objects = sorted(args.folder.glob("model.*.tar"))
        sys.exit(f"check_artifact: {args.folder}: no model.<target>.so in it" + (
            f" ({objects[0].name} holds object files: link them into a .so with the target's compiler first)"
            if objects else ""))
    pruned_file = args.folder / "pruned.onnx"
    pruned = onnx.load(pruned_file)
    calib = dict(np.load(args.calib)) if args.calib else None
    for artifact in artifacts:
        try:
            signature = read_signature(artifact)
        except PruneaugError as err:
            sys.exit(f"check_artifact: {err}")
        shapes = {value["name"]: value["shape"] for value in signature["inputs"]}
        inputs = sample_inputs(pruned, shapes, calib)
        unsized = [name for name, shape in shapes.items()
                   if calib is not None and calib_rows(calib, name, shape) is None]
        if unsized:  # checked all the same, on values the model may never see
            print(f"check_artifact: {args.calib} has no rows of {', '.join(f'{n} {shapes[n]}' for n in unsized)} "
                  "(the artifact's input shapes): checking on seeded random values instead", file=sys.stderr)
        try:
            model = load(artifact, device_for(signature["kind"]))
        except PruneaugError as err:
            sys.exit(f"check_artifact: {err}")
        session = make_session(pruned_file)
        expected = dict(zip([value.name for value in pruned.graph.output], session.run(None, dict(inputs))))
        rtol = max(tolerance(output, GATE_RTOL) for output in expected.values())  # (half-precision outputs: more)
        mismatch = output_mismatch(pruned, model.run(inputs), list(expected.values()), GATE_RTOL)
        if mismatch is not None:
            sys.exit(f"check_artifact: {artifact}: output {mismatch[0]!r} differs from onnxruntime's: relative "
                     f"error {mismatch[1]:.2e} > {tolerance(expected[mismatch[0]], GATE_RTOL):g}")
        ours = model.benchmark(inputs, repeat=args.repeat)
        ort = _ort_benchmark(session, inputs, args.repeat)
        print(f"{artifact}: matches onnxruntime (rtol {rtol:g}); median {ours['median'] * 1e6:.1f} µs "
              f"(p10 {ours['p10'] * 1e6:.1f}, p90 {ours['p90'] * 1e6:.1f}) on {signature['kind']}; "
              f"onnxruntime CPU on this machine {ort * 1e6:.1f} µs ({ort / ours['median']:.2f}x)")


def _ort_benchmark(session, inputs, repeat: int) -> float:
    import time

    session.run(None, inputs)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, inputs)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


if __name__ == "__main__":
    main()
