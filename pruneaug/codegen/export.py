"""Write a compiled model to disk as the artifact `pruneaug.load` runs (DESIGN §1, §4).

    >>> export_artifact(ex, resolve_target("x86"), "out/model.x86", model_signature(pruned))
    PosixPath('out/model.x86.so')

Beside the library sits `<artifact>.json`: the ONNX input names, shapes and dtypes and the output
names (so that `run()` takes a dict by name), and for CUDA the kernels compiled ahead of time by nvcc
(built on a machine without a GPU, TVM embeds CUDA *source* in the library and compiles it when
loading, which needs NVRTC on the deploying machine; `pruneaug.load` hands TVM these binaries
instead; built where a GPU is, the library holds them itself, see `cuda_binaries_at_build`).

Per target: x86 -> `.so`; arm64 -> `.so` cross-compiled with `aarch64-linux-gnu-gcc`, or, where that
is not installed, an object `.tar` (with a warning) to link on the device; cuda -> `.so` plus the
binaries. Files are written to a temporary name and renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import onnx

from pruneaug.codegen.workspace import WORKSPACE_FUNCTION, has_workspace
from pruneaug.cost_model.targets import TargetProfile
from pruneaug.errors import CodegenError
from pruneaug.runtime import cuda_source_key

SIGNATURE_SCHEMA = 1
CUDA_FATBINS_KEPT = 16  # compiled CUDA modules remembered by source (a model's build has one or a few)
CROSS_COMPILER = "aarch64-linux-gnu-gcc"


def model_signature(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict:
    """The inputs (name, static shape, dtype) and output names that the compiled model takes and returns."""
    given = input_shapes or {}
    initializer_names = {init.name for init in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        tensor_type = value.type.tensor_type
        shape = given.get(value.name) or [d.dim_value for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        inputs.append({"name": value.name, "shape": [int(d) for d in shape], "dtype": dtype})
    return {"inputs": inputs, "outputs": [value.name for value in model.graph.output]}


def export_artifact(executable, target: TargetProfile, path_without_suffix, signature: Mapping) -> Path:
    """Write the library for `target` and its `.json` sidecar; return the library's path."""
    stem = Path(path_without_suffix)
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = {"schema": SIGNATURE_SCHEMA, "target": target.name, "kind": target.kind, **signature}
    if target.kind != "cuda":  # the pool its parallel kernels were built for (`runtime.load` checks it)
        meta["threads"] = target.cores
    if has_workspace(target):  # `main` takes this function's tensors after the inputs
        meta["workspace"] = WORKSPACE_FUNCTION
    if target.kind == "arm64":
        if shutil.which(CROSS_COMPILER):
            from tvm.support import cc

            path = stem.with_name(stem.name + ".so")
            _write_atomic(path, lambda tmp: executable.export_library(tmp, fcompile=cc.cross_compiler(CROSS_COMPILER)))
        else:
            warnings.warn(
                f"{CROSS_COMPILER} not found (Debian: apt-get install gcc-aarch64-linux-gnu): wrote object files "
                "in a .tar instead of a .so; link them on the device"
            )
            path = stem.with_name(stem.name + ".tar")
            _write_atomic(path, executable.export_library)
    else:
        path = stem.with_name(stem.name + ".so")
        if target.kind == "cuda":
            meta["cuda_binaries"] = _compile_cuda_binaries(executable, target)
        _write_atomic(path, executable.export_library)
    sidecar = path.with_name(path.name + ".json")
    _write_atomic(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    return path


def _artifact_files(path: Path) -> tuple[Path, Path]:
    """An artifact's library and its `.json` sidecar."""
    return Path(path), Path(path).with_name(Path(path).name + ".json")


def remove_artifact(path: Path) -> None:
    """Delete an artifact written by `export_artifact` and its sidecar (one that failed its gate)."""
    for file in _artifact_files(path):
        file.unlink(missing_ok=True)


def move_artifact(path: Path, path_without_suffix: Path) -> Path:
    """Move an artifact and its sidecar to `path_without_suffix` plus the library's suffix; the new path."""
    library, sidecar = _artifact_files(path)
    target = Path(path_without_suffix).with_name(Path(path_without_suffix).name + library.suffix)
    for source, destination in zip((library, sidecar), _artifact_files(target)):
        source.replace(destination)
    return target


POOL_LAUNCH = b"TVMBackendParallelLaunch"  # what a kernel built with a parallel loop calls into TVM's runtime


def uses_thread_pool(path: Path) -> bool:
    """Whether a CPU artifact has a kernel that runs on TVM's thread pool: its code calls `POOL_LAUNCH`, a
    symbol it imports by name (a .so's dynamic strings, a .tar's object files). Without one, the build
    for several cores runs every kernel on the calling thread, as the build for one core does."""
    return POOL_LAUNCH in Path(path).read_bytes()


def cuda_sources(module) -> list[str]:
    """The CUDA source of every CUDA module imported (at any depth) by `module`."""
    sources = [module.inspect_source("cuda")] if module.kind == "cuda" else []
    for imported in module.imports:
        sources += cuda_sources(imported)
    return sources


def _compile_cuda_binaries(executable, target: TargetProfile) -> dict[str, str]:
    """nvcc-compile each CUDA module that still carries its source to a fatbin (`cuda_fatbin`), base64,
    keyed by the source's digest: what `pruneaug.runtime` serves when TVM's CUDA runtime asks to compile it."""
    binaries = {}
    for source in cuda_sources(executable.mod):
        binaries[cuda_source_key(source)] = base64.b64encode(cuda_fatbin(source, target)).decode()
    return binaries


def cuda_fatbin(source: str, target: TargetProfile) -> bytes:
    """A fatbin of CUDA `source`: SASS for the target's arch and for every newer arch of the CUDA profiles,
    plus the target's PTX for GPUs newer still. (PTX alone is not enough on a newer GPU: the driver's
    JIT library is missing from some containers, which then fail with CUDA_ERROR_NO_BINARY_FOR_GPU.)"""
    try:
        return _fatbin(source, _sm_number(target))
    except (RuntimeError, OSError) as err:
        raise CodegenError(f"nvcc could not compile the CUDA kernels for {target.name}: {err}") from err


@lru_cache(maxsize=CUDA_FATBINS_KEPT)
def _fatbin(source: str, arch: int) -> bytes:
    """nvcc's fatbin of `source` for `arch` and newer (`cuda_fatbin`), memoised: on a machine with a GPU
    the build compiles each module (`cuda_binaries_at_build`) and the export asks for the same sources."""
    import tvm
    from tvm.support import nvcc

    gencode = [item for sm in cuda_archs_from(arch) for item in ("-gencode", f"arch=compute_{sm},code=sm_{sm}")]
    gencode += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    with tvm.target.Target({"kind": "cuda", "arch": f"sm_{arch}"}):  # nvcc's options read the arch off it
        return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=gencode, compiler="nvcc"))


