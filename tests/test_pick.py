"""The measured pick among near-equal validated plans and each plan's parallel and serial builds
(pruneaug.pick), with stand-ins for building and timing."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from pruneaug import pick
from pruneaug.codegen.export import POOL_LAUNCH
from pruneaug.cost_model.targets import resolve_target
from pruneaug.errors import CodegenError
from pruneaug.timing import Timing, TimingError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TWO_CORES = dataclasses.replace(resolve_target("x86"), cores=2)
ONE_CORE = dataclasses.replace(TWO_CORES, cores=1)


def reports(**predicted_us) -> dict:
    """Stand-in search results: name -> report with `met` and `predicted_latency_s`; a negative figure did not meet."""
    return {name: SimpleNamespace(met=us > 0, predicted_latency_s=abs(us) * 1e-6) for name, us in predicted_us.items()}


class Builds:
    """`build(ir, profile, stem)` that writes `IR@CORES` into the artifact (or raises for the `IR@CORES` in
    `failing`) and records the builds made."""

    def __init__(self, failing=()):
        self.built: list[str] = []
        self.failing = set(failing)

    def __call__(self, ir, profile, stem: Path) -> Path:
        build = f"{ir}@{profile.cores}"
        if build in self.failing:
            raise CodegenError(f"TVM failed to compile {build}")
        self.built.append(build)
        path = stem.with_suffix(".so")
        pool = profile.cores > 1 and not ir.endswith("-serial-only")  # a kernel on the thread pool
        path.write_bytes(build.encode() + (b"\n" + POOL_LAUNCH if pool else b""))
        return path


def made(artifact: Path) -> str:
    """Which build a stand-in artifact is: `IR@CORES`."""
    return artifact.read_text().splitlines()[0]


def timed(runs_us: dict, calls: list | None = None):
    """`time_artifacts` that reads each artifact's build back and answers its run times in µs (one figure:
    every run; a list: one per timing, each a figure or a list of runs); records the names it timed."""
    calls = [] if calls is None else calls

    def time_artifacts(artifacts: dict[str, Path]) -> dict[str, Timing]:
        calls.append(list(artifacts))
        timing = len(calls) - 1
        answers = {}
        for name, path in artifacts.items():
            runs = runs_us[made(path)]
            runs = runs[timing] if isinstance(runs, tuple) else runs
            answers[name] = Timing(name, [us * 1e-6 for us in (runs if isinstance(runs, list) else [runs] * 10)])
        return answers
    return time_artifacts


def run_pick(tmp_path, timings: dict, results=None, profile=TWO_CORES, builds=None, make_ir=None, calls=None):
    builds = builds or Builds()
    make_ir = make_ir or (lambda report: "ir-unstructured")
    got = pick.measured_pick("searched", "ir-searched", results, make_ir, builds, profile, timed(timings, calls),
                             tmp_path)
    return got, builds


def test_contenders_are_the_distinct_validated_plans_predicted_close():
    results = reports(searched=10, unstructured=14, dense=60, failed=-11, **{"single 4x1": 16})
    results["best single"] = results["single 4x1"]  # one search, two names
    assert pick.contenders(results, "searched", 1.5) == ["searched", "unstructured"]
    assert pick.contenders(results, "searched", 1.7) == ["searched", "unstructured", "single 4x1"]
    closest_first = ["searched", "faster", "slower"]
    assert pick.contenders(reports(searched=10, slower=15, faster=12), "searched", 2) == closest_first


@pytest.mark.parametrize("build_s, cores, kept", [
    (1.0, 2, 4),   # every plan's two builds fit
    (9.0, 2, 3),   # 6 builds fit: the chosen plan's two, then two plans' two
    (25.0, 2, 1),  # 2 builds fit: the chosen plan's own
    (70.0, 2, 1),  # the chosen plan's first build is made whatever it costs
    (20.0, 1, 3),  # one build a plan on one core
])
def test_contenders_are_built_as_far_as_their_builds_fit_in_the_budget(build_s, cores, kept):
    names = ["searched", "a", "b", "c"]
    assert pick.buildable(names, build_s, cores) == (names[:kept], names[kept:])


def test_the_pick_builds_the_plans_predicted_fastest_that_fit_and_names_the_rest(tmp_path, monkeypatch):
    clock = iter([0.0, 9.0])  # the chosen plan's first build takes 9 s: 6 builds fit in 60 s
    monkeypatch.setattr(pick, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(pick, "PICK_TOTAL_BUILD_S", 60.0)
    results = reports(searched=10, unstructured=14, **{"single 4x1": 12, "single 8x8": 13})
    got, builds = run_pick(tmp_path, {"ir-searched@2": 40, "ir-searched@1": 42, "ir-4x1@2": 45, "ir-4x1@1": 30,
                                      "ir-8x8@2": 50, "ir-8x8@1": 50}, results,
                           make_ir=lambda report: {12e-6: "ir-4x1", 13e-6: "ir-8x8"}[report.predicted_latency_s])
    assert builds.built == ["ir-searched@2", "ir-searched@1", "ir-4x1@2", "ir-4x1@1", "ir-8x8@2", "ir-8x8@1"]
    assert list(got.plans["contenders"]) == ["searched", "single 4x1", "single 8x8"]
    assert got.plans["not_built"] == {"unstructured": pytest.approx(14e-6)}
    from pruneaug.report import _pick_section

    _, text, _, rows = _pick_section(got.plans)
    assert "not built (their builds would not have fit in 60 s): `unstructured` (14.0 µs predicted)" in text
    assert len(rows) == 6


def test_no_contender_built_where_none_fits_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(pick, "PICK_TOTAL_BUILD_S", 0.0)
    got, builds = run_pick(tmp_path, {"ir-searched@2": 40, "ir-searched@1": 42}, reports(searched=10, unstructured=13))
    assert builds.built[0] == "ir-searched@2" and "ir-unstructured@2" not in builds.built
    assert got.name == "searched"
    assert "no other plan's builds fit in 0 s (left out: unstructured)" in got.plans["skipped"]


def test_every_plan_is_built_twice_and_the_fastest_build_is_kept(tmp_path):
    calls = []
    got, builds = run_pick(tmp_path, {"ir-searched@2": 40, "ir-searched@1": 42, "ir-unstructured@2": 45,
                                      "ir-unstructured@1": 30}, reports(searched=10, unstructured=13, dense=60),
                           calls=calls)
    assert builds.built == ["ir-searched@2", "ir-searched@1", "ir-unstructured@2", "ir-unstructured@1"]
    assert calls == [["searched [parallel]", "searched [serial]", "unstructured [parallel]",
                      "unstructured [serial]"]] * pick.PICK_TIMINGS  # all of them, in one timing each time
    assert (got.name, got.ir) == ("unstructured", "ir-unstructured")
    assert made(got.artifact) == "ir-unstructured@1"  # its own artifact, built once, to ship
    plans = got.plans
    assert (plans["picked"], plans["build"], plans["predicted_choice"]) == ("unstructured", "serial", "searched")
    assert plans["contenders"]["searched"]["parallel"]["median_s"] == pytest.approx(40e-6)
    assert plans["contenders"]["unstructured"]["serial"]["p10_s"] == pytest.approx(30e-6)
    assert plans["contenders"]["unstructured"]["predicted_latency_s"] == pytest.approx(13e-6)
    assert [plans["contenders"][name]["counted"] for name in ("searched", "unstructured")] == ["serial", "serial"]
    threading = got.threading  # the kept plan's two builds, from the same timings
    assert threading["kept"] == "serial" and threading["threads"] == 2
    assert threading["median_s"] == pytest.approx({"parallel": 45e-6, "serial": 30e-6})
    assert threading["timings_median_s"] == [pytest.approx({"parallel": 45e-6, "serial": 30e-6})] * pick.PICK_TIMINGS


@pytest.mark.parametrize("parallel_us, kept", [
    (20, "parallel"),
    (40 / 1.22, "parallel"),
    (40 / 1.16, "serial"),  # a small gain at batch 1 did not last: the serial build
    (60, "serial"),
    # a spell in one timing: the median of all runs decides, not one timing's
    ((20, 60), "serial"),
    # twice as fast in most runs, but its slow mode (the second core taken) makes it slower on average: serial
    ([20] * 6 + [80] * 4, "serial"),
    ([20] * 8 + [80] * 2, "parallel"),  # (two slow runs in ten: still faster on average)
    ([20] * 99 + [40000], "parallel"),  # (one run in a hundred preempted: trimmed off)
    # more than half its runs in a spell, where it is barely faster: its median says 1.05x, its mean 1.3x faster
    ([20] * 4 + [38] * 6, "parallel"),
    # the serial twin crashed: the parallel build
    (40, "parallel"),
])
def test_the_parallel_build_ships_only_where_it_is_20_percent_faster_and_faster_on_average(tmp_path, parallel_us,
                                                                                           kept):
    serial = [] if parallel_us == 40 else 40  # (no runs: crashed)
    got, _ = run_pick(tmp_path, {"ir-searched@2": parallel_us, "ir-searched@1": serial})
    assert got.name == "searched" and got.plans is None  # a given plan: no plans to pick among
    assert got.threading["kept"] == kept and got.threading["min_gain"] == pick.PARALLEL_MIN_GAIN
    assert made(got.artifact) == ("ir-searched@1" if kept == "serial" else "ir-searched@2")


def test_plans_are_compared_by_the_builds_they_would_ship(tmp_path):
    """The other plan's parallel build is the fastest of all, but only 1.1x its serial twin: the plan counts
    as its serial build, which still beats the predicted choice by 1.2x."""
    got, _ = run_pick(tmp_path, {"ir-searched@2": 40, "ir-searched@1": 40, "ir-unstructured@2": 30,
                                 "ir-unstructured@1": 33}, reports(searched=10, unstructured=13))
    assert (got.name, got.plans["build"], got.threading["kept"]) == ("unstructured", "serial", "serial")
    assert made(got.artifact) == "ir-unstructured@1"


def test_a_plan_within_the_noise_keeps_the_predicted_choice(tmp_path):
    got, _ = run_pick(tmp_path, {"ir-searched@2": 41, "ir-searched@1": 40, "ir-unstructured@2": 45,
                                 "ir-unstructured@1": 39}, reports(searched=10, unstructured=13))
    assert (got.name, got.plans["picked"], got.plans["build"]) == ("searched", "searched", "serial")


def test_a_plan_with_no_kernel_on_the_pool_gets_no_serial_twin(tmp_path):
    """At batch 1 the CNN's plans often keep every kernel off the pool: their parallel build is a serial one,
    and only it is built and timed, as the plan's serial build."""
    calls = []
    got, builds = run_pick(tmp_path, {"ir-searched@2": 40, "ir-searched@1": 42, "ir-unstructured-serial-only@2": 30},
                           reports(searched=10, unstructured=13), calls=calls,
                           make_ir=lambda report: "ir-unstructured-serial-only")
    assert builds.built == ["ir-searched@2", "ir-searched@1", "ir-unstructured-serial-only@2"]
    assert calls[0] == ["searched [parallel]", "searched [serial]", "unstructured [serial]"]
    assert (got.name, got.plans["build"]) == ("unstructured", "serial")
    assert made(got.artifact) == "ir-unstructured-serial-only@2"
    contenders = got.plans["contenders"]
    assert contenders["unstructured"]["uses_thread_pool"] is False and contenders["unstructured"]["parallel"] is None
    assert contenders["searched"]["uses_thread_pool"] is True
    assert got.threading["kept"] == "serial" and set(got.threading["median_s"]) == {"serial"}
    assert "no kernel of this plan pays for the thread pool" in got.threading["method"]


