"""The registry of named targets: what TVM compiles for, and the hardware the cost model assumes.

    >>> resolve_target("arm64").tvm_target["mtriple"]
    'aarch64-linux-gnu'
    >>> resolve_target("arm64:cortex-a55").cores
    4

`x86` is always the host CPU: its cores, SIMD width and caches are read off the machine, and its
peak flops and memory bandwidth are measured once by a microbenchmark (`hardware_peaks`) and kept
in the latency cache. `arm64` and `cuda` name a default profile; `arm64:cortex-a55` picks another.

A user adds a profile without touching code, in a TOML or JSON file:

    # boards.toml
    [profiles."arm64:rpi4"]
    kind = "arm64"
    tvm_target = { kind = "llvm", mtriple = "aarch64-linux-gnu", mcpu = "cortex-a72", mattr = ["+neon"] }
    cores = 4
    simd_bytes = 16
    freq_ghz = 1.8
    l1_bytes = 32768
    l2_bytes = 1048576
    peak_gflops = 57.6
    mem_gbps = 4.0

and names it with `resolve_target("arm64:rpi4", profile_file="boards.toml")`, with the file in the
environment variable `PRUNEAUG_PROFILES`, or as `--target boards.toml` (a file holding one profile)
or `--target boards.toml#arm64:rpi4`. JSON files have the same layout (`{"profiles": {...}}`).
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from pruneaug.errors import TargetError
from pruneaug.pool import physical_cores

TARGET_KINDS = ("x86", "arm64", "cuda")
PROFILES_ENV = "PRUNEAUG_PROFILES"


@dataclass(frozen=True)
class TargetProfile:
    """One concrete device: the TVM target to compile for and its hardware figures.

    Sizes are bytes, l1/l2 per core, l3 shared. `peak_gflops` (fp32, all cores) and `mem_gbps`
    are None only for the host, whose figures `hardware_peaks` measures on first use.
    """

    name: str  # e.g. "x86", "arm64:cortex-a76", "cuda:sm_90"
    kind: str  # one of TARGET_KINDS
    tvm_target: dict[str, Any]
    cores: int  # CPU cores, or streaming multiprocessors for CUDA
    simd_bytes: int  # vector register width in bytes (32 for AVX2, 16 for NEON, a warp's 128 for CUDA)
    freq_ghz: float = 0.0
    l1_bytes: int = 0
    l2_bytes: int = 0
    l3_bytes: int = 0
    peak_gflops: float | None = None
    mem_gbps: float | None = None
    call_overhead_s: float = 2e-6  # one kernel call (CPU: thread-pool wake-up) or launch (CUDA)
    model: str = ""  # the hardware in words; part of the cache key
    extra: dict[str, Any] = field(default_factory=dict)

    def tvm(self):
        """The `tvm.target.Target`; built lazily so importing this module needs no TVM."""
        import tvm

        host = self.tvm_target.get("host")
        spec = {k: v for k, v in self.tvm_target.items() if k != "host"}
        return tvm.target.Target(spec, host=host) if host else tvm.target.Target(spec)

    @property
    def cache_key(self) -> str:
        """Identity of the hardware and compiler target: two profiles that time alike share it."""
        target = json.dumps(self.tvm_target, sort_keys=True)
        return f"{self.name}|{self.model}|{target}|cores={self.cores}"

    @property
    def simd_lanes(self) -> int:
        """fp32 lanes per vector register (a warp for CUDA)."""
        return max(1, self.simd_bytes // 4)


# --- the host --------------------------------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where it cannot be read)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _parse_size(text: str) -> int:
    """'32K' / '512K' / '32768K' / '2M' as in sysfs cache sizes, in bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * scale


