"""The threading pick: the parallel build stays only where its runs in two side-by-side timings beat its serial twin's."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
import pytest

from pruneaug import threading_pick
from pruneaug.cost_model.targets import resolve_target
from pruneaug.errors import CodegenError
from pruneaug.pick import PICK_BUILD_BUDGET_S
from pruneaug.timing import Timing, TimingError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TWO_CORES = dataclasses.replace(resolve_target("x86"), cores=2)


def fake_build(built: list):
    """A build that writes an artifact and its sidecar naming the profile's cores, and records the call."""

    def build(profile, stem: Path) -> Path:
        built.append(profile.cores)
        library = stem.with_name(stem.name + ".so")
        library.write_text(f"cores={profile.cores}")
        library.with_name(library.name + ".json").write_text("{}")
        return library

    return build


def fake_timings(*rounds: dict[str, float | None]):
    """`time_artifacts` answering each call with the next round's seconds per name (all runs alike, so
    median and p10 too; None: that artifact could not be timed)."""
    answers = iter(rounds)

    def time_artifacts(artifacts: dict[str, Path]) -> dict[str, Timing]:
        seconds = next(answers)
        assert set(artifacts) == set(seconds)
        return {name: Timing(name, [s] * 10 if s else [], None if s else "crashed") for name, s in seconds.items()}

    return time_artifacts


def parallel_artifact(folder: Path) -> Path:
    return fake_build([])(TWO_CORES, folder / "model.x86")


def _timing_of(parallel: float | None, serial: float | None) -> dict:
    return {"parallel": parallel, "serial": serial}


@pytest.mark.parametrize("rounds, kept, median", [
    ([_timing_of(1.0, 2.0), _timing_of(1.0, 2.0)], "parallel", _timing_of(1.0, 2.0)),
    ([_timing_of(1.0, 1.04), _timing_of(1.0, 1.04)], "serial", _timing_of(1.0, 1.04)),  # as fast, and one core
    ([_timing_of(2.0, 1.0), _timing_of(2.0, 1.0)], "serial", _timing_of(2.0, 1.0)),
    # a spell in one timing: the median of all runs decides, not one timing's
    ([_timing_of(1.0, 2.0), _timing_of(3.0, 2.0)], "serial", _timing_of(2.0, 2.0)),
    ([_timing_of(1.0, None), _timing_of(1.0, None)], "parallel", _timing_of(1.0, None)),  # the twin crashed
    ([_timing_of(None, 1.0), _timing_of(None, 1.0)], "serial", _timing_of(None, 1.0)),
])
def test_the_parallel_build_stays_only_where_all_its_runs_beat_the_serial_twins(tmp_path, rounds, kept, median):
    built = []
    path, record = threading_pick.pick_threading(parallel_artifact(tmp_path), 1.0, fake_build(built), TWO_CORES,
                                                 fake_timings(*rounds))
    assert built == [1]  # the twin is built for one core
    assert record["kept"] == kept and record["timings_median_s"] == rounds and record["threads"] == 2
    assert record["median_s"] == median
    assert path == tmp_path / "model.x86.so"  # the kept one at the artifact's own path, the other gone
    assert path.read_text() == ("cores=1" if kept == "serial" else "cores=2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.x86.so", "model.x86.so.json"]


@pytest.mark.parametrize("profile, build_s, reason", [
    (dataclasses.replace(TWO_CORES, cores=1), 1.0, "one core"),
    (TWO_CORES, PICK_BUILD_BUDGET_S + 1, "took 11 s to build"),
])
def test_no_twin_is_built_for_one_core_or_after_a_slow_build(tmp_path, profile, build_s, reason):
    built = []
    artifact = parallel_artifact(tmp_path)
    path, record = threading_pick.pick_threading(artifact, build_s, fake_build(built), profile, fake_timings())
    assert path == artifact and built == [] and reason in record["skipped"]


def test_a_serial_build_that_fails_leaves_the_parallel_artifact(tmp_path):
    def failing(profile, stem):
        raise CodegenError("no serial kernel")

    artifact = parallel_artifact(tmp_path)
    path, record = threading_pick.pick_threading(artifact, 1.0, failing, TWO_CORES, fake_timings())
    assert path == artifact and path.read_text() == "cores=2" and "no serial kernel" in record["skipped"]


def test_a_timing_that_fails_leaves_the_parallel_artifact_and_removes_the_twin(tmp_path):
    def failing(artifacts):
        raise TimingError("timing parallel, serial side by side failed (exit status 1): Killed")

    artifact = parallel_artifact(tmp_path)
    path, record = threading_pick.pick_threading(artifact, 1.0, fake_build([]), TWO_CORES, failing)
    assert path == artifact and path.read_text() == "cores=2" and "Killed" in record["skipped"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.x86.so", "model.x86.so.json"]


def test_build_and_pick_times_nothing_where_the_artifact_is_not_timed_here(tmp_path):
    built = []
    path, record = threading_pick.build_and_pick(fake_build(built), TWO_CORES, tmp_path / "model.x86", None)
    assert record is None and built == [2] and path.read_text() == "cores=2"


@pytest.mark.slow
def test_the_serial_profile_leaves_no_parallel_loop_in_the_model(monkeypatch):
    """Every PrimFunc of the compiled CNN at batch 32, ours (BSR kernels, phase split, norms) and TVM's
    (scheduled by the DLight rules), is serial for the serial profile; the parallel one has some."""
    import tvm

    from pruneaug.codegen.relax_build import build_model

    lowered = {}

    def lower_only(mod, target, relax_pipeline, exec_mode):
        with target:
            lowered["mod"] = relax_pipeline(mod)

    monkeypatch.setattr(tvm.relax, "build", lower_only)
    model = onnx.load(EXAMPLES / "cnn" / "model.onnx")
    sparse = {"conv1.weight": (4, 1), "conv2.weight": (16, 16), "fc1.weight": (8, 8)}
    scripts = {}
    for name, profile in {"parallel": TWO_CORES, "serial": threading_pick.serial_profile(TWO_CORES)}.items():
        build_model(model, sparse, profile, {"input": [32, 1, 8, 8]})
        scripts[name] = lowered["mod"].script()
    assert "T.parallel" in scripts["parallel"]
    assert "T.parallel" not in scripts["serial"] and "bsr_conv2d" in scripts["serial"]
