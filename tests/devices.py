"""What accelerators this machine has, for tests that need one (CI has none: they skip, saying why)."""
from __future__ import annotations

import pytest

from pruneaug.runtime import has_cuda_gpu

requires_cuda_gpu = pytest.mark.skipif(not has_cuda_gpu(), reason="no CUDA GPU on this machine")
