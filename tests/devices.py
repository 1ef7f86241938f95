"""What accelerators this machine has, for tests that need one (CI has none: they skip, saying why)."""
from __future__ import annotations

import pytest


def has_cuda_gpu() -> bool:
    import tvm

    try:
        return bool(tvm.runtime.device("cuda", 0).exist)
    except Exception:  # noqa: BLE001 - a TVM built without the CUDA runtime raises instead of answering False
        return False


requires_cuda_gpu = pytest.mark.skipif(not has_cuda_gpu(), reason="no CUDA GPU on this machine")
