"""The threading pick: whether the artifact keeps its parallel kernels or runs every kernel on the calling
thread, measured here.

Why: each kernel decides alone whether it is worth the thread pool (`schedule.runs_parallel`,
`threads.worth_parallel`), from kernels timed alone, where the pool's threads stay awake between
calls. Inside a model they are not, and on a shared 2-vCPU host the pool's second thread is not
always there: the bundled encoder at batch 1 ran its parallel build 1.3x slower than its serial twin
for seconds at a time and alike for other seconds (never faster), while the CNN at batch 32 ran its
parallel build 1.6x faster (137 against 214 µs). So where the artifact runs here, the same plan is
built a second time for one core and the two are timed side by side, PICK_TIMINGS times, each
timing spread over half a second (`pick.PICK_ROUND_PAUSE_S`); the parallel build stays only where
the median of all its runs is PICK_MIN_GAIN faster than the serial build's. (Two timings that had to
agree went wrong both ways: a spell in one of them kept the CNN at batch 32 serial, 1.3x slower.)
Where the two run alike the serial build ships: as fast, it does not
depend on a second core's spells, and it leaves that core to the application. (Before pruneaug
sized TVM's pool, `pool`, the parallel build ran on one thread and the CNN at batch 8 read 1.5-1.7x
faster serial; the rule kept the parallel build unless serial won twice by its p10.) Like the
measured pick, it is paid only where a build is quick.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pruneaug.codegen.export import move_artifact, remove_artifact
from pruneaug.errors import CodegenError
from pruneaug.pick import PICK_BUILD_BUDGET_S, PICK_MIN_GAIN, PICK_ROUND_PAUSE_S, PICK_ROUNDS, PICK_RUNS
from pruneaug.timing import Timing, TimingError

Build = Callable[[Any, Path], Path]  # (target profile, stem) -> the built and gated artifact
TimeArtifacts = Callable[[dict[str, Path]], dict[str, Any]]  # {name: artifact} -> {name: Timing}


def serial_profile(profile):
    """The profile whose kernels all run on the calling thread (every parallel rule asks for cores > 1)."""
    return dataclasses.replace(profile, cores=1)


PICK_TIMINGS = 2  # side-by-side timings of the two builds, their runs pooled


def _pooled(timings: list[Mapping[str, Any]]) -> dict[str, Timing]:
    """Each build's runs of every timing in one Timing (its first error where it has no runs)."""
    return {name: Timing(name, [s for t in timings for s in t[name].seconds],
                         next((t[name].error for t in timings if t[name].error), None))
            for name in timings[0]}


def _parallel_gain(timings: Mapping[str, Any]) -> float:
    """Serial's median over parallel's; infinite where the serial twin has no time (it stays out), 0 where
    the parallel build has none."""
    parallel, serial = timings["parallel"].median_s, timings["serial"].median_s
    if not serial:
        return float("inf")
    return serial / parallel if parallel else 0.0


def pick_threading(parallel: Path, build_s: float, build: Build, profile,
                   time_artifacts: TimeArtifacts) -> tuple[Path, dict[str, Any]]:
    """Keep `parallel` (built for `profile` in `build_s` seconds) or its serial twin, built by `build`
    next to it; the kept artifact ends at `parallel`'s path. Returns it and plan.json's record."""
    if profile.cores <= 1:
        return parallel, {"skipped": "the target has one core: every kernel is serial already"}
    if build_s > PICK_BUILD_BUDGET_S:
        return parallel, {"skipped": f"the artifact took {build_s:.0f} s to build (a serial twin is built "
                                     f"only within {PICK_BUILD_BUDGET_S:g} s)"}
    stem = parallel.with_name(parallel.name.split(".")[0] + ".serial")
    try:
        serial = build(serial_profile(profile), stem)
    except CodegenError as err:  # the parallel build stands
        return parallel, {"skipped": f"the serial build failed: {err}"}
    artifacts = {"parallel": parallel, "serial": serial}
    try:
        timings = [time_artifacts(artifacts) for _ in range(PICK_TIMINGS)]
    except TimingError as err:  # the parallel build stands, untimed
        remove_artifact(serial)
        return parallel, {"skipped": f"timing the two builds failed: {err}"}
    pooled = _pooled(timings)
    kept = "parallel" if _parallel_gain(pooled) >= PICK_MIN_GAIN else "serial"
    if kept == "serial":
        remove_artifact(parallel)
        path = move_artifact(serial, parallel.with_suffix(""))
    else:
        remove_artifact(serial)
        path = parallel
    record = {
        "kept": kept,
        "threads": profile.cores,
        "min_gain": PICK_MIN_GAIN,
        "median_s": {name: timing.median_s for name, timing in pooled.items()},
        "p10_s": {name: timing.p10_s for name, timing in pooled.items()},
        "timings_median_s": [{name: timing.median_s for name, timing in t.items()} for t in timings],
        "method": f"the plan built twice, parallel kernels where each kernel pays for the pool and every kernel "
                  f"serial, the two compiled functions side by side in one fresh process at {profile.cores} threads, "
                  f"{PICK_TIMINGS} timings of {PICK_ROUNDS} rounds of {PICK_RUNS} runs {PICK_ROUND_PAUSE_S:g} s "
                  f"apart; the parallel build is kept only if the median of all its runs is {PICK_MIN_GAIN:g}x "
                  f"faster",
    }
    return path, record


def build_and_pick(build: Build, profile, stem: Path, time_artifacts: TimeArtifacts | None
                   ) -> tuple[Path, dict[str, Any] | None]:
    """`build(profile, stem)`, then `pick_threading` where the artifact is timed here (`time_artifacts`
    given); the record is None where it is not."""
    started = time.perf_counter()
    artifact = build(profile, stem)
    if time_artifacts is None:
        return artifact, None
    return pick_threading(artifact, time.perf_counter() - started, build, profile, time_artifacts)