def test_a_given_plan_with_no_kernel_on_the_pool_is_not_timed(tmp_path):
    calls, builds = [], Builds()
    got = pick.measured_pick("given", "ir-serial-only", None, None, builds, TWO_CORES, timed({}, calls), tmp_path)
    assert calls == [] and builds.built == ["ir-serial-only@2"] and made(got.artifact) == "ir-serial-only@2"
    assert got.plans is None
    assert got.threading["kept"] == "serial" and "no kernel of this plan pays" in got.threading["skipped"]


def test_one_core_and_no_contender_builds_and_times_nothing_more(tmp_path):
    calls = []
    got, builds = run_pick(tmp_path, {}, reports(searched=10, dense=60), profile=ONE_CORE, calls=calls)
    assert got.name == "searched" and made(got.artifact) == "ir-searched@1"
    assert builds.built == ["ir-searched@1"] and calls == []
    assert "no other validated plan" in got.plans["skipped"] and "one core" in got.threading["skipped"]


def test_one_core_times_the_plans_builds_without_a_serial_twin(tmp_path):
    got, builds = run_pick(tmp_path, {"ir-searched@1": 40, "ir-unstructured@1": 30},
                           reports(searched=10, unstructured=13), profile=ONE_CORE)
    assert builds.built == ["ir-searched@1", "ir-unstructured@1"]
    assert got.name == "unstructured" and got.plans["contenders"]["unstructured"]["serial"] is None
    assert "one core" in got.threading["skipped"]