@contextlib.contextmanager
def cuda_binaries_at_build(target: TargetProfile) -> Iterator[None]:
    """While TVM builds for a CUDA `target`, have it embed `cuda_fatbin`'s binaries.

    On a machine with a GPU, TVM compiles CUDA modules as it builds them (NVRTC, through the global
    `tvm_callback_cuda_compile`) for exactly the target's arch: an sm_80 artifact built on an H100
    machine then failed there with CUDA_ERROR_NO_BINARY_FOR_GPU. Without a GPU TVM keeps the source,
    and the sidecar's binaries serve it at load time. Without nvcc, TVM's own callback stays."""
    import tvm_ffi

    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    if target.kind != "cuda" or shutil.which("nvcc") is None:
        yield
        return
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", lambda source, *_: cuda_fatbin(str(source), target),
                                 override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)
        else:
            tvm_ffi.remove_global_func("tvm_callback_cuda_compile")


def _sm_number(target: TargetProfile) -> int:
    return int(str(target.tvm_target.get("arch", "sm_80")).removeprefix("sm_").rstrip("a"))


def cuda_archs_from(arch: int) -> list[int]:
    """`arch` and the newer SM versions among the built-in CUDA profiles, ascending."""
    from pruneaug.cost_model.targets import builtin_profiles

    known = {_sm_number(profile) for profile in builtin_profiles().values() if profile.kind == "cuda"}
    return sorted({arch} | {sm for sm in known if sm > arch})


def _write_atomic(path: Path, write) -> None:
    """Call `write(tmp_path)` for a file in a temporary folder beside `path`, then rename it onto `path`.

    The file is created by `write` itself (not pre-created by mkstemp), so it gets the usual permissions."""
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = folder / path.name
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