def _host_caches(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[int, int]:
    """Data/unified cache size per level, read from sysfs ({} where it is not there)."""
    sizes: dict[int, int] = {}
    for index in sorted(Path(root).glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified"):
            sizes[level] = size
    return sizes


@lru_cache(maxsize=1)
def _host_profile() -> TargetProfile:
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    simd_bytes = 64 if "avx512f" in flags else 32 if "avx2" in flags else 16
    caches = _host_caches()
    try:
        freq_ghz = float(info.get("cpu MHz", "0")) / 1000
    except ValueError:
        freq_ghz = 0.0
    return TargetProfile(
        name="x86",
        kind="x86",
        tvm_target={"kind": "llvm", "mcpu": cpu},
        cores=physical_cores(),
        simd_bytes=simd_bytes,
        freq_ghz=freq_ghz,
        l1_bytes=caches.get(1, 32 << 10),
        l2_bytes=caches.get(2, 512 << 10),
        l3_bytes=caches.get(3, 0),
        model=f"{info.get('model name', 'unknown x86')} ({cpu})",
    )


def hardware_peaks(profile: TargetProfile) -> tuple[float, float]:
    """(peak fp32 GFLOP/s over all cores, memory GB/s): the profile's, or measured for the host.

    The host's figures come from a one-off microbenchmark (a few seconds at most) kept in the
    latency cache, so each machine measures them once.
    """
    if profile.peak_gflops is not None and profile.mem_gbps is not None:
        return profile.peak_gflops, profile.mem_gbps
    from pruneaug.cost_model.cache import open_cache
    from pruneaug.cost_model.measured import measure_peaks

    cache = open_cache()
    stored = cache.get_peaks(profile.cache_key)
    if stored is None:
        stored = measure_peaks()
        cache.put_peaks(profile.cache_key, *stored)
    return stored


# --- built-in profiles -----------------------------------------------------------------------
# Public sources for the figures below:
# - Cortex-A76: Arm Cortex-A76 Core Technical Reference Manual (64 KiB L1D, 256/512 KiB private L2,
#   two 128-bit NEON FMA pipes = 16 fp32 flop/cycle); board: Raspberry Pi 5 product brief (BCM2712,
#   4x A76 at 2.4 GHz, 512 KiB L2 per core, 2 MiB shared L3, 32-bit LPDDR4X-4267 = 17 GB/s peak,
#   about 10 GB/s sustained in public STREAM runs).
# - Cortex-A55: Arm Cortex-A55 Core Technical Reference Manual (16-64 KiB L1D, 0-256 KiB L2,
#   one 128-bit FMA per cycle = 8 fp32 flop/cycle); board: Rockchip RK3568 datasheet (4x A55 up to
#   2.0 GHz, 32 KiB L1D, 512 KiB shared L3, 32-bit DDR4/LPDDR4 at 1600 MHz, about 5 GB/s sustained).
# - sm_80: NVIDIA A100 Tensor Core GPU Architecture whitepaper (108 SMs at 1.41 GHz, 19.5 TFLOP/s fp32,
#   1555 GB/s HBM2e for the 40 GB part, 192 KiB L1/shared per SM, 40 MiB L2).
# - sm_90: NVIDIA H100 Tensor Core GPU Architecture whitepaper (SXM5: 132 SMs at 1.98 GHz,
#   67 TFLOP/s fp32, 3.35 TB/s HBM3, 256 KiB L1/shared per SM, 50 MiB L2).
# Kernel launch overhead on CUDA is about 5 us (CUDA C Best Practices Guide, "Kernel launch").

_BUILTIN: dict[str, dict[str, Any]] = {
    "arm64:cortex-a76": {
        "kind": "arm64",
        "tvm_target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon"]},
        "cores": 4, "simd_bytes": 16, "freq_ghz": 2.4,
        "l1_bytes": 64 << 10, "l2_bytes": 512 << 10, "l3_bytes": 2 << 20,
        "peak_gflops": 4 * 2.4 * 16, "mem_gbps": 10.0, "call_overhead_s": 5e-6,
        "model": "Cortex-A76 (Raspberry Pi 5 class)",
    },
    "arm64:cortex-a55": {
        "kind": "arm64",
        "tvm_target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55", "mattr": ["+neon"]},
        "cores": 4, "simd_bytes": 16, "freq_ghz": 2.0,
        "l1_bytes": 32 << 10, "l2_bytes": 0, "l3_bytes": 512 << 10,
        "peak_gflops": 4 * 2.0 * 8, "mem_gbps": 5.0, "call_overhead_s": 8e-6,
        "model": "Cortex-A55 (RK3568 class)",
    },
    "cuda:sm_80": {
        "kind": "cuda",
        "tvm_target": {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}},
        "cores": 108, "simd_bytes": 128, "freq_ghz": 1.41,
        "l1_bytes": 192 << 10, "l2_bytes": 40 << 20, "l3_bytes": 0,
        "peak_gflops": 19500.0, "mem_gbps": 1555.0, "call_overhead_s": 5e-6,
        "model": "NVIDIA A100",
    },
    "cuda:sm_90": {
        "kind": "cuda",
        "tvm_target": {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}},
        "cores": 132, "simd_bytes": 128, "freq_ghz": 1.98,
        "l1_bytes": 256 << 10, "l2_bytes": 50 << 20, "l3_bytes": 0,
        "peak_gflops": 67000.0, "mem_gbps": 3350.0, "call_overhead_s": 5e-6,
        "model": "NVIDIA H100 SXM",
    },
}
_DEFAULTS = {"arm64": "arm64:cortex-a76", "cuda": "cuda:sm_80"}

