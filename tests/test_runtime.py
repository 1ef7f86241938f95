"""Exported artifacts: written per target, loaded and run by `pruneaug.load` with TVM's runtime alone."""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from devices import requires_cuda_gpu
from fresh_python import run_python
from tool_module import load_tool

import zoo
from pruneaug.codegen.export import export_artifact, model_signature
from pruneaug.codegen.relax_build import build_model
from pruneaug.cost_model.targets import resolve_target
from pruneaug.errors import ModelError, OptionError
from pruneaug import runtime
from pruneaug.runtime import load

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"x": [2, 64]}
SPARSE = {"fc1.weight": (8, 8)}  # any weight does: the zoo's dense weights compile through the BSR kernel


@pytest.fixture(scope="module")
def model():
    return zoo.mlp()


@pytest.fixture(scope="module")
def inputs(model):
    return zoo.random_inputs(model, batch=2)


@pytest.fixture(scope="module")
def x86_artifact(model, tmp_path_factory):
    target = resolve_target("x86")
    executable = build_model(model, SPARSE, target, SHAPES)
    return export_artifact(executable, target, tmp_path_factory.mktemp("x86") / "model.x86",
                           model_signature(model, SHAPES))


def reference(model, inputs):
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)


def test_artifact_and_sidecar(x86_artifact):
    assert x86_artifact.suffix == ".so" and x86_artifact.is_file()
    meta = json.loads(x86_artifact.with_name(x86_artifact.name + ".json").read_text())
    assert meta["inputs"] == [{"name": "x", "shape": [2, 64], "dtype": "float32"}]
    assert meta["outputs"] == ["y"] and meta["kind"] == "x86"
    assert not [p for p in x86_artifact.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_run_and_benchmark(x86_artifact, model, inputs):
    loaded = load(x86_artifact)
    (y,) = loaded.run(inputs)
    (expected,) = reference(model, inputs)
    assert np.max(np.abs(y - expected)) <= 1e-4 * np.max(np.abs(expected))
    figures = loaded.benchmark(inputs, repeat=5)
    assert set(figures) == {"median", "p10", "p90"}
    assert 0 < figures["p10"] <= figures["median"] <= figures["p90"]
    seconds = loaded.time_runs(inputs, repeat=7)
    assert seconds.shape == (7,) and np.all(seconds > 0)


def test_artifacts_moved_and_timed_side_by_side(x86_artifact, inputs, tmp_path, monkeypatch):
    """`move_artifact` takes the sidecar along; `time_side_by_side` gives every artifact rounds x runs times
    from a fresh process, its rounds `pause_s` apart, and fails with the fresh process's reason."""
    import shutil

    from pruneaug import timing
    from pruneaug.codegen.export import move_artifact
    from pruneaug.timing import time_side_by_side

    copies = {}
    for name in ("a", "b"):
        for file in (x86_artifact, x86_artifact.with_name(x86_artifact.name + ".json")):
            shutil.copy(file, tmp_path / file.name.replace("model", f"copy_{name}"))
        copies[name] = move_artifact(tmp_path / f"copy_{name}.x86.so", tmp_path / f"moved_{name}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "moved_a.so", "moved_a.so.json", "moved_b.so", "moved_b.so.json"]
    timings = time_side_by_side(copies, inputs, rounds=3, runs=4, pause_s=0.05)  # in a fresh process
    assert set(timings) == {"a", "b"}
    assert all(len(t.seconds) == 12 and t.median_s > 0 for t in timings.values())
    pauses = []
    monkeypatch.setattr(timing.time, "sleep", pauses.append)
    here = timing.side_by_side_here(copies, inputs, rounds=3, runs=4, pause_s=0.05)  # its rounds, here
    assert pauses == [0.05, 0.05] and all(len(t.seconds) == 12 for t in here.values())  # pauses between rounds
    copies["b"].unlink()  # the fresh process fails to load it: the timing fails with the reason
    with pytest.raises(timing.TimingError, match="side by side failed.*no such artifact"):
        time_side_by_side(copies, inputs, rounds=1, runs=1)


def test_runs_in_a_row_see_their_own_inputs_and_keep_earlier_outputs(x86_artifact, model, inputs):
    """Inputs go through buffers the model reuses: a later run must not change an earlier run's outputs."""
    loaded = load(x86_artifact)
    others = {name: (array + 1.5).astype(array.dtype) for name, array in inputs.items()}
    (first,) = loaded.run(inputs)
    kept = first.copy()
    (second,) = loaded.run(others)
    for got, feeds in ((first, inputs), (second, others)):
        (expected,) = reference(model, feeds)
        assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))
    assert np.array_equal(first, kept)
    with pytest.raises(OptionError, match="compiled for"):
        loaded.run({name: array[:, :1] for name, array in inputs.items()})
    (third,) = loaded.run(inputs)  # a refused input left the buffers as they were filled next
    assert np.max(np.abs(third - kept)) <= 1e-6 * np.max(np.abs(kept))


