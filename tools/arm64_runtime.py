"""Prepare TVM's aarch64 runtime and a small harness so that cross-compiled kernels run under qemu.

    python tools/arm64_runtime.py            # -> ~/.cache/pruneaug/arm64-runtime (or $PRUNEAUG_ARM64_RUNTIME)
    python tools/arm64_runtime.py --wheels /path/with/the/two/wheels   # offline: no pip download

A library exported for arm64 (`export_library(..., fcompile=cross_compiler("aarch64-linux-gnu-gcc"))`)
calls into TVM's runtime, so checking it on an x86 machine needs that runtime built for aarch64:
`libtvm_runtime.so` from the apache-tvm wheel for manylinux_2_28_aarch64 and `libtvm_ffi.so` from
apache-tvm-ffi's (the versions pinned below, the ones installed for x86). This script downloads the two
wheels from PyPI with pip, extracts the libraries and the tvm-ffi C++ headers into the folder, and builds
`tools/arm64_harness.cc` with `aarch64-linux-gnu-g++` against them. It is idempotent: a second run with
the same versions and harness source does nothing. `run_under_qemu` then runs one kernel function,
and `run_model_under_qemu` a whole compiled model, through the harness with
`qemu-aarch64 -L /usr/aarch64-linux-gnu` (tests/test_arm64_qemu.py uses them; nothing there
downloads anything). Needs (Debian): g++-aarch64-linux-gnu, qemu-user.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

RUNTIME_ENV = "PRUNEAUG_ARM64_RUNTIME"
DEFAULT_DIR = Path("~/.cache/pruneaug/arm64-runtime")
TVM_WHEEL = "apache-tvm==0.27.0.post1"
FFI_WHEEL = "apache-tvm-ffi==0.1.14.post0"  # 0.1.15.post2 segfaults in JSON serialisation (TVM_NOTES.md)
PLATFORM = "manylinux_2_28_aarch64"
CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")
HARNESS_SOURCE = Path(__file__).resolve().with_name("arm64_harness.cc")
# wheel member prefix -> folder under the runtime dir
EXTRACT = {
    "tvm/lib/libtvm_runtime.so": "lib",
    "tvm_ffi/lib/libtvm_ffi.so": "lib",
    "tvm_ffi/include/tvm/": "include/tvm",
    "tvm_ffi/include/dlpack/": "include/dlpack",
}


def runtime_dir() -> Path:
    """Where the runtime lives: $PRUNEAUG_ARM64_RUNTIME, else ~/.cache/pruneaug/arm64-runtime."""
    return Path(os.environ.get(RUNTIME_ENV) or DEFAULT_DIR).expanduser()


def harness_path(folder: Path) -> Path:
    """The aarch64 harness executable inside a runtime folder."""
    return folder / "bin" / "arm64_harness"


def _stamp() -> dict:
    """What a prepared folder was built from; a change in any of it means rebuilding."""
    return {"wheels": [TVM_WHEEL, FFI_WHEEL], "platform": PLATFORM,
            "harness_sha256": hashlib.sha256(HARNESS_SOURCE.read_bytes()).hexdigest()}


def is_prepared(folder: Path) -> bool:
    """True when `folder` holds the runtime and a harness built from today's pinned versions and source."""
    stamp = folder / "stamp.json"
    return (stamp.is_file() and harness_path(folder).is_file()
            and json.loads(stamp.read_text()) == _stamp())


def missing_tools() -> list[str]:
    """The host programs this needs that are not on PATH (or the aarch64 sysroot, if absent)."""
    missing = [tool for tool in (CXX, QEMU) if shutil.which(tool) is None]
    if not (SYSROOT / "lib").is_dir():
        missing.append(str(SYSROOT))
    return missing


def _download_wheels(dest: Path) -> None:
    """The two aarch64 wheels from the package index, without dependencies (they are not installed)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--platform", PLATFORM, "--python-version", "3.11",
         "--only-binary=:all:", TVM_WHEEL, FFI_WHEEL, "-d", str(dest)],
        check=True)


def _find_wheel(wheels: Path, requirement: str) -> Path:
    """The aarch64 wheel for a pinned `name==version` in the folder `wheels`."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*aarch64*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        raise SystemExit(f"no wheel matching {pattern} in {wheels}")
    return found[0]


