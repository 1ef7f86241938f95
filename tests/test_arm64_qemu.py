"""The arm64 block-sparse matmul kernels and whole compiled models, cross-compiled and run under qemu-aarch64,
against numpy and onnxruntime.

Needs qemu-aarch64, the aarch64 cross compilers (Debian: qemu-user, gcc- and g++-aarch64-linux-gnu)
and the aarch64 TVM runtime with its harness, prepared once by `python tools/arm64_runtime.py`
($PRUNEAUG_ARM64_RUNTIME or ~/.cache/pruneaug/arm64-runtime). Without them the tests skip, saying
which is missing; they never download anything.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import pruneaug

from pruneaug.codegen.bsr import bsr_matmul_kernel, compile_kernel, random_bsr_weight
from pruneaug.codegen.export import CROSS_COMPILER
from pruneaug.codegen.schedule import kernel_schedule
from pruneaug.cost_model.targets import resolve_target
from pruneaug.passes import ort_run
from tool_module import load_tool

tvm = pytest.importorskip("tvm")

ARM64 = resolve_target("arm64")


arm64_runtime = load_tool("arm64_runtime")


def _skip_reason() -> str | None:
    """Why the qemu tests cannot run here (a missing program or an unprepared runtime), or None."""
    missing = arm64_runtime.missing_tools() + ([CROSS_COMPILER] if shutil.which(CROSS_COMPILER) is None else [])
    if missing:
        return f"not installed: {', '.join(missing)} (Debian: qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)"
    folder = arm64_runtime.runtime_dir()
    if not arm64_runtime.is_prepared(folder):
        return f"no aarch64 TVM runtime prepared in {folder}: run `python tools/arm64_runtime.py`"
    return None


SKIP_REASON = _skip_reason()

# (m, out, in, block, density, with_bias): ragged edges both ways, thin blocks (the "mvec" layout),
# square ones (the "rowvec" layout), a bias, an empty and a full weight.
CASES = [
    (13, 45, 50, (4, 8), 0.4, False),
    (16, 24, 20, (1, 1), 0.3, True),
    (32, 64, 48, (8, 8), 0.25, True),
    (8, 40, 36, (16, 16), 1.0, False),
    (24, 20, 33, (1, 4), 0.5, True),
    (16, 32, 32, (8, 8), 0.0, True),
]


@pytest.mark.slow
@pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))
@pytest.mark.parametrize("m, out, in_, block, density, with_bias", CASES)
def test_arm64_bsr_matmul_matches_numpy_under_qemu(tmp_path, m, out, in_, block, density, with_bias):
    rng = np.random.default_rng(m * out + in_)
    weight = random_bsr_weight(out, in_, block, density, seed=m)
    bias = rng.standard_normal(out).astype(np.float32) if with_bias else None
    x = rng.standard_normal((m, in_)).astype(np.float32)
    kernel = bsr_matmul_kernel(ARM64, m, weight, bias)
    library = tmp_path / "kernel.so"
    compile_kernel(kernel, ARM64).export_library(
        str(library), fcompile=tvm.support.cc.cross_compiler(CROSS_COMPILER))

    out_shape = [int(d) for d in kernel.primfunc.params[-1].shape]
    y = arm64_runtime.run_under_qemu(arm64_runtime.runtime_dir(), library, kernel.name, [x, *kernel.constants],
                                     out_shape)

    expected = x @ weight.to_dense().T + (bias if with_bias else 0)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_cases_cover_both_cpu_layouts():
    layouts = {kernel_schedule(ARM64, m, out, in_, block, 1).layout for m, out, in_, block, *_ in CASES}
    assert layouts == {"mvec", "rowvec"}


@pytest.mark.slow
@pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))
@pytest.mark.parametrize("example, block", [("cnn", "4x4"), ("mlp", "8x8"), ("encoder", "16x1"), ("cnn", "16x1")])
def test_arm64_whole_model_matches_onnxruntime_under_qemu(tmp_path, example, block):
    """The compiled arm64 artifact (.so, Relax VM) as a deployment runs it, against pruned.onnx in onnxruntime:
    the encoder's layer norms and softmaxes run in our own row kernels, the CNN's strided conv through its
    stride-phase split, 16x1 blocks in four NEON vectors of rows."""
    folder = Path(__file__).resolve().parent.parent / "examples" / example
    result = pruneaug.compile(folder / "model.onnx", target="arm64", block=block, sparsity=0.6, measure="none",
                              calib=folder / "calib.npz", batch=4, out=tmp_path / "out")
    assert result.artifact is not None and result.artifact.suffix == ".so", result.warnings
    signature = json.loads(result.artifact.with_name(result.artifact.name + ".json").read_text())
    with np.load(folder / "calib.npz") as calib:
        inputs = {spec["name"]: calib[spec["name"]][:4] for spec in signature["inputs"]}
    want = ort_run.run(onnx.load(result.pruned_model), inputs)
    got = arm64_runtime.run_model_under_qemu(arm64_runtime.runtime_dir(), result.artifact,
                                             [inputs[spec["name"]] for spec in signature["inputs"]],
                                             [(w.shape, w.dtype.name) for w in want])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))


@pytest.mark.slow
@pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))
@pytest.mark.parametrize("op, x_shape, attrs", [
    ("MaxPool", [2, 3, 20, 37], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("MaxPool", [1, 4, 8, 21], dict(kernel_shape=[3, 2], pads=[1, 0, 0, 1])),
    ("AveragePool", [1, 2, 11, 45], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("AveragePool", [1, 3, 9, 11], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)),
])
def test_arm64_pools_match_onnxruntime_under_qemu(tmp_path, op, x_shape, attrs):
    """Our pool kernel (`codegen/pooling.py`) with NEON's 4 lanes: interiors vectorised, borders tested."""
    from pruneaug.codegen.export import export_artifact, model_signature
    from pruneaug.codegen.relax_build import build_model
    from test_pooling import pool_model, pools_left_to_tvm

    model = pool_model(op, x_shape, **attrs)
    assert pools_left_to_tvm(model, ARM64) == 0
    x = -np.random.default_rng(sum(x_shape)).uniform(1, 2, x_shape).astype(np.float32)  # a max from 0 would show
    [want] = ort_run.run(model, {"x": x})
    artifact = export_artifact(build_model(model, {}, ARM64, {"x": x_shape}), ARM64, tmp_path / "pool",
                               model_signature(model, {"x": x_shape}))
    [got] = arm64_runtime.run_model_under_qemu(arm64_runtime.runtime_dir(), artifact, [x], [(want.shape, "float32")])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))
