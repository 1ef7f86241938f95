"""pruneaug: per-layer block-sparsity search and block-sparse TVM codegen for ONNX models.

    >>> import pruneaug
    >>> result = pruneaug.compile("model.onnx", target="x86", block="8x8", sparsity=0.8, out="out")

`compile` and `load` are imported on first use, so `python -m pruneaug.compile` and a
runtime-only deployment (which needs `load` alone) import nothing they do not use. Importing
pruneaug sizes TVM's thread pool to the physical cores and leaves its threads unpinned, unless
TVM_NUM_THREADS / TVM_BIND_THREADS are set (`pool`).
"""
from __future__ import annotations

import importlib

from pruneaug.pool import size_pool_by_default

size_pool_by_default()

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "compile":
        return importlib.import_module("pruneaug.compile")  # a callable module: pruneaug.compile(...) compiles
    if name == "load":
        return importlib.import_module("pruneaug.runtime").load
    raise AttributeError(f"module 'pruneaug' has no attribute {name!r}")
