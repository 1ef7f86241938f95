"""Per-layer numpy work spread over the cores.

The search's per-layer steps (partitioning a layer's scores for its proxy losses, masking its weight
for a validation) are large numpy calls that release the GIL, so threads run them side by side:
on 2 cores, 2.0-2.4x on BERT-base-sized layers (2.4M scores each). Only numpy work belongs here:
the cost model's sqlite cache and onnxruntime sessions stay on the calling thread.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def map_threads(work: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
    """`[work(item) for item in items]`, on one thread per core this process may use (in order)."""
    items = list(items)
    workers = min(len(items), len(os.sched_getaffinity(0)))
    if workers <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(work, items))
