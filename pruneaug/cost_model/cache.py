"""The latency cache: measured kernel times in SQLite, so nothing is measured twice.

    >>> cache = open_cache()                       # ~/.cache/pruneaug/latency.sqlite or $PRUNEAUG_CACHE
    >>> cache.put(profile.cache_key, 768, 768, 128, (8, 8), 0.2, 1.3e-4)
    >>> cache.get(profile.cache_key, 768, 768, 128, (8, 8), 0.2)
    0.00013

Rows are keyed by target profile, TVM version, kernel version (a hash of `codegen/bsr.py`'s
source, tagged with the timing protocol's `MEASUREMENT_PROTOCOL`), layer shape, m, block and
density, so a new TVM, a changed kernel or a figure that now means something else invalidates old
rows without deleting them. Block (0, 0) stands for the dense kernel. Convs' own kernels are kept
apart (table `conv_latency`, keyed by the conv's whole geometry and versioned by
`codegen/conv_lowering.py` and what it imports). The file is in WAL mode with a
busy timeout, so several compiles can write at once; a corrupted or unreadable file is renamed
aside with a warning and a fresh one is built (or, where nothing can be written, an in-memory one).
The same file keeps `records`: other measured figures a later compile may reuse (the layer
sensitivities of `passes/sensitivity_store.py`), each under a key that says what it depends on.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")
CACHE_ENV = "PRUNEAUG_CACHE"
DEFAULT_PATH = Path("~/.cache/pruneaug/latency.sqlite")
DENSE_BLOCK = (0, 0)
# What a cached figure means: bump it whenever `measured.py`'s protocol changes what it measures.
# 3: >= 2 ms samples, each paired with a reference kernel's; one-thread kernels timed by CPU time;
#    host cores = TVM_NUM_THREADS. 4: a kernel without a parallel loop timed by CPU time, unpaired.
# 5: host cores = the threads TVM's pool holds, sized by `pool` (4's parallel kernels, timed without
#    TVM_NUM_THREADS on a 2-vCPU x86 VM, ran on a pool of one thread under a two-core key).
MEASUREMENT_PROTOCOL = 5
_BUSY_TIMEOUT_S = 60.0
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS latency (
    target TEXT NOT NULL, tvm_version TEXT NOT NULL, kernel_version TEXT NOT NULL,
    out INTEGER NOT NULL, in_ INTEGER NOT NULL, m INTEGER NOT NULL,
    block_r INTEGER NOT NULL, block_c INTEGER NOT NULL, density REAL NOT NULL,
    seconds REAL NOT NULL, device TEXT NOT NULL DEFAULT '', measured_at REAL NOT NULL,
    PRIMARY KEY (target, tvm_version, kernel_version, out, in_, m, block_r, block_c, density)
);
CREATE TABLE IF NOT EXISTS conv_latency (
    target TEXT NOT NULL, tvm_version TEXT NOT NULL, kernel_version TEXT NOT NULL, conv TEXT NOT NULL,
    block_r INTEGER NOT NULL, block_c INTEGER NOT NULL, density REAL NOT NULL,
    seconds REAL NOT NULL, device TEXT NOT NULL DEFAULT '', measured_at REAL NOT NULL,
    PRIMARY KEY (target, tvm_version, kernel_version, conv, block_r, block_c, density)
);
CREATE TABLE IF NOT EXISTS peaks (target TEXT PRIMARY KEY, gflops REAL NOT NULL, gbps REAL NOT NULL);
CREATE TABLE IF NOT EXISTS reference (
    target TEXT NOT NULL, tvm_version TEXT NOT NULL, kernel_version TEXT NOT NULL, seconds REAL NOT NULL,
    PRIMARY KEY (target, tvm_version, kernel_version)
);
CREATE TABLE IF NOT EXISTS records (kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
                                    PRIMARY KEY (kind, key));
"""


@dataclass(frozen=True)
class Measurement:
    """One cached kernel time."""

    out: int
    in_: int
    m: int
    block: tuple[int, int]
    density: float
    seconds: float


@dataclass(frozen=True)
class ConvMeasurement:
    """One cached time of a Conv's kernels (`conv_shape.ConvShape.key`), summed over its calls."""

    conv: str
    block: tuple[int, int]
    density: float
    seconds: float


def cache_path() -> Path:
    """Where the cache lives: $PRUNEAUG_CACHE, else ~/.cache/pruneaug/latency.sqlite."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_PATH).expanduser()


def current_tvm_version() -> str:
    """The installed TVM's version, read from package metadata (importing TVM takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        import tvm

        return tvm.__version__


_CODEGEN_IMPORT = re.compile(r"from\s+(?:pruneaug\.codegen)?\.(\w+)\s+import|from\s+pruneaug\.codegen\s+import\s+([\w, ]+)")


