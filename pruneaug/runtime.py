"""Load and run a compiled pruneaug artifact with TVM's runtime alone (DESIGN §4).

    >>> model = load("out/model.x86.so")
    >>> model.run({"input": x})[0].shape
    (1, 10)
    >>> model.benchmark({"input": x}, repeat=50)
    {'median': 0.0012, 'p10': 0.0011, 'p90': 0.0013}

Nothing here imports TVM's compiler: `tvm` with `lib/libtvm_compiler.so` removed loads these
artifacts. The sidecar `<artifact>.json` written by `pruneaug.codegen.export` gives the input and
output names; for CUDA it also holds the kernels nvcc compiled ahead of time, which are handed to TVM
when it asks to compile the library's CUDA source, so the deploying machine needs no NVRTC.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.abc
import json
import sys
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pruneaug.errors import ModelError, OptionError

_DEVICES = ("cpu", "cuda")


def device_for(kind: str) -> str:
    """The `load` device of an artifact built for a target of `kind` (x86, arm64 or cuda)."""
    return "cuda" if kind == "cuda" else "cpu"


def has_cuda_gpu() -> bool:
    """Whether this machine can run CUDA artifacts: a GPU, and TVM's CUDA runtime loaded."""
    import tvm

    if not _load_cuda_runtime():
        return False
    try:
        return bool(tvm.runtime.device("cuda", 0).exist)
    except Exception:  # noqa: BLE001 - a TVM built without the CUDA runtime raises instead of answering False
        return False


def _load_cuda_runtime() -> bool:
    """Load TVM's CUDA runtime library (`lib/libtvm_runtime_cuda.so`) unless it is loaded already.

    TVM's own CUDA backend hook loads it, but only when the compiler library is present: with the
    runtime alone (DESIGN §4) nothing does, and CUDA artifacts would not load. False where it cannot
    load (no such library, or no CUDA driver and runtime on this machine)."""
    import tvm.base
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" not in tvm.base._LOADED_LIBS:
        runtime_dir = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        try:
            tvm.base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
                package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
        except (OSError, RuntimeError):
            return False
    return True


class _NoTorch(importlib.abc.MetaPathFinder):
    """An import hook under which `import torch` raises ImportError, as if torch were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (pruneaug.runtime.skip_unused_torch)", name=name)
        return None


def skip_unused_torch() -> None:
    """Make `import torch` fail in this process: for pruneaug's own command-line processes only.

    tvm_ffi imports torch whenever it is installed (for DLPack interop; 1.7-2.5 s per process here,
    a compile starts four), and nothing the CLI or a timing worker runs uses it. Never called by the
    library API: a user's own process may well need torch. A torch already imported stays.
    An import hook rather than `sys.modules["torch"] = None`: scipy's array-API helpers look torch
    up in `sys.modules` and fail on a None entry there."""
    if "torch" not in sys.modules and not any(isinstance(finder, _NoTorch) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoTorch())


_BOUND_MAIN = "pruneaug_main"  # `main` with its arguments bound (`LoadedModel`)


class LoadedModel:
    """A compiled model ready to run on one device; inputs and outputs by their ONNX names."""

    def __init__(self, path: Path, device: str, signature: dict):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.path = path
        self.inputs: list[dict] = signature["inputs"]
        self.output_names: list[str] = signature["outputs"]
        self._device = tvm.runtime.device(device, 0)
        library = tvm.runtime.load_module(str(path))
        self._vm = VirtualMachine(library, self._device)
        # intermediate tensors allocated once, passed to every run after the inputs (codegen/workspace.py);
        # runs share them, so they take turns
        workspace = signature.get("workspace")
        self._workspace = list(self._vm[workspace]()) if workspace else []
        self._turn = threading.Lock()
        # one device buffer per input, filled in place on each run: allocating a tensor per call costs
        # more than the whole compiled function on a small model
        self._buffers = [tvm.runtime.empty(spec["shape"], spec["dtype"], self._device) for spec in self.inputs]
        self._dtypes = [np.dtype(spec["dtype"]) for spec in self.inputs]
        # on the CPU, numpy views of those buffers (DLPack, no copy): filling one is a memcpy, not a conversion
        self._host_views = [np.from_dlpack(buffer) for buffer in self._buffers] if device == "cpu" else None
        # every argument of `main` is bound once: passing them on each call converted each of them again
        # (the bundled encoder's input and 35 workspace tensors: ~5 us a run)
        self._vm.save_function("main", _BOUND_MAIN, *self._buffers, *self._workspace)
        self._main = self._vm[_BOUND_MAIN]

    def _fill_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Copy the inputs into the buffers bound to `main`, after checking names, shapes and dtypes."""
        names = [spec["name"] for spec in self.inputs]
        if set(inputs) != set(names):
            raise OptionError(f"inputs {sorted(inputs)} do not match the model's inputs {names}")
        arrays = []
        for spec, dtype in zip(self.inputs, self._dtypes):
            array = np.asarray(inputs[spec["name"]])
            if list(array.shape) != spec["shape"] or array.dtype != dtype:
                raise OptionError(
                    f"input {spec['name']!r}: got {array.dtype}{list(array.shape)}, "
                    f"the model was compiled for {spec['dtype']}{spec['shape']}"
                )
            arrays.append(array)
        for index, array in enumerate(arrays):  # only once every input is known to fit
            if self._host_views is not None:
                np.copyto(self._host_views[index], array)
            else:
                self._buffers[index].copyfrom(np.ascontiguousarray(array))

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The model's outputs, in the ONNX graph's output order."""
        with self._turn:
            self._fill_inputs(inputs)
            result = self._main()
            outputs = [result] if hasattr(result, "numpy") else list(result)
            if self._host_views is not None:  # a copy: the VM reuses its output memory on the next run
                return [np.from_dlpack(output).copy() for output in outputs]
            return [output.numpy() for output in outputs]

    def time_runs(self, inputs: Mapping[str, np.ndarray], repeat: int = 50) -> np.ndarray:
        """Seconds of each of `repeat` timed runs of the compiled function, after a warm-up run (TVM's
        timer; the inputs converted once, outside the runs)."""
        with self._turn:
            self._fill_inputs(inputs)
            timer = self._vm.time_evaluator(_BOUND_MAIN, self._device, number=1, repeat=repeat, min_repeat_ms=0)
            return np.asarray(timer().results, dtype=np.float64)

    def benchmark(self, inputs: Mapping[str, np.ndarray], repeat: int = 50) -> dict[str, float]:
        """Seconds per run (median, 10th and 90th percentile of `repeat` timed runs, after a warm-up run)."""
        seconds = self.time_runs(inputs, repeat)
        return {
            "median": float(np.median(seconds)),
            "p10": float(np.percentile(seconds, 10)),
            "p90": float(np.percentile(seconds, 90)),
        }


def read_signature(path: Path) -> dict:
    """The sidecar `.json` written beside an artifact: its inputs, outputs, target and kernels."""
    sidecar = path.with_name(path.name + ".json")
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{sidecar}: missing or unreadable ({err}); it is written beside the artifact") from err


def artifact_device(path) -> str:
    """The `load` device of the artifact at `path`, read off its sidecar."""
    return device_for(read_signature(_artifact_file(path)).get("kind", ""))


def _artifact_file(path) -> Path:
    """`path` as an artifact that loads: an existing `.so`."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such artifact")
    if path.suffix != ".so":
        raise ModelError(f"{path}: only a .so loads; link a .tar's object files into a .so on the device first")
    return path


