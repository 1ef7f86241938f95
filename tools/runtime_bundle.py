"""Pack what a compiled artifact needs on a machine without TVM's compiler: TVM's runtime and pruneaug's loader.

    python tools/runtime_bundle.py --out bundle/ [--python 3.12] [--wheels DIR]

DESIGN §4: an artifact is compiled on one machine and deployed on another with TVM's runtime alone.
This writes `bundle/site/` with three packages, and `bundle/pruneaug-runtime.tar.gz` holding the same:
- `tvm`, the installed one without `lib/libtvm_compiler.so` (~250 MB) and its C++ headers and
  sources: its runtime libraries (`libtvm_runtime.so`, `libtvm_runtime_cuda.so` for CUDA
  artifacts) and Python files;
- `tvm_ffi`, the installed one, or for another Python (`--python 3.12`) the same version's x86-64
  wheel for it, fetched by pip (`--wheels DIR`: from a folder instead, offline);
- `pruneaug`, whose `load` imports nothing of the compiler, nor onnx.

On the deploying machine, with numpy, ml_dtypes and typing_extensions installed (TVM's own needs):

    PYTHONPATH=site python -c "import pruneaug; print(pruneaug.load('model.x86.so').run({'input': x}))"

A CUDA artifact also needs the GPU's driver, not a CUDA toolkit: its kernels ship compiled.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

LEFT_OUT = {"libtvm_compiler.so", "3rdparty", "src", "include", "__pycache__"}  # not needed to load and run
FFI_DISTRIBUTION = "apache-tvm-ffi"
FFI_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")


def copy_runtime_tvm(site: Path, link: bool = False) -> Path:
    """The installed `tvm` package under `site`, less `LEFT_OUT` (symlinks instead of copies with `link`)."""
    import tvm

    _copy_tree(Path(tvm.__file__).parent, site / "tvm", link)
    return site


def _copy_tree(source: Path, dest: Path, link: bool) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name in LEFT_OUT:
            continue
        if entry.is_dir():
            _copy_tree(entry, dest / entry.name, link)
        elif link:
            (dest / entry.name).symlink_to(entry)
        else:
            shutil.copy2(entry, dest / entry.name)


def add_tvm_ffi(site: Path, python: str, wheels: Path | None) -> None:
    """`tvm_ffi` for `python` ("3.12"): the installed package for this interpreter's version, else the
    installed version's wheel for that Python (its compiled extension is per Python version)."""
    import tvm_ffi

    if python == f"{sys.version_info.major}.{sys.version_info.minor}" and wheels is None:
        _copy_tree(Path(tvm_ffi.__file__).parent, site / "tvm_ffi", link=False)
        return
    version = importlib.metadata.version(FFI_DISTRIBUTION)
    tag = "cp" + python.replace(".", "")
    with tempfile.TemporaryDirectory() as folder:
        source = wheels or Path(folder)
        if wheels is None:
            platforms = [item for p in FFI_PLATFORMS for item in ("--platform", p)]
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", python, "--implementation", "cp", "--abi", tag, *platforms,
                            "-d", folder, f"{FFI_DISTRIBUTION}=={version}"], check=True)
        found = sorted(source.glob(f"apache_tvm_ffi-{version}-{tag}-*.whl"))
        if not found:
            sys.exit(f"runtime_bundle: no apache_tvm_ffi-{version}-{tag} wheel in {source}")
        with zipfile.ZipFile(found[0]) as wheel:
            members = [name for name in wheel.namelist() if name.startswith("tvm_ffi/")
                       and not set(Path(name).parts) & LEFT_OUT]
            wheel.extractall(site, members)


def add_pruneaug(site: Path) -> None:
    _copy_tree(Path(__file__).resolve().parents[1] / "pruneaug", site / "pruneaug", link=False)


def build(out: Path, python: str, wheels: Path | None) -> Path:
    """`out/site` and `out/pruneaug-runtime.tar.gz` (see the module docstring); returns the archive."""
    site = out / "site"
    if site.exists():
        shutil.rmtree(site)
    copy_runtime_tvm(site)
    add_tvm_ffi(site, python, wheels)
    add_pruneaug(site)
    archive = out / "pruneaug-runtime.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for package in sorted(site.iterdir()):
            tar.add(package, arcname=package.name)
    return archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the deploying machine's Python, e.g. 3.12 (default: this one's)")
    parser.add_argument("--wheels", type=Path, help="a folder with the apache-tvm-ffi wheel (no download)")
    args = parser.parse_args()
    archive = build(args.out, args.python, args.wheels)
    print(f"{archive}: {archive.stat().st_size / 2**20:.1f} MiB; deploy with PYTHONPATH=<its contents>")


if __name__ == "__main__":
    main()