@lru_cache(maxsize=2)
def current_kernel_version(root: str = "bsr") -> str:
    """A hash of the kernels' source (`codegen/{root}.py` and the codegen modules it imports: the
    matmul kernels from `bsr`, a Conv's calls from `conv_lowering`), then ".p" and the MEASUREMENT_PROTOCOL.

    Read as text, not imported, so asking costs no TVM import; any change to the kernels or to
    what a measurement means invalidates the times measured before.
    """
    spec = importlib.util.find_spec("pruneaug.codegen")
    folder = Path(next(iter(spec.submodule_search_locations)))
    assert (folder / f"{root}.py").is_file(), f"no kernel module codegen/{root}.py to version the cache by"
    digest = hashlib.sha256()
    todo, seen = [root], set()
    while todo:
        name = todo.pop()
        path = folder / f"{name}.py"
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        source = path.read_bytes()
        digest.update(name.encode() + b"\0" + source)
        for one, many in _CODEGEN_IMPORT.findall(source.decode("utf-8", "replace")):
            todo.extend([one] if one else [n.strip() for n in many.split(",")])
    return f"{digest.hexdigest()[:16] if seen else 'no-kernels'}.p{MEASUREMENT_PROTOCOL}"


def record_key(parts: Iterable[bytes | str | memoryview]) -> str:
    """The key of a record (`LatencyCache.put_record`) derived from exactly `parts`: their SHA-256, each
    part prefixed with its byte count (so that no two sequences collide by where they split). Buffers are
    read in place: a model's weights are hundreds of MB, not to be copied into one string."""
    digest = hashlib.sha256()
    for part in parts:
        data = memoryview(part.encode() if isinstance(part, str) else part)
        digest.update(data.nbytes.to_bytes(8, "little"))  # nbytes: len() of an array's buffer counts its rows
        digest.update(data)
    return digest.hexdigest()


def density_key(density: float) -> float:
    return round(float(density), 6)