def load(path, device: str = "cpu") -> LoadedModel:
    """Load an artifact (`.so`) written by `pruneaug.codegen.export.export_artifact` onto `device`."""
    if device not in _DEVICES:
        raise OptionError(f"device {device!r}: expected one of {', '.join(_DEVICES)}")
    path = _artifact_file(path)
    signature = read_signature(path)
    built_for = device_for(signature.get("kind", ""))
    if device != built_for:
        raise OptionError(f"{path} was compiled for {signature.get('target')}: load it with device={built_for!r}")
    if built_for == "cuda" and not has_cuda_gpu():
        raise OptionError(f"{path} was compiled for {signature.get('target')} and this machine has no CUDA GPU "
                          "(or its TVM runtime was built without CUDA)")
    if built_for == "cpu":
        _check_pool(path, signature.get("threads"))
    if signature.get("cuda_binaries"):
        _serve_cuda_binaries({key: base64.b64decode(blob) for key, blob in signature["cuda_binaries"].items()})
    return LoadedModel(path, device, signature)


def _check_pool(path: Path, threads: int | None) -> None:
    """Warn where TVM's pool here holds fewer threads than the artifact's kernels were built and measured
    for: they still run, on fewer threads than their parallel loops were split for (one thread for
    two: 1.8x slower than the same kernel built serial)."""
    from pruneaug.pool import THREADS_VARIABLE, pool_threads

    held = pool_threads()
    if threads and held < threads:
        warnings.warn(f"{path}: built for a {threads}-thread pool, but TVM's pool in this process holds {held} "
                      f"(TVM started it before pruneaug was imported, or {THREADS_VARIABLE} says so): set "
                      f"{THREADS_VARIABLE}={threads} before TVM first runs a kernel, or compile under "
                      f"{THREADS_VARIABLE}={held} for kernels split for {held}")


def cuda_source_key(source: str) -> str:
    """The key under which a CUDA module's compiled binary is stored: the digest of its source."""
    return hashlib.sha256(source.encode()).hexdigest()


# Digest of a CUDA source -> its binary, from every artifact loaded in this process (one callback serves them).
_CUDA_BINARIES: dict[str, bytes] = {}


def _serve_cuda_binaries(binaries: dict[str, bytes]) -> None:
    """Answer TVM's request to compile CUDA source with the binary compiled ahead of time for that source.

    TVM's CUDA runtime calls the global `tvm_callback_cuda_compile(source)` when it loads a module that
    carries source; sources we have a binary for get it, others go to the callback registered before.
    One callback, registered at the first load, serves every artifact loaded since: a new one per load
    wrapped the one before, a chain one call longer with every load of a long-lived process.
    """
    import tvm  # noqa: F401 - TVM registers its own callback on import (without override): it must come first
    import tvm_ffi

    first = not _CUDA_BINARIES
    _CUDA_BINARIES.update(binaries)
    if not first:
        return
    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def compile_cuda(source, *rest):
        binary = _CUDA_BINARIES.get(cuda_source_key(str(source)))
        if binary is not None:
            return binary
        if previous is None:
            raise RuntimeError("no compiled binary for this CUDA module and no CUDA compiler registered")
        return previous(source, *rest)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
