"""The measured pick among near-equal validated plans (pruneaug.pick), with stand-ins for building and timing."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from pruneaug import pick
from pruneaug.errors import CodegenError
from pruneaug.timing import Timing, TimingError


def reports(**predicted_us) -> dict:
    """Stand-in search results: name -> report with `met` and `predicted_latency_s`; a negative figure did not meet."""
    return {name: SimpleNamespace(met=us > 0, predicted_latency_s=abs(us) * 1e-6) for name, us in predicted_us.items()}


class Builds:
    """`build(ir, stem)` that writes a file per contender (or raises for the IRs in `failing`) and counts calls."""

    def __init__(self, failing=()):
        self.built: list[str] = []
        self.failing = set(failing)

    def __call__(self, ir, stem: Path) -> Path:
        if ir in self.failing:
            raise CodegenError(f"TVM failed to compile {ir}")
        self.built.append(ir)
        path = stem.with_suffix(".so")
        path.write_text(ir)
        return path


def timed(runs_us: dict):
    """`time_artifacts` that reads each artifact's IR back and answers its given run times (one figure: every run)."""
    def time_artifacts(artifacts: dict[str, Path]) -> dict[str, Timing]:
        runs = {name: runs_us[path.read_text()] for name, path in artifacts.items()}
        return {name: Timing(name, [us * 1e-6 for us in (r if isinstance(r, list) else [r] * 10)])
                for name, r in runs.items()}
    return time_artifacts


def test_contenders_are_the_distinct_validated_plans_predicted_close():
    results = reports(searched=10, unstructured=14, dense=60, failed=-11, **{"single 4x1": 16})
    results["best single"] = results["single 4x1"]  # one search, two names
    assert pick.contenders(results, "searched", 1.5) == ["searched", "unstructured"]
    assert pick.contenders(results, "searched", 1.7) == ["searched", "unstructured", "single 4x1"]


def test_a_plan_measured_faster_replaces_the_predicted_choice(tmp_path):
    results = reports(searched=10, unstructured=13, dense=60)
    builds = Builds()
    got = pick.measured_pick("searched", "ir-searched", results, lambda report: f"ir-{'unstructured'}", builds,
                             timed({"ir-searched": 40, "ir-unstructured": 30}), tmp_path)
    assert (got.name, got.ir) == ("unstructured", "ir-unstructured")
    assert got.artifact.read_text() == "ir-unstructured"  # its own artifact, built once, to ship
    assert builds.built == ["ir-searched", "ir-unstructured"]
    record = got.record
    assert record["picked"] == "unstructured" and record["predicted_choice"] == "searched"
    assert record["contenders"]["searched"]["median_s"] == pytest.approx(40e-6)
    assert record["contenders"]["unstructured"]["predicted_latency_s"] == pytest.approx(13e-6)


def test_a_switch_is_made_only_where_a_second_timing_of_the_two_agrees(tmp_path):
    results = reports(searched=10, unstructured=13)
    calls = []

    def first_faster_then_not(artifacts):
        calls.append(sorted(artifacts))
        return timed({"ir-searched": 40, "ir-unstructured": 30 if len(calls) == 1 else 39})(artifacts)

    got = pick.measured_pick("searched", "ir-searched", results, lambda report: "ir-unstructured", Builds(),
                             first_faster_then_not, tmp_path)
    assert calls == [["searched", "unstructured"], ["searched", "unstructured"]]  # the two again, alone
    assert got.name == "searched" and got.artifact.read_text() == "ir-searched"
    assert got.record["confirmation_p10_s"] == pytest.approx({"searched": 40e-6, "unstructured": 39e-6})

    (tmp_path / "again").mkdir()
    confirmed = pick.measured_pick("searched", "ir-searched", results, lambda report: "ir-unstructured", Builds(),
                                   timed({"ir-searched": 40, "ir-unstructured": 30}), tmp_path / "again")
    assert confirmed.name == "unstructured" and confirmed.record["confirmation_p10_s"]["unstructured"] == \
        pytest.approx(30e-6)


def test_a_gain_within_the_noise_keeps_the_predicted_choice(tmp_path):
    results = reports(searched=10, unstructured=13)
    got = pick.measured_pick("searched", "ir-searched", results, lambda report: "ir-unstructured", Builds(),
                             timed({"ir-searched": 40, "ir-unstructured": 39}), tmp_path)
    assert got.name == "searched" and got.artifact.read_text() == "ir-searched"
    assert got.record["picked"] == "searched"


def test_nothing_is_built_without_a_contender(tmp_path):
    builds = Builds()
    got = pick.measured_pick("searched", "ir-searched", reports(searched=10, dense=60), None, builds, None, tmp_path)
    assert got.name == "searched" and got.artifact is None and builds.built == []
    assert "no other validated plan" in got.record["skipped"]


def test_a_slow_build_keeps_the_predicted_choice_unmeasured(tmp_path, monkeypatch):
    """A model whose artifact takes long to build (BERT-base: 18-25 s) builds only its own."""
    monkeypatch.setattr(pick, "PICK_BUILD_BUDGET_S", -1.0)
    builds = Builds()
    got = pick.measured_pick("searched", "ir-searched", reports(searched=10, unstructured=11), None, builds, None,
                             tmp_path)
    assert got.name == "searched" and got.artifact.read_text() == "ir-searched"
    assert builds.built == ["ir-searched"] and "to build" in got.record["skipped"]


def test_a_contender_that_fails_to_build_drops_out(tmp_path):
    results = reports(searched=10, unstructured=12, **{"single 8x8": 13})
    names = {id(results["unstructured"]): "ir-unstructured", id(results["single 8x8"]): "ir-8x8"}
    got = pick.measured_pick("searched", "ir-searched", results, lambda report: names[id(report)],
                             Builds(failing={"ir-unstructured"}), timed({"ir-searched": 40, "ir-8x8": 20}), tmp_path)
    assert got.name == "single 8x8"
    assert "TVM failed" in got.record["errors"]["unstructured"]
    assert set(got.record["contenders"]) == {"searched", "single 8x8"}


def test_plans_are_ranked_by_their_fastest_runs(tmp_path):
    """A contender whose median reads faster only because load hit the other's runs does not replace it."""
    chosen_runs = [30] * 3 + [50] * 7  # fast when the machine was quiet
    other_runs = [40] * 10
    got = pick.measured_pick("searched", "ir-searched", reports(searched=10, unstructured=12),
                             lambda report: "ir-unstructured", Builds(),
                             timed({"ir-searched": chosen_runs, "ir-unstructured": other_runs}), tmp_path)
    assert got.name == "searched"
    contenders = got.record["contenders"]
    assert contenders["searched"]["median_s"] > contenders["unstructured"]["median_s"]


def test_a_timing_that_fails_keeps_the_predicted_choice_and_its_artifact(tmp_path):
    def failing(artifacts):
        raise TimingError("timing searched, unstructured side by side failed (exit status -9): ")

    got = pick.measured_pick("searched", "ir-searched", reports(searched=10, unstructured=12),
                             lambda report: "ir-unstructured", Builds(), failing, tmp_path)
    assert got.name == "searched" and got.artifact.read_text() == "ir-searched"
    assert "timing the contenders failed" in got.record["skipped"] and "exit status -9" in got.record["skipped"]
