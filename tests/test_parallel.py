"""map_threads: the per-layer numpy work of the search on every core, results in order."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from pruneaug.passes import parallel
from pruneaug.passes.parallel import map_threads


def test_results_come_back_in_order_from_several_threads(monkeypatch):
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda _pid: {0, 1})
    threads, barrier = set(), threading.Barrier(2, timeout=10)

    def work(item: int) -> float:
        threads.add(threading.get_ident())
        if item < 2:
            barrier.wait()  # the first two items only return once both run at the same time
        return float(np.sum(np.arange(item + 1)))

    assert map_threads(work, range(6)) == [float(sum(range(i + 1))) for i in range(6)]
    assert len(threads) == 2


def test_one_core_runs_on_the_calling_thread(monkeypatch):
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda _pid: {0})
    assert map_threads(lambda _item: threading.get_ident(), range(3)) == [threading.get_ident()] * 3


def test_an_error_in_the_work_reaches_the_caller(monkeypatch):
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda _pid: {0, 1})

    def work(item: int) -> int:
        if item == 3:
            raise ValueError("layer 3 failed")
        return item

    with pytest.raises(ValueError, match="layer 3 failed"):
        map_threads(work, range(5))