def _extract(wheel: Path, folder: Path) -> None:
    """Copy the runtime libraries and headers out of `wheel` into `folder/lib` and `folder/include`."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.endswith("/"):
                continue
            for prefix, sub in EXTRACT.items():
                if member.startswith(prefix):
                    relative = Path(member).name if not prefix.endswith("/") else member[len(prefix):]
                    target = folder / sub / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(member))


def _build_harness(folder: Path) -> None:
    """Link against both runtime libraries (--no-as-needed) so that a loaded kernel library finds
    TVMBackend* symbols; the rpath makes the harness find them beside itself."""
    harness = harness_path(folder)
    harness.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [CXX, "-std=c++17", "-O2", f"-I{folder / 'include'}", str(HARNESS_SOURCE), "-o", str(harness),
         f"-L{folder / 'lib'}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN/../lib"],
        check=True)


def prepare(folder: Path, wheels: Path | None = None) -> Path:
    """Fill `folder` (download the wheels unless `wheels` holds them; extract; build) unless it is ready."""
    if is_prepared(folder):
        return folder
    missing = missing_tools()
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (Debian: apt-get install g++-aarch64-linux-gnu qemu-user)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stamp.json").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        if wheels is None:
            wheels = Path(scratch)
            _download_wheels(wheels)
        shutil.rmtree(folder / "include", ignore_errors=True)
        for requirement in (TVM_WHEEL, FFI_WHEEL):
            _extract(_find_wheel(wheels, requirement), folder)
    _build_harness(folder)
    (folder / "stamp.json").write_text(json.dumps(_stamp(), indent=1))
    return folder


def _spec(path: Path, array: np.ndarray) -> str:
    """The harness's `path:dtype:shape` argument for `array` stored raw at `path`."""
    return f"{path}:{array.dtype.name}:{'x'.join(str(d) for d in array.shape)}"


def _run_harness(folder: Path, leading: Sequence[str], inputs: Sequence[np.ndarray],
                 outputs: Sequence[tuple[Sequence[int], str]], timeout_s: float) -> list[np.ndarray]:
    """Run the harness under qemu with `leading` arguments, the inputs' specs and the outputs' specs."""
    with tempfile.TemporaryDirectory() as scratch:
        specs = []
        for i, array in enumerate(inputs):
            array = np.ascontiguousarray(array)
            path = Path(scratch) / f"in{i}.bin"
            array.tofile(path)
            specs.append(_spec(path, array))
        results = [np.zeros(shape, dtype) for shape, dtype in outputs]
        out_paths = [Path(scratch) / f"out{i}.bin" for i in range(len(results))]
        command = [QEMU, "-L", str(SYSROOT), str(harness_path(folder)), *leading, *specs,
                   *(_spec(path, out) for path, out in zip(out_paths, results))]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return [np.fromfile(path, out.dtype).reshape(out.shape) for path, out in zip(out_paths, results)]


def run_under_qemu(folder: Path, library: Path, func: str, inputs: Sequence[np.ndarray],
                   out_shape: Sequence[int], out_dtype: str = "float32", timeout_s: float = 300) -> np.ndarray:
    """Call `func(*inputs, out)` of the aarch64 `library` under qemu and return `out`."""
    return _run_harness(folder, [str(library), func], inputs, [(out_shape, out_dtype)], timeout_s)[0]


def run_model_under_qemu(folder: Path, artifact: Path, inputs: Sequence[np.ndarray],
                         outputs: Sequence[tuple[Sequence[int], str]], timeout_s: float = 600) -> list[np.ndarray]:
    """Run a whole aarch64 artifact (a Relax VM executable) under qemu: `main(*inputs)`, outputs of the given shapes."""
    return _run_harness(folder, ["--vm", str(artifact), str(len(inputs))], inputs, outputs, timeout_s)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None,
                        help=f"runtime folder (default ${RUNTIME_ENV} or {DEFAULT_DIR})")
    parser.add_argument("--wheels", type=Path, default=None, help="folder with the two aarch64 wheels (skips pip)")
    args = parser.parse_args(argv)
    print(prepare((args.dir or runtime_dir()).expanduser(), args.wheels))


if __name__ == "__main__":
    main()