def test_a_slow_build_keeps_the_predicted_choice_unmeasured(tmp_path, monkeypatch):
    """A model whose artifact takes long to build (BERT-base: 18-25 s) builds only its own, parallel."""
    monkeypatch.setattr(pick, "PICK_BUILD_BUDGET_S", -1.0)
    got, builds = run_pick(tmp_path, {}, reports(searched=10, unstructured=11))
    assert got.name == "searched" and made(got.artifact) == "ir-searched@2"
    assert builds.built == ["ir-searched@2"]
    assert "to build" in got.plans["skipped"] and "to build" in got.threading["skipped"]


def test_a_build_that_fails_drops_out(tmp_path):
    results = reports(searched=10, unstructured=12, **{"single 8x8": 13})
    names = {id(results["unstructured"]): "ir-unstructured", id(results["single 8x8"]): "ir-8x8"}
    got, _ = run_pick(tmp_path, {"ir-searched@2": 40, "ir-searched@1": 40, "ir-unstructured@1": 35, "ir-8x8@2": 20},
                      results, builds=Builds(failing={"ir-unstructured@2", "ir-8x8@1"}),
                      make_ir=lambda report: names[id(report)])
    assert (got.name, got.plans["build"]) == ("single 8x8", "parallel")
    assert set(got.plans["errors"]) == {"unstructured [parallel]", "single 8x8 [serial]"}
    assert "TVM failed" in got.plans["errors"]["unstructured [parallel]"]
    assert got.plans["contenders"]["unstructured"]["parallel"] is None
    assert got.plans["contenders"]["single 8x8"]["counted"] == "parallel"  # its serial build failed
    assert "serial build of single 8x8 failed" in got.threading["skipped"]


