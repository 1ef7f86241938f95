"""The measured pick: which artifact ships, of the validated plans predicted close and of each plan's two
builds (parallel kernels where each kernel pays for the thread pool, or every kernel serial), timed here.

Why measure the plans: the search ranks plans by the cost model, and near-equal predictions can be in
the wrong order: the cost model times each layer's kernels alone, not the rest of the model nor the
kernels beside them. (When a Conv layer was still predicted as its im2col matmul, the plan predicted
1.29x faster than unstructured on the bundled CNN at batch 1 ran 0.64x as fast as it; Convs are now
timed as the artifact runs them, `codegen/conv_lowering.py`.) Every contender met the budget in its
own end-to-end validation, so choosing among them by measurement costs builds and a few hundred runs,
not accuracy.

Why measure the builds: each kernel decides alone whether it is worth the thread pool
(`schedule.runs_parallel`, `threads.worth_parallel`), from kernels timed alone, where the pool's
threads stay awake between calls. Inside a model they are not, and on a shared 2-vCPU host the pool's
second thread is not always there: the bundled encoder at batch 1 ran its parallel build 1.3x slower
than its serial twin for seconds at a time and alike for other seconds (never faster), while the CNN
at batch 32 ran its parallel build 1.6x faster (137 against 214 µs).

Why one timing of all of them: when the plans were picked first by their parallel builds and the kept
plan's threading afterwards, the encoder shipped the chosen plan's parallel build, which ran 0.86x as
fast as the best single shape's serial build. So every (plan, build) is timed side by side in one
fresh process, PICK_TIMINGS times, each timing spread over two seconds, and the runs of the timings
are pooled. (Where no kernel of a plan's parallel build uses the pool, `export.uses_thread_pool`, that
build is its serial one and no twin is built: the bundled CNN's plans at batch 1, mostly.) Each plan
then counts as its serial build unless its parallel build's median is PARALLEL_MIN_GAIN faster and
its mean faster too (`parallel_pays`): a serial build does not depend on a second core's spells, leaves
that core to the application, and at batch 1 a parallel build's small gain in the pick did not last.
The plan fastest so replaces the predicted choice only where it is PICK_MIN_GAIN faster. (Two timings that
had to agree went wrong both ways: a spell in one of them kept the CNN at batch 32 serial, 1.3x slower.)

That cost is paid only where it is small: the chosen plan's artifact is built first, and the rest only
if that build took at most PICK_BUILD_BUDGET_S. A BERT-base artifact takes 18-25 s to build; it keeps
the predicted choice's parallel build, and plan.json says why. The other contenders are built, those
predicted fastest first, only as far as their builds, each estimated at the first one's time, fit in
PICK_TOTAL_BUILD_S: MobileNetV3-small (about 9 s a build) had 9 contenders, whose 17 more builds took 197
of its 496 s compile; plan.json names the plans left out. Where the artifact's code cannot run
here, or its thread layouts do not differ (`deploy.picks_here`: CPU targets), the compile does not call this.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import trim_mean
from tqdm import tqdm

from pruneaug.errors import CodegenError
from pruneaug.ir.graph import IRModel
from pruneaug.timing import Timing, TimingError

PICK_MARGIN = 2.0  # plans predicted at most this many times the chosen one's latency are contenders (the CNN: 1.51x predicted, 0.81x measured)
PICK_BUILD_BUDGET_S = 10.0  # build the rest only if the chosen plan's artifact built within this
PICK_TOTAL_BUILD_S = 60.0  # ... and only as many as the first build's time says fit in this, all builds counted
# another plan replaces the predicted choice only if the median of the build it counts as is this much faster
PICK_MIN_GAIN = 1.05
# a plan ships its parallel build only if the median (or the mean) of its runs is this much faster than its serial
# twin's: at batch 1 the bundled encoder's parallel builds read 1.03-1.16x faster in the pick and later, beside serial
# builds of plans as fast, ran 0.70-0.86x as fast (the second vCPU's spells; at 1.16x, over the 1.15 this was, one
# shipped and ran 36 us against 27 us for a serial plan predicted 5% faster); at batch 32 the CNN's read 1.24-1.6x
# faster. The mean too, for a bimodal build: a MobileNetV2-like model with SiLU at 112x112 ran its parallel build 1.8x
# faster in one timing and 1.05x in the other (the second vCPU taken); pooled, the median said 1.07x and it shipped
# serial, 0.73x onnxruntime's speed, where side by side later its parallel build ran 1.8x faster in each of four timings
PARALLEL_MIN_GAIN = 1.2
# ... and only if the (trimmed) mean of its runs is faster too: at batch 8 the encoder's parallel builds ran a median
# 109 us against 134 us serial in the pick, but their p90 was 250 us against 137 us; shipped, one ran 244 us beside
# the other plans in the bench (a pool thread pinned to a slowed vCPU, which `pool` now leaves unpinned)
TRIM_SHARE = 0.02
PARALLEL_RULE = (f"the median or the trimmed mean of all its runs is {PARALLEL_MIN_GAIN:g}x its serial build's and its "
                 "trimmed mean faster")  # `parallel_pays`, as plan.json and the report say it
PICK_TIMINGS = 2  # side-by-side timings of all the builds, their runs pooled
PICK_ROUNDS = 20  # rounds per timing; each runs every build PICK_RUNS times
PICK_RUNS = 10
# a pause after each round, so that one timing spans two seconds and the two four: on this 2-vCPU VM the CNN at
# batch 32 ran its parallel build 1.3-1.7x faster than its serial twin, except in dips to 1.0-1.1x of 1-3 s every
# 10-40 s (one plan's two builds timed every 0.2 s for two minutes); the median of runs spread over four seconds
# sees at most one dip, in a minority of its rounds
PICK_ROUND_PAUSE_S = 0.1
BUILDS = ("parallel", "serial")
ONE_CORE = "the target has one core: every kernel is serial already"

Build = Callable[[IRModel, Any, Path], Path]  # (a plan's IR, target profile, stem) -> its built and gated artifact
TimeArtifacts = Callable[[dict[str, Path]], dict[str, Timing]]  # {name: artifact} -> {name: Timing}


@dataclass
class Pick:
    """The plan kept, its pruned IR and built (and gated) artifact, and plan.json's records: `plans`, the pick
    among plans (None where only one plan was offered), and `threading`, between the kept plan's builds."""

    name: str
    ir: IRModel
    artifact: Path
    plans: dict[str, Any] | None
    threading: dict[str, Any]