def test_cpu_artifacts_allocate_their_intermediates_once_and_runs_keep_their_outputs(x86_artifact, model, inputs):
    """`main` takes the workspace's tensors after the inputs (codegen/workspace.py); the outputs are not
    among them: a raw VM's second run leaves the first run's output tensor as it was."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    meta = json.loads(x86_artifact.with_name(x86_artifact.name + ".json").read_text())
    assert meta["workspace"] == "workspace"
    machine = VirtualMachine(tvm.runtime.load_module(str(x86_artifact)), tvm.cpu())
    workspace = list(machine["workspace"]())
    assert len(workspace) >= 1 and machine._get_function_arity("main") == len(inputs) + len(workspace)
    others = {name: (array - 0.75).astype(array.dtype) for name, array in inputs.items()}
    first = machine["main"](*(tvm.runtime.tensor(a) for a in inputs.values()), *workspace)
    second = machine["main"](*(tvm.runtime.tensor(a) for a in others.values()), *workspace)
    for got, feeds in ((first, inputs), (second, others)):
        (expected,) = reference(model, feeds)
        assert np.max(np.abs(got.numpy() - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_runs_from_several_threads_take_turns(x86_artifact, model, inputs):
    """One loaded model's runs share its input buffers and workspace: runs from threads must not mix."""
    from concurrent.futures import ThreadPoolExecutor

    loaded = load(x86_artifact)
    feeds = [{name: (array + shift).astype(array.dtype) for name, array in inputs.items()} for shift in range(8)]
    expected = [reference(model, feed)[0] for feed in feeds]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: loaded.run(feeds[i % 8])[0], range(64)))
    for i, y in enumerate(got):
        assert np.max(np.abs(y - expected[i % 8])) <= 1e-4 * np.max(np.abs(expected[i % 8]))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build tools/arm64_harness.cc natively")
def test_the_device_harness_runs_a_whole_model_with_its_workspace(x86_artifact, model, inputs, tmp_path):
    """tools/arm64_harness.cc (what runs an arm64 artifact on a device without Python), built for this
    machine and run on the x86 artifact: it allocates the workspace as `pruneaug.load` does."""
    import subprocess

    import tvm
    import tvm_ffi

    libs = [Path(tvm.__file__).parent / "lib", Path(tvm_ffi.__file__).parent / "lib"]
    harness = tmp_path / "harness"
    subprocess.run(["g++", "-std=c++17", "-O1", f"-I{Path(tvm_ffi.__file__).parent / 'include'}",
                    str(REPO / "tools" / "arm64_harness.cc"), "-o", str(harness),
                    *(f"-L{lib}" for lib in libs), "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi",
                    *(f"-Wl,-rpath,{lib}" for lib in libs)], check=True, capture_output=True)
    (x,) = inputs.values()
    (expected,) = reference(model, inputs)
    x.tofile(tmp_path / "x.bin")

    def spec(path: Path, shape) -> str:
        return f"{path}:float32:{'x'.join(map(str, shape))}"

    subprocess.run([str(harness), "--vm", str(x86_artifact), "1", spec(tmp_path / "x.bin", x.shape),
                    spec(tmp_path / "y.bin", expected.shape)], check=True, capture_output=True)
    y = np.fromfile(tmp_path / "y.bin", np.float32).reshape(expected.shape)
    assert np.max(np.abs(y - expected)) <= 1e-4 * np.max(np.abs(expected))


