"""Work in a forked child: its exception comes back to the parent; without fork, the work runs when waited for."""
from __future__ import annotations

import os

import pytest

from pruneaug import forked
from pruneaug.errors import ModelError


def test_the_child_does_the_work_in_another_process_and_its_error_comes_back(tmp_path):
    marker = tmp_path / "pid"
    wait = forked.start_forked(lambda: marker.write_text(str(os.getpid())))
    wait()
    assert int(marker.read_text()) != os.getpid()

    def fail():
        raise ModelError("pruned.onnx: broken on purpose")

    with pytest.raises(ModelError, match="pruned.onnx: broken on purpose"):
        forked.start_forked(fail)()


def test_an_exception_that_does_not_pickle_still_says_what_it_was():
    class Local(Exception):  # defined in a function: pickle cannot find it again
        pass

    def fail():
        raise Local("odd")

    with pytest.raises(RuntimeError, match="Local: odd"):
        forked.start_forked(fail)()


def test_a_child_that_dies_is_an_error():
    with pytest.raises(RuntimeError, match="wait status"):
        forked.start_forked(lambda: os._exit(3))()


def test_without_fork_the_work_runs_when_waited_for(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "fork")
    marker = tmp_path / "ran"
    wait = forked.start_forked(marker.touch)
    assert not marker.exists()
    wait()
    assert marker.exists()