@pytest.mark.parametrize("op, direction", [("LSTM", "forward"), ("GRU", "bidirectional")])
def test_arm64_recurrent_classifier_matches_onnxruntime_under_qemu(tmp_path, op, direction):
    """A recurrent node unrolled for TVM (`codegen/recurrent.py`), compiled for arm64."""
    from test_recurrent import keyword_spotter

    path = tmp_path / "kws.onnx"
    onnx.save(keyword_spotter(op, direction), path)
    result = pruneaug.compile(path, target="arm64", block="4x1", sparsity=0.5, measure="none", batch=2,
                              out=tmp_path / "out")
    assert result.artifact is not None, result.warnings
    x = np.random.default_rng(3).standard_normal((2, 6, 10)).astype(np.float32)
    [want] = ort_run.run(onnx.load(result.pruned_model), {"x": x})
    [got] = arm64_runtime.run_model_under_qemu(arm64_runtime.runtime_dir(), result.artifact, [x],
                                               [(want.shape, "float32")])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))
@pytest.mark.parametrize("case", ["RMS norm (T5)", "layer norm, no affine", "softplus and mish", "conv, hardswish",
                                  "grouped conv, strided", "conv transpose"])
def test_arm64_rewritten_ops_match_onnxruntime_under_qemu(tmp_path, case):
    """The CPU rewrites with NEON's 4 lanes: RMS and layer norms in parts in our row kernel
    (`relax_build._norms_from_parts`), Softplus and Mish by their exp-only series (`_vectorisable_math`),
    a HardSwish in our conv kernel's stores, a strided grouped conv in our conv kernel read at the stride, a
    ConvTranspose as a conv of its output phases (`_transposed_convs_as_convs`)."""
    from pruneaug.codegen.export import export_artifact, model_signature
    from pruneaug.codegen.relax_build import build_model
    from test_relax_build import (_norm_in_parts, conv_transpose_model, grouped_conv_model, single_conv,
                                  softplus_and_mish_model)

    if case == "conv, hardswish":
        shape = [1, 8, 9, 9]
        model = single_conv(shape, 16, (3, 3), "HardSwish", pads=[1, 1, 1, 1])
    elif case == "grouped conv, strided":
        shape = [1, 48, 15, 15]
        model = grouped_conv_model(48, 8, 15, 2)
    elif case == "conv transpose":
        shape = [1, 5, 6, 7]
        model = conv_transpose_model(shape, 4, (3, 3), True, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    else:
        shape = [2, 5, 37]
        model = softplus_and_mish_model(shape) if case == "softplus and mish" else _norm_in_parts(case, -1, shape)
    x = (np.random.default_rng(9).standard_normal(shape) * 4).astype(np.float32)
    want = ort_run.run(model, {"x": x})
    artifact = export_artifact(build_model(model, {}, ARM64, {"x": shape}), ARM64, tmp_path / "ops",
                               model_signature(model, {"x": shape}))
    got = arm64_runtime.run_model_under_qemu(arm64_runtime.runtime_dir(), artifact, [x],
                                             [(w.shape, "float32") for w in want])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=2e-6 * float(np.abs(w).max()))
