"""Every test gets its own latency cache: none reads or writes the user's ~/.cache/pruneaug."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def private_latency_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PRUNEAUG_CACHE", str(tmp_path_factory.mktemp("cache") / "latency.sqlite"))