def serial_profile(profile):
    """The profile whose kernels all run on the calling thread (every parallel rule asks for cores > 1)."""
    return dataclasses.replace(profile, cores=1)


def side_by_side(inputs: Mapping[str, np.ndarray]) -> TimeArtifacts:
    """How the pick times its builds: `timing.time_side_by_side`, PICK_ROUNDS rounds of PICK_RUNS runs,
    PICK_ROUND_PAUSE_S apart."""
    from pruneaug.timing import time_side_by_side

    return lambda artifacts: time_side_by_side(artifacts, inputs, PICK_ROUNDS, PICK_RUNS, PICK_ROUND_PAUSE_S)


def contenders(results: Mapping[str, Any], chosen_name: str, margin: float) -> list[str]:
    """The chosen plan, then every other distinct plan that met the budget and is predicted within
    `margin` of it, the fastest predicted first (`results` are `search.search_with_baselines`'s reports,
    which name some plans twice)."""
    chosen = results[chosen_name]
    others, seen = [], {id(chosen)}
    for name, report in results.items():
        if id(report) in seen or not report.met:
            continue
        seen.add(id(report))
        if report.predicted_latency_s <= margin * chosen.predicted_latency_s:
            others.append(name)
    return [chosen_name, *sorted(others, key=lambda name: results[name].predicted_latency_s)]