def run_in_fresh_process(artifact: Path, device: str, inputs: dict, tmp_path: Path) -> np.ndarray:
    """The artifact's first output, from `pruneaug.load` in a new Python whose `tvm` has no compiler library."""
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = (
        "import sys, numpy as np, tvm, tvm.base\n"
        "assert tvm.base._RUNTIME_ONLY and 'tvm_compiler' not in tvm.base._LOADED_LIBS\n"
        "import pruneaug\n"
        f"model = pruneaug.load({str(artifact)!r}, device={device!r})\n"
        f"inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, model.run(inputs)[0])\n"
        "assert 'tvm.relax' not in sys.modules and 'onnx' not in sys.modules\n"
    )
    site = load_tool("runtime_bundle").copy_runtime_tvm(tmp_path / "site", link=True)
    path = os.pathsep.join(filter(None, [str(site), str(REPO),
                                         os.environ.get("PYTHONPATH")]))  # tvm_ffi may live on the old path
    run_python(script, env={**os.environ, "PYTHONPATH": path})
    return np.load(tmp_path / "y.npy")


@pytest.mark.slow
def test_loads_in_a_fresh_process_without_the_compiler(x86_artifact, model, inputs, tmp_path):
    y = run_in_fresh_process(x86_artifact, "cpu", inputs, tmp_path)
    (expected,) = reference(model, inputs)
    assert np.max(np.abs(y - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_load_errors(x86_artifact, inputs, tmp_path):
    with pytest.raises(ModelError, match="no such artifact"):
        load(tmp_path / "missing.so")
    with pytest.raises(OptionError, match="device 'tpu'"):
        load(x86_artifact, device="tpu")
    with pytest.raises(OptionError, match="load it with device='cpu'"):
        load(x86_artifact, device="cuda")
    (tmp_path / "model.tar").write_bytes(b"")
    with pytest.raises(ModelError, match="only a .so loads"):
        load(tmp_path / "model.tar")
    loaded = load(x86_artifact)
    with pytest.raises(OptionError, match=r"inputs \['z'\] do not match the model's inputs \['x'\]"):
        loaded.run({"z": inputs["x"]})
    with pytest.raises(OptionError, match=r"input 'x': got float32\[3, 64\]"):
        loaded.run({"x": np.zeros((3, 64), np.float32)})


@pytest.fixture(scope="module")
def arm64_executable(model):
    return build_model(model, SPARSE, resolve_target("arm64"), SHAPES)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="no aarch64-linux-gnu-gcc (Debian: gcc-aarch64-linux-gnu)")
def test_arm64_cross_compiles_to_an_aarch64_elf(arm64_executable, model, tmp_path):
    path = export_artifact(arm64_executable, resolve_target("arm64"), tmp_path / "model.arm64",
                           model_signature(model, SHAPES))
    header = path.read_bytes()[:20]
    assert path.suffix == ".so" and header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


def test_arm64_without_cross_compiler_writes_objects(arm64_executable, model, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("tar", "gzip"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bin_dir))  # what a .tar needs, and no aarch64-linux-gnu-gcc
    with pytest.warns(UserWarning, match="aarch64-linux-gnu-gcc not found"):
        path = export_artifact(arm64_executable, resolve_target("arm64"), tmp_path / "model.arm64",
                               model_signature(model, SHAPES))
    assert path.suffix == ".tar" and path.stat().st_size > 0


@pytest.fixture(scope="module")
def cuda_artifact(model, tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc to compile the CUDA kernels ahead of time")
    target = resolve_target("cuda")
    executable = build_model(model, SPARSE, target, SHAPES)
    return export_artifact(executable, target, tmp_path_factory.mktemp("cuda") / "model.cuda",
                           model_signature(model, SHAPES))


@pytest.mark.slow
def test_cuda_export_ships_compiled_kernels(cuda_artifact):
    meta = json.loads(cuda_artifact.with_name(cuda_artifact.name + ".json").read_text())
    binaries = [base64.b64decode(blob) for blob in meta["cuda_binaries"].values()]
    assert binaries and all(blob[:4] == b"\x50\xed\x55\xba" for blob in binaries)  # fatbin magic
    for blob in binaries:  # the default cuda profile is sm_80: SASS for it and for sm_90, PTX for sm_80
        assert sorted(fatbin_entries(blob)) == [("elf", 80), ("elf", 90), ("ptx", 80)]


def fatbin_entries(blob: bytes) -> list[tuple[str, int]]:
    """(kind, SM version) of each entry of a CUDA fatbin: its header (magic, version, header size, body
    size), then per entry a header of kind (1 PTX, 2 ELF), header size, body size, ..., SM at byte 28."""
    import struct

    _, _, header, body = struct.unpack_from("<IHHQ", blob, 0)
    entries, offset = [], header
    while offset < header + body:
        kind, _, entry_header, size = struct.unpack_from("<HHIQ", blob, offset)
        entries.append(({1: "ptx", 2: "elf"}[kind], struct.unpack_from("<I", blob, offset + 28)[0]))
        offset += entry_header + size
    return entries


@pytest.mark.slow
@requires_cuda_gpu
def test_cuda_artifact_runs(cuda_artifact, model, inputs):
    (y,) = load(cuda_artifact, device="cuda").run(inputs)
    (expected,) = reference(model, inputs)
    assert np.max(np.abs(y - expected)) <= 1e-4 * np.max(np.abs(expected))


@requires_cuda_gpu
def test_a_cuda_artifact_is_timed_on_its_gpu_beside_onnxruntime_on_the_cpu(cuda_artifact, model, inputs):
    from pruneaug import deploy

    latency = deploy.measure_model_latency(model, model, cuda_artifact, inputs, repeat=4, runs_per_round=2,
                                           device="cuda")
    assert "errors" not in latency and latency["device"] == "cuda"
    assert latency["tvm_pruned_s"] > 0 and latency["onnxruntime_dense_s"] > 0
    assert deploy.GPU_NOTE in latency["note"]


@pytest.mark.slow
@requires_cuda_gpu
def test_cuda_artifact_loads_in_a_fresh_process_without_the_compiler(cuda_artifact, model, inputs, tmp_path):
    # A fresh process imports tvm inside `load`, after which the compiled kernels must still be served.
    y = run_in_fresh_process(cuda_artifact, "cuda", inputs, tmp_path)
    (expected,) = reference(model, inputs)
    assert np.max(np.abs(y - expected)) <= 1e-4 * np.max(np.abs(expected))


@pytest.mark.slow
def test_cuda_artifact_without_a_gpu_is_refused(cuda_artifact, monkeypatch):
    monkeypatch.setattr(runtime, "has_cuda_gpu", lambda: False)
    with pytest.raises(OptionError, match="this machine has no CUDA GPU"):
        load(cuda_artifact, device="cuda")


def test_skip_unused_torch_refuses_the_import_and_leaves_sys_modules_clean():
    # scipy's array-API helpers look torch up in sys.modules: an entry of None there made them fail.
    script = ("import sys\n"
              "from pruneaug.runtime import skip_unused_torch\n"
              "skip_unused_torch(); skip_unused_torch()\n"
              "try:\n    import torch\nexcept ImportError as err:\n    assert 'skip_unused_torch' in str(err)\n"
              "else:\n    raise SystemExit('torch imported')\n"
              "assert 'torch' not in sys.modules\n"
              "assert sum(type(finder).__name__ == '_NoTorch' for finder in sys.meta_path) == 1\n")
    run_python(script)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_cuda_build_embeds_binaries_for_newer_gpus_too():
    # On a GPU machine TVM compiles CUDA modules while building, through this global: for the target's
    # arch alone, an sm_80 artifact did not run on an H100. During our builds it yields the fatbin.
    import tvm_ffi

    from pruneaug.codegen.export import cuda_binaries_at_build

    before = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    with cuda_binaries_at_build(resolve_target("cuda")):
        binary = tvm_ffi.get_global_func("tvm_callback_cuda_compile")('extern "C" __global__ void k(float* x) { *x = 1; }')
    assert sorted(fatbin_entries(bytes(binary))) == [("elf", 80), ("elf", 90), ("ptx", 80)]
    after = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    assert (before is None and after is None) or before.same_as(after)


@pytest.fixture
def cuda_compile_callback(monkeypatch):
    """TVM's `tvm_callback_cuda_compile` replaced by a recorder for the test, and put back after it."""
    import tvm_ffi

    saved = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    asked = []
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", lambda source, *_: asked.append(str(source)) or b"nvrtc",
                                 override=True)
    monkeypatch.setattr(runtime, "_CUDA_BINARIES", {})
    yield asked
    if saved is not None:
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", saved, override=True)
    else:
        tvm_ffi.remove_global_func("tvm_callback_cuda_compile")


def test_one_callback_serves_the_cuda_binaries_of_every_loaded_artifact(cuda_compile_callback, monkeypatch):
    import tvm_ffi

    registered = []
    real_register = tvm_ffi.register_global_func
    monkeypatch.setattr(tvm_ffi, "register_global_func", lambda *a, **k: registered.append(a[0]) or real_register(*a, **k))
    sources = ["extern \"C\" __global__ void a() {}", "extern \"C\" __global__ void b() {}", "// not shipped"]
    for index, source in enumerate(sources[:2]):  # two artifacts loaded one after the other
        runtime._serve_cuda_binaries({runtime.cuda_source_key(source): f"binary {index}".encode()})
    callback = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    assert bytes(callback(sources[0], "fatbin")) == b"binary 0"
    assert bytes(callback(sources[1], "fatbin")) == b"binary 1"
    assert bytes(callback(sources[2], "fatbin")) == b"nvrtc"  # what no artifact ships goes to the callback before
    assert cuda_compile_callback == [sources[2]]
    assert registered == ["tvm_callback_cuda_compile"]  # once: the second load did not wrap the first's callback


def test_load_warns_where_the_pool_holds_fewer_threads_than_the_kernels_were_built_for(x86_artifact, inputs, model,
                                                                                        tmp_path):
    import warnings as warnings_module

    from pruneaug.pool import pool_threads

    signature = json.loads(x86_artifact.with_name(x86_artifact.name + ".json").read_text())
    assert signature["threads"] == resolve_target("x86").cores
    copy, held = tmp_path / "model.x86.so", pool_threads()
    shutil.copy(x86_artifact, copy)
    copy.with_name(copy.name + ".json").write_text(json.dumps({**signature, "threads": held}))
    with warnings_module.catch_warnings():
        warnings_module.simplefilter("error")
        load(copy)  # built for the pool it finds: no warning
    copy.with_name(copy.name + ".json").write_text(json.dumps({**signature, "threads": held + 1}))
    with pytest.warns(UserWarning, match=rf"built for a {held + 1}-thread pool, but TVM's pool in this process "
                                         rf"holds {held} .*TVM_NUM_THREADS={held + 1}"):
        loaded = load(copy)
    (expected,) = reference(model, inputs)
    (y,) = loaded.run(inputs)
    assert np.max(np.abs(y - expected)) <= 1e-4 * np.max(np.abs(expected))  # it still runs, and right