class LatencyCache:
    """One SQLite cache file (or memory, as a last resort) with the versions it reads and writes."""

    def __init__(self, path: Path | str, tvm_version: str | None = None, kernel_version: str | None = None,
                 conv_kernel_version: str | None = None):
        self.path = Path(path)
        self.tvm_version = tvm_version if tvm_version is not None else current_tvm_version()
        self.kernel_version = kernel_version if kernel_version is not None else current_kernel_version()
        self.conv_kernel_version = (conv_kernel_version if conv_kernel_version is not None
                                    else current_kernel_version("conv_lowering"))
        self._conn = self._open()

    # --- opening and recovering -----------------------------------------------------------

    def _connect(self, where: str) -> sqlite3.Connection:
        conn = sqlite3.connect(where, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
        if where != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # in WAL mode: durable against crashes, not power loss
        conn.executescript(_SCHEMA)
        conn.execute("SELECT count(*) FROM latency").fetchone()
        return conn

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self._connect(str(self.path))
        except sqlite3.DatabaseError as err:
            if getattr(err, "sqlite_errorcode", None) in _CORRUPT_CODES:
                return self._set_aside(err)
            return self._in_memory(err)
        except OSError as err:
            return self._in_memory(err)

    def _set_aside(self, err: Exception) -> sqlite3.Connection:
        """Rename a corrupted file (and its WAL files) aside, warn, and start a fresh one."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        except OSError as rename_err:
            return self._in_memory(rename_err)
        warnings.warn(f"latency cache {self.path} was unreadable ({err}); moved it to {aside} and started a new one",
                      RuntimeWarning, stacklevel=3)
        try:
            return self._connect(str(self.path))
        except (sqlite3.DatabaseError, OSError) as again:
            return self._in_memory(again)

    def _in_memory(self, err: Exception) -> sqlite3.Connection:
        warnings.warn(f"latency cache {self.path} cannot be used ({err}); measurements are kept in memory only",
                      RuntimeWarning, stacklevel=3)
        return self._connect(":memory:")

    def _recovering(self, action: Callable[[sqlite3.Connection], _T]) -> _T:
        """`action(connection)`; a file found corrupt mid-run is set aside and the action retried once on a fresh one."""
        try:
            return action(self._conn)
        except sqlite3.DatabaseError as err:
            if getattr(err, "sqlite_errorcode", None) not in _CORRUPT_CODES:
                raise
            self._conn.close()
            self._conn = self._set_aside(err)
            return action(self._conn)

    def _execute(self, sql: str, params=()) -> list[tuple]:
        """Run one statement (see `_recovering`)."""
        return self._recovering(lambda conn: conn.execute(sql, params).fetchall())

    def _write_many(self, sql: str, values: list[tuple]) -> None:
        """Run one statement for every row of `values` in one transaction (see `_recovering`)."""

        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(sql, values)

        self._recovering(write)

    def close(self) -> None:
        self._conn.close()

    # --- kernel times -----------------------------------------------------------------------

    def _versions(self, target: str) -> tuple[str, str, str]:
        return (target, self.tvm_version, self.kernel_version)

    def get(self, target: str, out: int, in_: int, m: int, block: tuple[int, int], density: float) -> float | None:
        """The cached seconds of one kernel, or None."""
        rows = self._execute(
            "SELECT seconds FROM latency WHERE target=? AND tvm_version=? AND kernel_version=? AND out=? AND in_=?"
            " AND m=? AND block_r=? AND block_c=? AND density=?",
            (*self._versions(target), out, in_, m, block[0], block[1], density_key(density)),
        )
        return rows[0][0] if rows else None

    def put(self, target: str, out: int, in_: int, m: int, block: tuple[int, int], density: float,
            seconds: float, device: str = "") -> None:
        """Store one kernel time (a re-measurement replaces the old one)."""
        self.put_many(target, [Measurement(out, in_, m, tuple(block), density, seconds)], device)

    def put_many(self, target: str, rows: list[Measurement], device: str = "") -> None:
        """Store several kernel times in one transaction."""
        now = time.time()
        values = [(*self._versions(target), r.out, r.in_, r.m, r.block[0], r.block[1], density_key(r.density),
                   float(r.seconds), device, now) for r in rows]
        sql = ("INSERT OR REPLACE INTO latency (target, tvm_version, kernel_version, out, in_, m, block_r, block_c,"
               " density, seconds, device, measured_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")
        self._write_many(sql, values)

    def all(self, target: str) -> list[Measurement]:
        """Every kernel time cached for this target under the current TVM and kernel versions."""
        rows = self._execute(
            "SELECT out, in_, m, block_r, block_c, density, seconds FROM latency"
            " WHERE target=? AND tvm_version=? AND kernel_version=?",
            self._versions(target),
        )
        return [Measurement(o, i, m, (r, c), d, s) for o, i, m, r, c, d, s in rows]

    def put_conv(self, target: str, rows: list[ConvMeasurement], device: str = "") -> None:
        """Store Convs' kernel times in one transaction (a re-measurement replaces the old one)."""
        now = time.time()
        values = [(target, self.tvm_version, self.conv_kernel_version, r.conv, r.block[0], r.block[1],
                   density_key(r.density), float(r.seconds), device, now) for r in rows]
        sql = ("INSERT OR REPLACE INTO conv_latency (target, tvm_version, kernel_version, conv, block_r, block_c,"
               " density, seconds, device, measured_at) VALUES (?,?,?,?,?,?,?,?,?,?)")
        self._write_many(sql, values)

    def all_conv(self, target: str) -> list[ConvMeasurement]:
        """Every Conv time cached for this target under the current TVM and conv kernel versions."""
        rows = self._execute(
            "SELECT conv, block_r, block_c, density, seconds FROM conv_latency"
            " WHERE target=? AND tvm_version=? AND kernel_version=?",
            (target, self.tvm_version, self.conv_kernel_version),
        )
        return [ConvMeasurement(k, (r, c), d, s) for k, r, c, d, s in rows]

    # --- the reference kernel's quiet time (measured.LocalRunner scales its ratios by it) ------

    def get_reference(self, target: str) -> float | None:
        rows = self._execute("SELECT seconds FROM reference WHERE target=? AND tvm_version=? AND kernel_version=?",
                             self._versions(target))
        return rows[0][0] if rows else None

    def put_reference(self, target: str, seconds: float) -> None:
        """Keep the first figure: every cached time of these versions was scaled by it."""
        self._execute("INSERT OR IGNORE INTO reference (target, tvm_version, kernel_version, seconds) VALUES (?,?,?,?)",
                      (*self._versions(target), float(seconds)))

    # --- hardware peaks -----------------------------------------------------------------------

    def get_peaks(self, target: str) -> tuple[float, float] | None:
        rows = self._execute("SELECT gflops, gbps FROM peaks WHERE target=?", (target,))
        return (rows[0][0], rows[0][1]) if rows else None

    def put_peaks(self, target: str, gflops: float, gbps: float) -> None:
        self._execute("INSERT OR REPLACE INTO peaks (target, gflops, gbps) VALUES (?,?,?)", (target, gflops, gbps))


    # --- other figures a compile measures and a later one may reuse -------------------------

    def get_record(self, kind: str, key: str) -> str | None:
        """A stored text (e.g. a model's layer sensitivities, keyed by a digest of what they depend on), or None."""
        rows = self._execute("SELECT value FROM records WHERE kind=? AND key=?", (kind, key))
        return rows[0][0] if rows else None

    def put_record(self, kind: str, key: str, value: str) -> None:
        self._execute("INSERT OR REPLACE INTO records (kind, key, value) VALUES (?,?,?)", (kind, key, value))


_OPEN: dict[Path, LatencyCache] = {}


def open_cache() -> LatencyCache:
    """The process's cache for the current `cache_path()` (opened once per path)."""
    path = cache_path()
    if path not in _OPEN:
        _OPEN[path] = LatencyCache(path)
    return _OPEN[path]
