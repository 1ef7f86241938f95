"""tools/runtime_bundle.py: the runtime-only deployment kit (DESIGN §4) loads and runs an artifact in a
Python that sees no TVM compiler, and takes tvm_ffi for another Python from that Python's wheel."""
from __future__ import annotations

import importlib.metadata
import os
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from fresh_python import run_python
from tool_module import load_tool

import zoo
from pruneaug.codegen.export import export_artifact, model_signature
from pruneaug.codegen.relax_build import build_model
from pruneaug.cost_model.targets import resolve_target

bundle = load_tool("runtime_bundle")


@pytest.mark.slow
def test_a_bundle_runs_an_artifact_where_tvm_has_no_compiler(tmp_path):
    model, shapes = zoo.mlp(), {"x": [2, 64]}
    host = resolve_target("x86")
    artifact = export_artifact(build_model(model, {"fc1.weight": (8, 8)}, host, shapes), host,
                               tmp_path / "model.x86", model_signature(model, shapes))
    archive = bundle.build(tmp_path / "bundle", f"{sys.version_info.major}.{sys.version_info.minor}", None)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "tvm/lib/libtvm_runtime.so" in names and "tvm_ffi/__init__.py" in names and "pruneaug/runtime.py" in names
    assert not [name for name in names if "libtvm_compiler" in name or "__pycache__" in name]

    inputs = zoo.random_inputs(model, batch=2)
    np.savez(tmp_path / "inputs.npz", **inputs)
    site = tmp_path / "bundle" / "site"
    script = (
        "import sys, numpy as np, tvm, tvm.base, pruneaug\n"
        f"assert tvm.__file__.startswith({str(site)!r}) and pruneaug.__file__.startswith({str(site)!r})\n"
        "assert tvm.base._RUNTIME_ONLY and 'tvm_compiler' not in tvm.base._LOADED_LIBS\n"
        f"model = pruneaug.load({str(artifact)!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, model.run(dict(np.load({str(tmp_path / 'inputs.npz')!r})))[0])\n"
        "assert 'onnx' not in sys.modules and 'tvm.relax' not in sys.modules\n"
    )
    run_python(script, env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path)
    import onnxruntime

    (expected,) = onnxruntime.InferenceSession(model.SerializeToString(),
                                               providers=["CPUExecutionProvider"]).run(None, inputs)
    assert np.max(np.abs(np.load(tmp_path / "y.npy") - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_tvm_ffi_for_another_python_comes_from_its_wheel_without_headers(tmp_path):
    version = importlib.metadata.version("apache-tvm-ffi")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / f"apache_tvm_ffi-{version}-cp399-cp399-manylinux_2_28_x86_64.whl", "w") as wheel:
        wheel.writestr("tvm_ffi/__init__.py", "")
        wheel.writestr("tvm_ffi/core.cpython-399-x86_64-linux-gnu.so", "")
        wheel.writestr("tvm_ffi/include/tvm/ffi/any.h", "")
    bundle.add_tvm_ffi(tmp_path / "site", "3.99", wheels)
    files = sorted(p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("*") if p.is_file())
    assert files == ["tvm_ffi/__init__.py", "tvm_ffi/core.cpython-399-x86_64-linux-gnu.so"]


def test_a_missing_wheel_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no apache_tvm_ffi-.*-cp399 wheel in"):
        bundle.add_tvm_ffi(tmp_path / "site", "3.99", tmp_path)