def buildable(names: list[str], build_s: float, cores: int) -> tuple[list[str], list[str]]:
    """(`names` kept, `names` left out): the chosen plan (first) and as many others, in order, as have their
    builds fit in PICK_TOTAL_BUILD_S at `build_s` each, the chosen plan's first build counted (a plan has a
    serial twin beside its parallel build where `cores` > 1, the chosen plan too)."""
    per_plan = 2 if cores > 1 else 1
    room = int(PICK_TOTAL_BUILD_S // max(build_s, 1e-9)) - per_plan  # builds left after the chosen plan's
    fit = max(room // per_plan, 0)
    return names[:1 + fit], names[1 + fit:]


def build_key(plan: str, build: str) -> str:
    """One build's name in the timings and in plan.json: `searched [serial]`."""
    return f"{plan} [{build}]"


def _pooled(timings: list[Mapping[str, Timing]]) -> dict[str, Timing]:
    """Each build's runs of every timing in one Timing (its first error where it has no runs)."""
    return {name: Timing(name, [s for t in timings for s in t[name].seconds],
                         next((t[name].error for t in timings if t[name].error), None))
            for name in timings[0]}


def parallel_pays(parallel: Timing | None, serial: Timing | None) -> bool:
    """Whether a plan ships its parallel build: its runs' median or their mean (`_typical_s`) is
    PARALLEL_MIN_GAIN faster than its serial twin's, and their mean faster in any case; or the twin has no time.

    The mean, because a build that runs fast only while the second core is free has a slow mode, and what a
    user waits on average is the mean: a slow mode the median hides must not make the build slower on
    average, and one the median falls in (more than half the runs in a spell) must not hide a build much
    faster on average. Not a high percentile, which rejects a large gain for a short tail (dense at batch 8:
    a median 1.75x faster, its p90 slower)."""
    if not parallel or not parallel.median_s:
        return False
    if not serial or not serial.median_s:
        return True
    mean_gain = _typical_s(serial) / _typical_s(parallel)
    return max(serial.median_s / parallel.median_s, mean_gain) >= PARALLEL_MIN_GAIN and mean_gain > 1.0


def _typical_s(timing: Timing) -> float:
    """The mean of a build's runs less the slowest and fastest 2% (a run the OS preempted says nothing)."""
    return float(trim_mean(timing.seconds, TRIM_SHARE))


def _plan_times(pooled: Mapping[str, Timing], plans: list[str]) -> dict[str, tuple[str, float]]:
    """Each timed plan's build (`parallel_pays`) and that build's median."""
    times = {}
    for plan in plans:
        parallel, serial = (pooled.get(build_key(plan, kind)) for kind in BUILDS)
        kind, timing = ("parallel", parallel) if parallel_pays(parallel, serial) else ("serial", serial)
        if timing and timing.median_s:
            times[plan] = (kind, timing.median_s)
    return times


def _kept(times: Mapping[str, tuple[str, float]], choice: str) -> tuple[str, str]:
    """The (plan, build) that ships, of the plans' `_plan_times` (at least one): the fastest plan where it is
    PICK_MIN_GAIN faster than the predicted `choice` (or that has no time), else the predicted choice."""
    fastest = min(times, key=lambda plan: times[plan][1])
    if choice in times and times[choice][1] / times[fastest][1] < PICK_MIN_GAIN:
        fastest = choice
    return fastest, times[fastest][0]


class _Builder:
    """Builds (plan, build) artifacts into one folder and remembers them, or why one failed, and the plans
    whose build for several cores runs every kernel serially (`pool_free`: no twin is built for them)."""

    def __init__(self, build: Build, profile, folder: Path, uses_pool: Callable[[Path], bool]):
        self.build, self.profile, self.folder, self.uses_pool = build, profile, folder, uses_pool
        self.artifacts: dict[tuple[str, str], Path] = {}
        self.errors: dict[str, str] = {}
        self.pool_free: set[str] = set()

    def __call__(self, plan: str, ir: IRModel, kind: str) -> None:
        profile = self.profile if kind == "parallel" else serial_profile(self.profile)
        stem = self.folder / f"build{len(self.artifacts) + len(self.errors)}"
        try:
            self.artifacts[plan, kind] = self.build(ir, profile, stem)
        except CodegenError as err:  # that build drops out; the others are still compared
            self.errors[build_key(plan, kind)] = str(err)

    def both(self, plan: str, ir: IRModel) -> None:
        """The plan's parallel build (unless made already), then its serial twin, or, where no kernel of the
        parallel build uses the thread pool, that build as the plan's serial one."""
        if (plan, "parallel") not in self.artifacts:
            self(plan, ir, "parallel")
        parallel = self.artifacts.get((plan, "parallel"))
        if parallel is not None and not self.uses_pool(parallel):
            self.artifacts[plan, "serial"] = self.artifacts.pop((plan, "parallel"))
            self.pool_free.add(plan)
        else:
            self(plan, ir, "serial")


def measured_pick(chosen_name: str, chosen_ir: IRModel, results: Mapping[str, Any] | None,
                  make_ir: Callable[[Any], IRModel] | None, build: Build, profile, time_artifacts: TimeArtifacts,
                  folder: Path, uses_pool: Callable[[Path], bool] | None = None) -> Pick:
    """Build the builds into `folder` (the chosen plan's parallel build first: a CodegenError there is the
    caller's), time them side by side with `time_artifacts`, and keep one (see the module docstring).
    `results` (the search's reports, and `make_ir(report)` their IRs) offer the other plans; None: the
    chosen plan only. The kept artifact stays in `folder`, at the path its record names. `uses_pool(artifact)`
    (default `export.uses_thread_pool`) says whether a build has a kernel on the thread pool."""
    names = contenders(results, chosen_name, PICK_MARGIN) if results else [chosen_name]
    alone = {"skipped": f"no other validated plan predicted within {PICK_MARGIN:g}x of the chosen one"}

    def plans(record: dict[str, Any]) -> dict[str, Any] | None:
        """plan.json's `search.measured_pick`: None where no plans were offered."""
        return None if results is None else record if len(names) > 1 else alone

    started = time.perf_counter()
    first = build(chosen_ir, profile, folder / "chosen")
    build_s = time.perf_counter() - started

    def unmeasured(plans_record: dict[str, Any], threading: dict[str, Any]) -> Pick:
        """The chosen plan's first build ships: nothing (more) to compare, or no time to compare by."""
        return Pick(chosen_name, chosen_ir, first, plans(plans_record), threading)

    if build_s > PICK_BUILD_BUDGET_S:
        reason = {"skipped": f"the chosen plan's artifact took {build_s:.0f} s to build (other builds are made "
                             f"only within {PICK_BUILD_BUDGET_S:g} s)"}
        return unmeasured(reason, reason)
    names, not_built = buildable(names, build_s, profile.cores)
    if not_built and len(names) == 1:
        alone = {"skipped": f"the chosen plan's artifact took {build_s:.0f} s to build: no other plan's builds fit "
                            f"in {PICK_TOTAL_BUILD_S:g} s (left out: {', '.join(not_built)})"}
    if profile.cores <= 1 and len(names) == 1:
        return unmeasured(alone, {"skipped": ONE_CORE})
    if uses_pool is None:
        from pruneaug.codegen.export import uses_thread_pool as uses_pool
    builder = _Builder(build, profile, folder, uses_pool)
    builder.artifacts[chosen_name, "parallel"] = first
    irs = {chosen_name: chosen_ir, **{name: make_ir(results[name]) for name in names[1:]}}
    for name, ir in tqdm(irs.items(), desc="building the contenders", unit="plan", disable=None):
        if profile.cores > 1:
            builder.both(name, ir)
        elif (name, "parallel") not in builder.artifacts:
            builder(name, ir, "parallel")
    if len(names) == 1 and chosen_name in builder.pool_free:  # one plan, one build: nothing to compare
        return unmeasured(alone, {"kept": "serial", "threads": profile.cores, "skipped": _pool_free(profile)})
    artifacts = {build_key(*key): path for key, path in builder.artifacts.items()}
    try:
        timings = [time_artifacts(artifacts) for _ in range(PICK_TIMINGS)]
    except TimingError as err:  # the predicted choice's first build stands, untimed
        reason = {"skipped": f"timing the builds failed: {err}"}
        return unmeasured(reason, reason)
    pooled = _pooled(timings)
    times = _plan_times(pooled, names)
    if not times:  # every build's runs failed in the timing process
        failed = "; ".join(f"{name}: {timing.error}" for name, timing in pooled.items())
        reason = {"skipped": f"no build ran in the timing: {failed}"}
        return unmeasured(reason, reason)
    kept = _kept(times, chosen_name)
    return Pick(kept[0], irs[kept[0]], builder.artifacts[kept],
                plans(_plans_record(names, results, pooled, times, kept, builder, not_built) if len(names) > 1
                      else alone),
                _threading_record(kept, pooled, timings, profile, kept[0] in builder.pool_free))


def _figures(timing: Timing | None) -> dict[str, float | None] | None:
    return None if timing is None else {"median_s": timing.median_s, "p10_s": timing.p10_s, "p90_s": timing.p90_s}


def _plans_record(names: list[str], results: Mapping[str, Any], pooled: Mapping[str, Timing],
                  counted: Mapping[str, tuple[str, float]], kept: tuple[str, str],
                  builder: _Builder, not_built: list[str]) -> dict[str, Any]:
    """plan.json's `search.measured_pick`: each contender's builds as timed, and the one it `counted` as
    (`_plan_times`); the plans predicted close whose builds did not fit in PICK_TOTAL_BUILD_S."""
    return {
        "picked": kept[0],
        "build": kept[1],
        "predicted_choice": names[0],
        "min_gain": PICK_MIN_GAIN,
        "contenders": {name: {"predicted_latency_s": results[name].predicted_latency_s,
                              "counted": counted[name][0] if name in counted else None,
                              "uses_thread_pool": name not in builder.pool_free,
                              **{kind: _figures(pooled.get(build_key(name, kind))) for kind in BUILDS}}
                       for name in names},
        "errors": builder.errors,
        "not_built": {name: results[name].predicted_latency_s for name in not_built},
        "build_budget_s": PICK_TOTAL_BUILD_S,
        "method": f"every contender's builds (parallel kernels where each kernel pays for the pool, and every "
                  f"kernel serial; one build where no kernel pays for the pool), their compiled functions side by "
                  f"side in one fresh process, {PICK_TIMINGS} timings of {PICK_ROUNDS} rounds of {PICK_RUNS} runs "
                  f"{PICK_ROUND_PAUSE_S:g} s apart, all runs pooled; a plan's parallel build counts only where "
                  f"{PARALLEL_RULE}, and the predicted choice is replaced only by a plan {PICK_MIN_GAIN:g}x faster",
    }


def _pool_free(profile) -> str:
    """Why a plan has one build: plan.json's words."""
    return (f"no kernel of this plan pays for the thread pool at {profile.cores} threads (each decides alone, "
            f"`threads.worth_parallel`): its one build runs every kernel serially")


def _threading_record(kept: tuple[str, str], pooled: Mapping[str, Timing], timings: list[Mapping[str, Timing]],
                      profile, pool_free: bool) -> dict[str, Any]:
    """plan.json's `threading`: the kept plan's builds as timed (or why it has none)."""
    if profile.cores <= 1:
        return {"skipped": ONE_CORE}
    keys = {kind: build_key(kept[0], kind) for kind in BUILDS if build_key(kept[0], kind) in pooled}
    if "serial" not in keys:
        return {"skipped": f"the serial build of {kept[0]} failed"}
    rule = _pool_free(profile) if pool_free else f"the parallel build is kept only where {PARALLEL_RULE}"
    return {
        "kept": kept[1],
        "threads": profile.cores,
        "min_gain": PARALLEL_MIN_GAIN,
        "median_s": {kind: pooled[key].median_s for kind, key in keys.items()},
        "p10_s": {kind: pooled[key].p10_s for kind, key in keys.items()},
        "timings_median_s": [{kind: t[key].median_s for kind, key in keys.items()} for t in timings],
        "method": f"timed with the other plans' builds (`search.measured_pick` where there were any) at "
                  f"{profile.cores} threads; {rule}",
    }
