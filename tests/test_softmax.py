"""Softmax over the last axis as our own CPU kernel (`pruneaug.codegen.softmax`): which softmaxes the rewrite
takes, and outputs against onnxruntime and numpy, on small models and the bundled encoder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from pruneaug.codegen import relax_build, softmax
from pruneaug.codegen.relax_build import _vector_lanes, build_model
from pruneaug.cost_model.targets import resolve_target
from test_relax_build import assert_matches_onnxruntime, x86  # noqa: F401 (x86: the fixture)

ENCODER = Path(__file__).resolve().parent.parent / "examples" / "encoder"


def softmax_model(x_shape: list[int], axis: int) -> onnx.ModelProto:
    """`Softmax(x, axis)`."""
    node = helper.make_node("Softmax", ["x"], ["y"], axis=axis)
    graph = helper.make_graph([node], "softmax", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def large_rows(rows: int, cols: int) -> np.ndarray:
    """Values to +-100: the row maximum must come off before exp (exp(89) overflows float32), and a row's
    smallest values underflow."""
    return np.random.default_rng(rows * cols).uniform(-100, 100, (rows, cols)).astype(np.float32)


def numpy_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def encoder_case() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The bundled encoder at batch 32: two attention softmaxes over [32, 4, 16, 16]."""
    with np.load(ENCODER / "eval.npz") as data:
        return onnx.load(ENCODER / "model.onnx"), {"input": data["input"][:32]}


def small_case(x_shape: list[int], axis: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    return softmax_model(x_shape, axis), {"x": large_rows(int(np.prod(x_shape[:-1])), x_shape[-1]).reshape(x_shape)}


@pytest.mark.parametrize("case, rows_cols, parallel", [
    (lambda: small_case([3, 5, 37], -1), (15, 37), 0),  # 37 = 4 vectors of 8 and 5 left over; 15 rows = 3 x 4 + 3
    (lambda: small_case([97, 300], -1), (97, 300), 1),  # 29100 elements: on the thread pool; 97 = 24 x 4 + 1 rows
    (lambda: small_case([3, 4, 6], 1), None, None),  # not the last axis: TVM's own
    (encoder_case, (2048, 16), 1),  # two softmaxes of one shape: one function
], ids=["ragged", "many_rows", "other_axis", "encoder"])
def test_softmax_over_the_last_axis_is_our_kernel(x86, monkeypatch, case, rows_cols, parallel):
    parallel = parallel and int(x86.cores > 1)  # one core: never the thread pool
    built = []
    real = softmax.softmax_primfunc

    def record(*args):
        built.append((args, real(*args)))
        return built[-1][1]

    monkeypatch.setattr(softmax, "softmax_primfunc", record)
    model, inputs = case()
    shapes = {name: list(array.shape) for name, array in inputs.items()}
    assert_matches_onnxruntime(build_model(model, {}, x86, shapes), model, inputs)
    if rows_cols is None:
        assert built == []
        return
    [(args, func)] = built
    assert args == (*rows_cols, _vector_lanes(x86), parallel)
    assert ("T.parallel" in func.script()) == bool(parallel)


@pytest.mark.parametrize("rows, cols, lanes", [
    (7, 16, 8), (9, 37, 8), (5, 3, 8), (4, 200, 8),
    (9, 37, 4), (9, 37, 16),  # NEON's and AVX-512's vectors (LLVM splits or joins them on this host)
])
def test_kernel_matches_numpy_on_large_and_masked_rows(x86, rows, cols, lanes):
    import tvm

    x = large_rows(rows, cols)
    x[0] = 3.0  # a flat row: 1 / cols everywhere
    x[1, ::2] = -np.inf  # an attention mask: zeros there
    module = tvm.compile(tvm.IRModule({"softmax": softmax.softmax_primfunc(rows, cols, lanes, 0)}),
                         target=x86.tvm())
    dev = tvm.cpu()
    y = tvm.runtime.empty((rows, cols), "float32", dev)
    module["softmax"](tvm.runtime.tensor(x, dev), y)
    # to numpy's float32 softmax; values under about 1e-38 come out 0 (`fast_exp`, as TVM's)
    np.testing.assert_allclose(y.numpy(), numpy_softmax(x), rtol=1e-5, atol=1e-37)
    assert y.numpy()[1, ::2].max() == 0.0
    np.testing.assert_allclose(y.numpy()[0], 1 / cols, rtol=1e-6)


@pytest.mark.parametrize("shape, dtype, axis, ours", [
    ([6, 10], "float32", -1, True),
    ([6, 10], "float32", 0, False),
    ([6, 10], "float16", -1, False),
    ([None, 10], "float32", -1, False),  # a dynamic batch
])
def test_rewrite_takes_only_static_float32_last_axis_softmaxes(shape, dtype, axis, ours):
    from tvm import relax, tirx

    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tirx.Var("batch", "int64") if d is None else d for d in shape], dtype))
    with builder.function("main", [x]):
        builder.emit_func_output(builder.emit(relax.op.nn.softmax(x, axis=axis)))
    rewritten = relax_build._rewrite_cpu_ops(builder.get(), resolve_target("arm64"), ["softmax"])
    assert sorted(gv.name_hint for gv in rewritten.get_global_vars()) == (["main", "softmax"] if ours else ["main"])
    assert ("R.nn.softmax" in rewritten["main"].script()) != ours
    if ours:  # NEON: vectors of 4
        script = rewritten["softmax"].script()
        assert "T.vectorized(4)" in script and "T.vectorized(8)" not in script


def test_every_softmax_and_layer_norm_of_the_encoder_is_replaced():
    model, inputs = encoder_case()
    mod = relax_build.import_onnx(model, {name: list(array.shape) for name, array in inputs.items()})
    norms = mod["main"].script().count("R.nn.layer_norm(")
    assert mod["main"].script().count("R.nn.softmax(") == 2 and norms > 0
    script = relax_build._rewrite_cpu_ops(mod, resolve_target("x86"))["main"].script()  # both kinds in one pass
    assert "R.nn.softmax(" not in script and script.count("R.call_tir(softmax,") == 2
    assert "R.nn.layer_norm(" not in script and script.count("R.call_tir(layer_norm,") == norms
