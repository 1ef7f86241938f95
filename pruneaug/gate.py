"""The correctness gate's comparison: a compiled model's outputs against onnxruntime's on the same inputs.

Kept free of TVM's compiler, so that `tools/check_artifact.py` can run the gate on a deployment
machine that has TVM's runtime alone (a GPU box for a CUDA artifact compiled elsewhere).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

GATE_RTOL = 1e-4  # float32 sums taken in another order differ by far less
HALF_RTOL = 1e-2  # a half-precision output: one rounding is ~5e-4 of it, and its sums round at every step


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """`max|ours - theirs| / max|theirs|`; infinite when the shapes differ."""
    if ours.shape != theirs.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(theirs), initial=0.0)), np.finfo(np.float32).tiny)
    return float(np.max(np.abs(ours.astype(np.float64) - theirs), initial=0.0)) / scale


def tolerance(reference: np.ndarray, rtol: float) -> float:
    """The relative error allowed against `reference`: `rtol`, or `HALF_RTOL` for a half-precision output
    (TVM and onnxruntime round a float16 model's sums differently: 1.5e-3 apart on a small MLP)."""
    return max(rtol, HALF_RTOL) if reference.dtype == np.float16 else rtol


def close(ours: np.ndarray, theirs: np.ndarray, rtol: float) -> bool:
    """Within `tolerance(theirs, rtol)` (`relative_error`)."""
    return relative_error(ours, theirs) <= tolerance(theirs, rtol)


def output_mismatch(model: onnx.ModelProto, ours: Sequence[np.ndarray], theirs: Sequence[np.ndarray],
                    rtol: float = GATE_RTOL) -> tuple[str, float] | None:
    """The first of `model`'s outputs where `ours` (the compiled model's outputs, in the graph's output
    order) differ from `theirs` (onnxruntime's on the same inputs, `onnxruntime_outputs`) by more than
    `rtol` (`tolerance`), with that relative error; None when all match."""
    for value, a, b in zip(model.graph.output, ours, theirs):
        if not close(a, b, rtol):  # (a NaN error is a mismatch)
            return value.name, relative_error(a, b)
    return None


def onnxruntime_outputs(model: onnx.ModelProto | Path, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The reference: the model (in memory or its file) run by onnxruntime on the CPU."""
    from pruneaug.passes.ort_run import make_session

    return make_session(model).run(None, dict(inputs))