_REQUIRED = ("tvm_target", "cores", "simd_bytes", "peak_gflops", "mem_gbps")
_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "tvm_target": (dict,), "cores": (int,), "simd_bytes": (int,),
    "freq_ghz": (int, float), "l1_bytes": (int,), "l2_bytes": (int,), "l3_bytes": (int,),
    "peak_gflops": (int, float), "mem_gbps": (int, float), "call_overhead_s": (int, float),
    "model": (str,), "extra": (dict,),
}


def _build_profile(name: str, entry: Any, where: str) -> TargetProfile:
    """A profile from one table of a profile file; `where` names the file for error messages."""
    if not isinstance(entry, dict):
        raise TargetError(f"{where}: profile {name!r} must be a table of fields")
    known = {f.name for f in fields(TargetProfile)} - {"name"}
    for key, value in entry.items():
        if key not in known:
            raise TargetError(f"{where}: profile {name!r}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        if not isinstance(value, _TYPES[key]) or isinstance(value, bool):
            kinds = " or ".join(t.__name__ for t in _TYPES[key])
            raise TargetError(f"{where}: profile {name!r}: key {key!r} must be {kinds}, got {value!r}")
    for key in _REQUIRED:
        if key not in entry:
            raise TargetError(f"{where}: profile {name!r}: missing key {key!r}")
    kind = entry.get("kind", name.split(":", 1)[0])
    if kind not in TARGET_KINDS:
        raise TargetError(f"{where}: profile {name!r}: key 'kind' is {kind!r}; expected one of {', '.join(TARGET_KINDS)}")
    if "kind" not in entry["tvm_target"]:
        raise TargetError(f"{where}: profile {name!r}: key 'tvm_target' needs a 'kind' (e.g. 'llvm')")
    for key in ("cores", "simd_bytes", "peak_gflops", "mem_gbps"):
        if entry[key] <= 0:
            raise TargetError(f"{where}: profile {name!r}: key {key!r} must be > 0, got {entry[key]!r}")
    values = {k: (float(v) if _TYPES[k] == (int, float) else v) for k, v in entry.items()}
    values["kind"] = kind
    return TargetProfile(name=name, **values)


def load_profiles(path: str | os.PathLike) -> dict[str, TargetProfile]:
    """Every profile of a TOML or JSON profile file, by name; errors name the file and key."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as err:
        raise TargetError(f"profile file {str(path)!r}: cannot read it ({err.strerror or err})") from None
    try:
        if path.suffix.lower() == ".json":
            document = json.loads(text)
        else:
            document = tomllib.loads(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise TargetError(f"profile file {str(path)!r}: not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("profiles"), dict) or not document["profiles"]:
        raise TargetError(f"profile file {str(path)!r}: expected a non-empty table 'profiles' of named profiles")
    return {name: _build_profile(name, entry, f"profile file {str(path)!r}") for name, entry in document["profiles"].items()}


def builtin_profiles() -> dict[str, TargetProfile]:
    """The profiles shipped with pruneaug (the host `x86` is built on demand)."""
    return {name: _build_profile(name, dict(entry), "built-in profiles") for name, entry in _BUILTIN.items()}


def _from_file_spec(spec: str) -> TargetProfile | None:
    """`boards.toml` (one profile) or `boards.toml#name`; None when `spec` names no file."""
    file_part, _, wanted = spec.partition("#")
    if not file_part.lower().endswith((".toml", ".json")):
        return None
    profiles = load_profiles(file_part)
    if wanted:
        if wanted not in profiles:
            raise TargetError(f"--target {spec!r}: profile {wanted!r} is not in {file_part!r}; it has {', '.join(profiles)}")
        return profiles[wanted]
    if len(profiles) != 1:
        raise TargetError(f"--target {spec!r}: {file_part!r} holds {len(profiles)} profiles; pick one as {file_part}#NAME")
    return next(iter(profiles.values()))


def resolve_target(spec: str, profile_file: str | os.PathLike | None = None) -> TargetProfile:
    """Turn `x86`, `arm64`, `arm64:cortex-a55`, `cuda:sm_90`, a profile file, or a user profile name
    (from `profile_file` or $PRUNEAUG_PROFILES) into a profile, or say what exists."""
    if spec == "x86":
        return _host_profile()
    from_file = _from_file_spec(spec)
    if from_file is not None:
        return from_file
    profiles = builtin_profiles()
    user_file = profile_file if profile_file is not None else os.environ.get(PROFILES_ENV)
    if user_file:
        profiles.update(load_profiles(user_file))
    name = _DEFAULTS.get(spec, spec)
    if name in profiles:
        return profiles[name]
    known = ", ".join(["x86", *_DEFAULTS, *profiles])
    raise TargetError(f"--target {spec!r}: unknown target; known targets: {known}")


def check_target_name(spec: str) -> None:
    """Raise TargetError for a target `resolve_target` would refuse, without probing the host (which needs TVM)."""
    if spec != "x86":
        resolve_target(spec)
