"""The measured pick: of the validated plans whose predicted latencies are close, keep the one whose
compiled artifact runs fastest here.

Why: the search ranks plans by the cost model, and near-equal predictions can be in the wrong order:
the cost model times each layer's kernels alone, not the rest of the model nor the kernels beside
them. (When a Conv layer was still predicted as its im2col matmul, the plan predicted 1.29x faster
than unstructured on the bundled CNN at batch 1 ran 0.64x as fast as it; Convs are now timed as the
artifact runs them, `codegen/conv_lowering.py`.) Every contender met the budget in its own
end-to-end validation, so choosing among them by measurement costs builds and a few hundred runs,
not accuracy.

That cost is paid only where it is small: the chosen plan's artifact is built first, and the others
only if that build took at most PICK_BUILD_BUDGET_S. A BERT-base artifact takes 18-25 s to build; it
keeps the predicted choice, and plan.json says why. Where the artifact's code cannot run here, or
nothing is timed here (`deploy.times_here`), the compile does not call this.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pruneaug.errors import CodegenError
from pruneaug.ir.graph import IRModel
from pruneaug.timing import TimingError

PICK_MARGIN = 2.0  # plans predicted at most this many times the chosen one's latency are contenders (the CNN: 1.51x predicted, 0.81x measured)
PICK_BUILD_BUDGET_S = 10.0  # build the contenders only if the chosen plan's artifact built within this
PICK_MIN_GAIN = 1.05  # a contender replaces the predicted choice only if its p10 is this much faster
PICK_ROUNDS = 10  # side-by-side rounds; each runs every contender PICK_RUNS times
PICK_RUNS = 10
# a pause after each round, so that one timing spans half a second: on this 2-vCPU VM a parallel build
# ran 1.3x slower than its serial twin for seconds at a time and alike for other seconds, and 10 rounds
# back to back (10 ms for the encoder) saw one of those spells only
PICK_ROUND_PAUSE_S = 0.05


@dataclass
class Pick:
    """The plan kept, its pruned IR, its built (and gated) artifact where one was built, and plan.json's record."""

    name: str
    ir: IRModel
    artifact: Path | None
    record: dict[str, Any]
    build_s: float | None = None  # how long the chosen plan's artifact took to build (where one was built)


def side_by_side(inputs: Mapping[str, np.ndarray]) -> Callable[[dict[str, Path]], dict[str, Any]]:
    """How the picks time their contenders: `timing.time_side_by_side`, PICK_ROUNDS rounds of PICK_RUNS runs,
    PICK_ROUND_PAUSE_S apart."""
    from pruneaug.timing import time_side_by_side

    return lambda artifacts: time_side_by_side(artifacts, inputs, PICK_ROUNDS, PICK_RUNS, PICK_ROUND_PAUSE_S)


def contenders(results: Mapping[str, Any], chosen_name: str, margin: float) -> list[str]:
    """The chosen plan, then every other distinct plan that met the budget and is predicted within
    `margin` of it (`results` are `search.search_with_baselines`'s reports, which name some plans twice)."""
    chosen = results[chosen_name]
    names, seen = [chosen_name], {id(chosen)}
    for name, report in results.items():
        if id(report) in seen or not report.met:
            continue
        seen.add(id(report))
        if report.predicted_latency_s <= margin * chosen.predicted_latency_s:
            names.append(name)
    return names


def _faster_plan(timings: Mapping[str, Any], chosen_name: str) -> str:
    """The contender fastest by the fastest tenth of its runs (two builds of one plan, side by side on this
    shared machine, read 1.30x apart by their medians and 1.01x by their p10s) where it beats the chosen
    plan by PICK_MIN_GAIN (or the chosen plan has no time), else the chosen plan."""
    quick = {name: timing.p10_s for name, timing in timings.items() if timing.p10_s}
    fastest = min(quick, key=quick.get)
    gain = quick[chosen_name] / quick[fastest] if chosen_name in quick else np.inf
    return fastest if gain >= PICK_MIN_GAIN else chosen_name


def measured_pick(chosen_name: str, chosen_ir: IRModel, results: Mapping[str, Any],
                  make_ir: Callable[[Any], IRModel], build: Callable[[IRModel, Path], Path],
                  time_artifacts: Callable[[dict[str, Path]], dict[str, Any]], folder: Path) -> Pick:
    """Build the contenders' artifacts into `folder` with `build(ir, stem)`, time them side by side with
    `time_artifacts({name: artifact})` (`Timing`s), and keep the fastest (see the module docstring)."""
    names = contenders(results, chosen_name, PICK_MARGIN)
    if len(names) == 1:
        return Pick(chosen_name, chosen_ir, None, {
            "skipped": f"no other validated plan predicted within {PICK_MARGIN:g}x of the chosen one"})
    started = time.perf_counter()
    artifacts = {chosen_name: build(chosen_ir, folder / "contender0")}
    build_s = time.perf_counter() - started
    if build_s > PICK_BUILD_BUDGET_S:
        return Pick(chosen_name, chosen_ir, artifacts[chosen_name], {
            "skipped": f"the chosen plan's artifact took {build_s:.0f} s to build (contenders are built "
                       f"only within {PICK_BUILD_BUDGET_S:g} s)"}, build_s)
    irs, errors = {chosen_name: chosen_ir}, {}
    for index, name in enumerate(names[1:], start=1):
        try:
            irs[name] = make_ir(results[name])
            artifacts[name] = build(irs[name], folder / f"contender{index}")
        except CodegenError as err:  # that contender drops out; the others are still compared
            errors[name] = str(err)
    try:
        timings = time_artifacts(artifacts)
        picked = _faster_plan(timings, chosen_name)
        confirmation = None
        if picked != chosen_name:
            # a switch only where a second timing of the two agrees: on a loaded host one timing switched the
            # encoder to a plan that side by side afterwards ran 0.88x as fast as the one it replaced
            again = time_artifacts({name: artifacts[name] for name in (chosen_name, picked)})
            confirmation = {name: timing.p10_s for name, timing in again.items()}
            picked = _faster_plan(again, chosen_name)
    except TimingError as err:  # the predicted choice stands, unmeasured
        return Pick(chosen_name, chosen_ir, artifacts[chosen_name],
                    {"skipped": f"timing the contenders failed: {err}"}, build_s)
    record = {
        "picked": picked,
        "predicted_choice": chosen_name,
        "min_gain": PICK_MIN_GAIN,
        "contenders": {name: {"predicted_latency_s": results[name].predicted_latency_s,
                              "median_s": timings[name].median_s, "p10_s": timings[name].p10_s,
                              "p90_s": timings[name].p90_s} for name in artifacts},
        "errors": errors,
        "method": f"each contender's compiled function, side by side in one fresh process, {PICK_ROUNDS} rounds of "
                  f"{PICK_RUNS} runs; a switch is timed again, the two alone, and made only if that agrees",
    }
    if confirmation is not None:
        record["confirmation_p10_s"] = confirmation
    return Pick(picked, irs[picked], artifacts[picked], record, build_s)