def test_the_chosen_plans_own_build_failing_is_the_callers(tmp_path):
    with pytest.raises(CodegenError, match="ir-searched@2"):
        run_pick(tmp_path, {}, reports(searched=10, unstructured=12), builds=Builds(failing={"ir-searched@2"}))


def test_builds_that_all_fail_in_the_timing_keep_the_predicted_choices_first_build(tmp_path):
    """The timing process answered, but no build ran (each its own error): the first build ships, and why."""
    def none_ran(artifacts):
        return {name: Timing(name, [], "RuntimeError: out of memory") for name in artifacts}

    got = pick.measured_pick("searched", "ir-searched", reports(searched=10, unstructured=12),
                             lambda report: "ir-unstructured", Builds(), TWO_CORES, none_ran, tmp_path)
    assert got.name == "searched" and made(got.artifact) == "ir-searched@2"
    for record in (got.plans, got.threading):
        assert "no build ran in the timing" in record["skipped"] and "out of memory" in record["skipped"]


def test_a_timing_that_fails_keeps_the_predicted_choices_parallel_build(tmp_path):
    def failing(artifacts):
        raise TimingError("timing searched, unstructured side by side failed (exit status -9): ")

    got = pick.measured_pick("searched", "ir-searched", reports(searched=10, unstructured=12),
                             lambda report: "ir-unstructured", Builds(), TWO_CORES, failing, tmp_path)
    assert got.name == "searched" and made(got.artifact) == "ir-searched@2"
    for record in (got.plans, got.threading):
        assert "timing the builds failed" in record["skipped"] and "exit status -9" in record["skipped"]


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
    for name, profile in {"parallel": TWO_CORES, "serial": pick.serial_profile(TWO_CORES)}.items():
        build_model(model, sparse, profile, {"input": [32, 1, 8, 8]})
        scripts[name] = lowered["mod"].script()
    assert "T.parallel" in scripts["parallel"]
    assert "T.parallel" not in scripts["serial"] and "bsr_conv2d" in scripts["serial"]


@pytest.mark.slow
def test_an_artifact_says_whether_a_kernel_uses_the_thread_pool(tmp_path):
    """`export.uses_thread_pool` on real builds of the CNN at batch 32: the build for two cores has kernels
    on the pool, the build for one has none (the pick then builds no serial twin)."""
    from pruneaug import deploy
    from pruneaug.codegen.export import uses_thread_pool

    model = onnx.load(EXAMPLES / "cnn" / "model.onnx")
    sparse = {"conv1.weight": (4, 1), "conv2.weight": (16, 16), "fc1.weight": (8, 8)}
    build = deploy.plan_builder(model, sparse, {"input": [32, 1, 8, 8]}, {"input": np.zeros((32, 1, 8, 8), np.float32)})
    assert uses_thread_pool(build(TWO_CORES, tmp_path / "parallel"))
    assert not uses_thread_pool(build(pick.serial_profile(TWO_CORES), tmp_path / "serial"))
