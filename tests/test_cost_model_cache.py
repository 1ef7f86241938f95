"""The SQLite latency cache: round trip, versioning, recovery from corruption, concurrent writers."""
from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from pruneaug.cost_model.cache import (MEASUREMENT_PROTOCOL, LatencyCache, Measurement, cache_path,
                                      current_kernel_version, open_cache)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache."""
    monkeypatch.setenv("PRUNEAUG_CACHE", str(tmp_path / "default" / "latency.sqlite"))


def test_default_path_follows_the_environment(tmp_path):
    assert cache_path() == tmp_path / "default" / "latency.sqlite"
    cache = open_cache()
    assert cache is open_cache() and cache.path == cache_path() and cache.path.exists()
    mode = sqlite3.connect(cache.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_round_trip_survives_reopening(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = LatencyCache(path, tvm_version="0.27", kernel_version="k1")
    cache.put("x86|cpu", 768, 3072, 128, (16, 16), 0.2, 1.5e-4)
    cache.put("x86|cpu", 768, 3072, 128, (16, 16), 0.2, 1.25e-4)  # re-measured: replaces
    cache.put_peaks("x86|cpu", 100.0, 20.0)
    cache.put_reference("x86|cpu", 2e-3)
    cache.put_reference("x86|cpu", 1e-3)  # the first calibration scaled every time cached since: kept
    cache.close()
    again = LatencyCache(path, tvm_version="0.27", kernel_version="k1")
    assert again.get("x86|cpu", 768, 3072, 128, (16, 16), 0.2) == 1.25e-4
    assert again.get("x86|cpu", 768, 3072, 128, (16, 16), 0.3) is None
    assert again.get("arm64|a76", 768, 3072, 128, (16, 16), 0.2) is None
    assert again.all("x86|cpu") == [Measurement(768, 3072, 128, (16, 16), 0.2, 1.25e-4)]
    assert again.get_peaks("x86|cpu") == (100.0, 20.0)
    assert again.get_reference("x86|cpu") == 2e-3 and again.get_reference("arm64|a76") is None
    assert LatencyCache(path, tvm_version="0.27", kernel_version="k2").get_reference("x86|cpu") is None


@pytest.mark.parametrize("changed", [{"tvm_version": "0.28"}, {"kernel_version": "k2"}])
def test_new_tvm_or_kernel_version_invalidates(tmp_path, changed):
    path = tmp_path / "c.sqlite"
    LatencyCache(path, tvm_version="0.27", kernel_version="k1").put("x86", 64, 64, 16, (1, 1), 0.5, 1e-5)
    versions = {"tvm_version": "0.27", "kernel_version": "k1"} | changed
    newer = LatencyCache(path, **versions)
    assert newer.get("x86", 64, 64, 16, (1, 1), 0.5) is None and newer.all("x86") == []
    assert LatencyCache(path, tvm_version="0.27", kernel_version="k1").get("x86", 64, 64, 16, (1, 1), 0.5) == 1e-5


def test_kernel_version_is_a_source_hash_tagged_with_the_timing_protocol():
    """A figure measured under an older protocol (it meant something else) is not reused."""
    source, protocol = current_kernel_version().split(".")
    assert (source == "no-kernels" or len(source) == 16) and protocol == f"p{MEASUREMENT_PROTOCOL}"


def test_corrupted_file_is_set_aside_and_rebuilt(tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.warns(RuntimeWarning, match="unreadable .* moved it to .*corrupt"):
        cache = LatencyCache(path, tvm_version="0.27", kernel_version="k1")
    cache.put("x86", 64, 64, 16, (1, 1), 0.5, 1e-5)
    assert cache.get("x86", 64, 64, 16, (1, 1), 0.5) == 1e-5
    aside = list(tmp_path.glob("c.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not a database")


def test_unwritable_place_falls_back_to_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.warns(RuntimeWarning, match="kept in memory only"):
        cache = LatencyCache(blocker / "c.sqlite", tvm_version="0.27", kernel_version="k1")
    cache.put("x86", 64, 64, 16, (1, 1), 0.5, 1e-5)
    assert cache.get("x86", 64, 64, 16, (1, 1), 0.5) == 1e-5


def _writer(path: str, worker: int, count: int) -> None:
    cache = LatencyCache(path, tvm_version="0.27", kernel_version="k1")
    for i in range(count):
        cache.put("x86", 64 + i, 64, 16 + worker, (1, 1), 0.5, 1e-5 * (i + 1))


@pytest.mark.slow
def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "c.sqlite")
    LatencyCache(path, tvm_version="0.27", kernel_version="k1").close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(path, w, 200)) for w in range(2)]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    rows = LatencyCache(path, tvm_version="0.27", kernel_version="k1").all("x86")
    assert len(rows) == 400
    assert {(r.out, r.m) for r in rows} == {(64 + i, 16 + w) for i in range(200) for w in range(2)}
