"""Whole-model latency of several competitors, each in its own process, driven interleaved round by round.

Why separate processes: a runtime's thread pool keeps its threads busy after a run; with onnxruntime
and TVM in one process, one pool's threads take the cores the other needs (on the bundled CNN the
artifact looked 1.26x onnxruntime's time in one process, 0.52-0.69x in separate ones).
Why interleaved: a shared machine's load changes from second to second; in round r every competitor
runs one block of `runs` timed runs, the order rotated by r, so a burst of load hits them alike.

    >>> run = time_interleaved([Competitor("onnxruntime", "onnxruntime", Path("model.onnx")),
    ...                         Competitor("ours", "artifact", Path("out/model.x86.so"))],
    ...                        {"input": x}, threads=2, rounds=10, runs=5)
    >>> run.results["ours"].median_s, run.results["ours"].error
    (0.00041, None)

Every competitor gets the same thread count: TVM_NUM_THREADS for an artifact (loaded with
`pruneaug.load`), intra_op_num_threads for onnxruntime, whose spinning is switched off
(`session.intra_op.allow_spinning=0`) so that its idle threads leave the cores to the next block.
Each timed run is one call as a user makes it, numpy in and numpy out (`session.run`, `model.run`);
kind `artifact-vm` times the artifact's compiled function alone (TVM's timer, inputs already TVM
tensors, outputs left on the device), which shows how much of a small model's call is the Python
side's conversions.

A worker is `python -m pruneaug.timing KIND PATH INPUTS.npz THREADS WARMUP`. It loads its model,
runs WARMUP untimed runs, answers one JSON line on its stdout (`{"ready": true, "run_s": its median warm-up run}` or `{"error": ...}`),
then for each line N on its stdin makes one untimed run (caches and threads went cold during the
other competitors' blocks; not where a run takes LONG_RUN_S or more) and answers the N run times in
seconds as a JSON list; EOF ends it.
`python -m pruneaug.timing side-by-side INPUTS.npz` is `time_side_by_side`'s fresh process: it reads one
JSON request on its stdin and answers one JSON line, every artifact's run times or an error.
Anything native code prints to stdout is moved to stderr, which the parent keeps in a file and quotes
when a worker fails. A failed or crashed worker ends that competitor only: its `Timing.error` says
why and the others go on.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from pruneaug.errors import ModelError

KINDS = ("onnxruntime", "artifact", "artifact-vm")
WORKER = (sys.executable, "-m", "pruneaug.timing")  # the worker's command line, before its arguments
SIDE_BY_SIDE = "side-by-side"  # the worker's first argument where it times artifacts side by side
REPLY_TIMEOUT_S = 600.0  # longest wait for one answer (a large model's load and warm-up included)
SETTLE_S = 0.1  # pause before each block: the previous competitor's threads stop spinning
MIN_ROUNDS = 3  # what a time budget still leaves: enough for a median that one slow round does not move
ROUNDS_PER_BUDGET = 6  # rounds a time budget should hold: a large model gets fewer runs per round, not fewer rounds
LONG_RUN_S = 0.1  # a run at least this long gets no untimed run before its block: warm caches would not show in it
STDERR_TAIL_LINES = 5


class TimingError(RuntimeError):
    """A competitor could not be timed: its worker failed to load, raised, crashed or hung."""


@dataclass(frozen=True)
class Competitor:
    """What one worker runs: an ONNX file in onnxruntime, or a compiled artifact through `pruneaug.load`.

    kind: `onnxruntime`, `artifact` (`model.run`, numpy in and out) or `artifact-vm` (the compiled function alone).
    """

    name: str
    kind: str
    path: Path

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"competitor {self.name!r}: kind {self.kind!r}, expected one of {', '.join(KINDS)}")


@dataclass
class Timing:
    """One competitor's timed runs in seconds (all rounds pooled), or why it has none."""

    name: str
    seconds: list[float] = field(default_factory=list)
    error: str | None = None
    warmup_s: float | None = None  # median of the worker's untimed warm-up runs

    def _percentile(self, q: float) -> float | None:
        if self.error is not None or not self.seconds:
            return None
        return float(np.percentile(self.seconds, q))

    @property
    def median_s(self) -> float | None:
        return self._percentile(50)

    @property
    def p10_s(self) -> float | None:
        return self._percentile(10)

    @property
    def p90_s(self) -> float | None:
        return self._percentile(90)


@dataclass
class TimingRun:
    """Every competitor's `Timing` from one interleaved run, and how it was taken."""

    results: dict[str, Timing]
    threads: int
    rounds: int
    runs: int
    load_average: tuple[float, float]  # 1-minute load average before and after

    @property
    def repeat(self) -> int:
        """Timed runs per competitor that completed every round."""
        return self.rounds * self.runs

    def method(self) -> str:
        """One sentence on how the figures were taken, for reports and benchmark headers."""
        return (f"each competitor in its own process, {self.threads} threads (TVM_NUM_THREADS, onnxruntime "
                f"intra_op_num_threads with spinning off), interleaved in {self.rounds} rounds of {self.runs} runs "
                f"(order rotated each round): median, p10, p90 of {self.repeat} runs; "
                f"load average {self.load_average[0]:.2f} before, {self.load_average[1]:.2f} after")


class _Worker:
    """The parent's end of one worker process."""

    def __init__(self, competitor: Competitor, inputs_file: Path, threads: int, warmup: int, log: Path):
        self.competitor = competitor
        self.log = log
        env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(
                [*WORKER, competitor.kind, str(competitor.path), str(inputs_file), str(threads), str(warmup)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)

    def request(self, line: str | None) -> Any:
        """Send `line` (if any) and return the worker's decoded answer; TimingError if it fails, dies or hangs."""
        timeout_s = REPLY_TIMEOUT_S
        assert self.process.stdin is not None and self.process.stdout is not None
        if line is not None:
            try:
                self.process.stdin.write(line + "\n")
                self.process.stdin.flush()
            except BrokenPipeError:
                raise TimingError(self._death()) from None
        readable, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not readable:
            self.process.kill()
            raise TimingError(f"{self.competitor.name}: its timing worker gave no answer in {timeout_s:g} s")
        reply = self.process.stdout.readline()
        if not reply:
            raise TimingError(self._death())
        try:
            answer = json.loads(reply)
        except ValueError:
            raise TimingError(f"{self.competitor.name}: its timing worker answered {reply.strip()[:200]!r}") from None
        if isinstance(answer, dict) and "error" in answer:
            raise TimingError(f"{self.competitor.name}: {answer['error']}")
        return answer

    def _death(self) -> str:
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        tail = " | ".join(lines[-STDERR_TAIL_LINES:]) or "nothing"
        return f"{self.competitor.name}: its timing worker died ({how}); its last stderr lines: {tail}"

    def end_input(self) -> None:
        """EOF on the worker's stdin: it exits (`close` waits for that; ending every worker first lets
        them tear down their models side by side, ~0.5 s less for BERT-base)."""
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.end_input()
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except BrokenPipeError:
                pass


def rotated(items: Sequence, by: int) -> list:
    """`items` starting at index `by` (mod its length): round r's order."""
    if not items:
        return []
    shift = by % len(items)
    return [*items[shift:], *items[:shift]]


def time_interleaved(competitors: Sequence[Competitor], inputs: Mapping[str, np.ndarray], threads: int,
                     rounds: int = 10, runs: int = 5, warmup: int = 2, settle_s: float = SETTLE_S,
                     budget_s: float | None = None) -> TimingRun:
    """Time every competitor on `inputs` in its own worker process, `rounds` rounds of `runs` runs each.

    With `budget_s`, no round starts once the timed rounds have taken that long, after at least
    MIN_ROUNDS of them, and a round holds fewer than `runs` runs where the warm-up runs say that
    the budget would otherwise hold fewer than ROUNDS_PER_BUDGET rounds: a compile times a BERT-sized
    model (0.2-0.4 s a run) in seconds, not half a minute, and still over rounds that share the load.
    """
    if len({c.name for c in competitors}) != len(competitors):
        raise ValueError("competitor names must differ")
    if threads < 1 or rounds < 1 or runs < 1 or warmup < 0:
        raise ValueError(f"threads {threads}, rounds {rounds}, runs {runs} must be >= 1 and warmup {warmup} >= 0")
    results = {c.name: Timing(c.name) for c in competitors}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pruneaug-timing-") as folder:
        inputs_file = _save_inputs(Path(folder), inputs)
        workers = [_Worker(c, inputs_file, threads, warmup, Path(folder) / f"worker{i}.log")
                   for i, c in enumerate(competitors)]  # all load at once: loading is not timed
        try:
            alive = [w for w in workers if _answered(w, None, results)]
            if budget_s is not None:
                runs = runs_per_round(budget_s, [results[w.competitor.name].warmup_s for w in alive], runs)
            started, done = time.perf_counter(), 0
            for round_index in range(rounds):
                if budget_s is not None and done >= MIN_ROUNDS and time.perf_counter() - started > budget_s:
                    break
                done += 1
                for worker in rotated(alive, round_index):
                    time.sleep(settle_s)
                    if not _answered(worker, str(runs), results):
                        alive.remove(worker)
        finally:
            for worker in workers:
                worker.end_input()
            for worker in workers:
                worker.close()
    return TimingRun(results, threads, done, runs, (load_before, os.getloadavg()[0]))


def _save_inputs(folder: Path, inputs: Mapping[str, np.ndarray]) -> Path:
    """The inputs as the workers read them (`_load_inputs`): one .npz in `folder`."""
    inputs_file = folder / "inputs.npz"
    np.savez(inputs_file, **{name: np.asarray(array) for name, array in inputs.items()})
    return inputs_file


def _load_inputs(inputs_file: str | Path) -> dict[str, np.ndarray]:
    """A worker's inputs, written by `_save_inputs`."""
    with np.load(inputs_file) as data:
        return {name: data[name] for name in data.files}


def time_side_by_side(artifacts: Mapping[str, Path], inputs: Mapping[str, np.ndarray], rounds: int = 10,
                      runs: int = 10, pause_s: float = 0.0) -> dict[str, Timing]:
    """Every artifact's compiled function in one fresh process (`side_by_side_here` there), interleaved
    `rounds` times (order rotated), `pause_s` between rounds; its thread pool is this process's size
    (TVM_NUM_THREADS is inherited). Raises TimingError where that process fails.

    For comparing artifacts with each other, not with onnxruntime: they share one TVM thread pool, so
    no runtime's idle threads take another's cores, and each is measured beside the others in the same
    seconds. (On the bundled CNN, two plans each timed in its own run against onnxruntime read 0.73x
    through that double ratio where side by side they read 1.31x.) Why not in this process: after a
    compile, in the process that ran it, one artifact of a side-by-side timing at a time ran 1.3-1.7x
    slower than in a fresh process, the others 1.05-1.15x slower (the encoder's plans with
    reconstruction, twice: "best single" 47.7 and 46.4 µs there, 28.4 and 28.4 µs in a fresh process
    beside the same artifacts; another time "unstructured" 48.0 against 37.8 µs), so picks and
    benchmarks compared a plan with a slowed one."""
    request = {"artifacts": {name: str(path) for name, path in artifacts.items()}, "rounds": rounds, "runs": runs,
               "pause_s": pause_s}
    with tempfile.TemporaryDirectory(prefix="pruneaug-side-by-side-") as folder:
        inputs_file = _save_inputs(Path(folder), inputs)
        try:
            done = subprocess.run([*WORKER, SIDE_BY_SIDE, str(inputs_file)], input=json.dumps(request),
                                  capture_output=True, text=True, timeout=REPLY_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            raise TimingError(f"timing {', '.join(artifacts)} side by side took over {REPLY_TIMEOUT_S:g} s") from err
    lines = done.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if lines else {}
    if done.returncode != 0 or "error" in answer or "seconds" not in answer:
        reason = answer.get("error") or " | ".join(done.stderr.strip().splitlines()[-STDERR_TAIL_LINES:])
        raise TimingError(f"timing {', '.join(artifacts)} side by side failed (exit status {done.returncode}): "
                          f"{reason}")
    return {name: Timing(name, seconds) for name, seconds in answer["seconds"].items()}


def side_by_side_here(artifacts: Mapping[str, Path], inputs: Mapping[str, np.ndarray], rounds: int, runs: int,
                      pause_s: float) -> dict[str, Timing]:
    """`time_side_by_side`'s rounds, in this process."""
    from pruneaug.runtime import load

    models = {name: load(path) for name, path in artifacts.items()}
    timings = {name: Timing(name) for name in models}
    for round_index in range(rounds):
        if round_index and pause_s:
            time.sleep(pause_s)
        for name in rotated(list(models), round_index):
            timings[name].seconds.extend(models[name].time_runs(inputs, runs).tolist())
    return timings


def runs_per_round(budget_s: float, warmup_s: Sequence[float | None], runs: int) -> int:
    """At most `runs`, and at least 1: as many as let ROUNDS_PER_BUDGET rounds of every competitor's
    block (its timed runs, and the untimed one before them where a run is short) fit in `budget_s`."""
    known = [seconds for seconds in warmup_s if seconds is not None]
    if not known:
        return runs
    timed_share = budget_s / ROUNDS_PER_BUDGET - sum(seconds for seconds in known if untimed_run_first(seconds))
    return max(1, min(runs, int(timed_share / sum(known))))


def untimed_run_first(run_s: float | None) -> bool:
    """Whether a worker's blocks start with an untimed run: unless its runs take LONG_RUN_S or more
    (`run_s`, its median warm-up run; None where it made none)."""
    return run_s is None or run_s < LONG_RUN_S


def _answered(worker: _Worker, line: str | None, results: dict[str, Timing]) -> bool:
    """Send one request; run times are added to the competitor's Timing, a failure recorded as its error."""
    timing = results[worker.competitor.name]
    try:
        answer = worker.request(line)
    except TimingError as err:
        timing.error = str(err)
        timing.seconds.clear()
        return False
    if isinstance(answer, list):
        timing.seconds.extend(float(seconds) for seconds in answer)
    elif answer.get("run_s") is not None:
        timing.warmup_s = float(answer["run_s"])
    return True


# ---- the worker side ------------------------------------------------------------------------------------------

def _wall_clock(run: Callable[[], object]) -> Callable[[], float]:
    def timed() -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    return timed


def _timed_run(kind: str, path: Path, threads: int, inputs: dict[str, np.ndarray]) -> Callable[[], float]:
    """One timed run of the competitor, returning its seconds."""
    if kind == "onnxruntime":
        from pruneaug.passes.ort_run import make_session

        if not path.is_file():
            raise ModelError(f"{path}: no such model")
        session = make_session(path, threads, spinning=False)  # read by onnxruntime itself: a compile checked it
        return _wall_clock(lambda: session.run(None, inputs))
    from pruneaug.runtime import artifact_device, load

    model = load(path, artifact_device(path))
    if kind == "artifact-vm":  # TVM's own timer around the compiled function; conversions stay outside
        return lambda: model.benchmark(inputs, repeat=1)["median"]
    return _wall_clock(lambda: model.run(inputs))


def worker_main(argv: Sequence[str], commands: TextIO, answers: TextIO) -> int:
    """Load the competitor, warm it up, then answer each request with its run times (see the module doc)."""
    kind, path, inputs_file, threads, warmup = argv
    os.environ["TVM_NUM_THREADS"] = threads  # before TVM's thread pool starts

    def answer(value) -> None:
        answers.write(json.dumps(value) + "\n")
        answers.flush()

    try:
        inputs = _load_inputs(inputs_file)
        run = _timed_run(kind, Path(path), int(threads), inputs)
        warm = [run() for _ in range(int(warmup))]
    except Exception as err:  # noqa: BLE001 - the parent reports it as this competitor's failure
        answer({"error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"})
        return 1
    warm_s = float(np.median(warm)) if warm else None
    answer({"ready": True, "run_s": warm_s})
    for line in commands:
        if untimed_run_first(warm_s):
            run()  # untimed: the block's first run pays for caches and threads gone cold during the others' blocks
        answer([run() for _ in range(int(line))])
    return 0


def side_by_side_main(inputs_file: str, request: TextIO, answers: TextIO) -> int:
    """Answer one `time_side_by_side` request (JSON on `request`) with every artifact's run times, or an error."""
    order = json.loads(request.read())
    try:
        inputs = _load_inputs(inputs_file)
        timings = side_by_side_here({name: Path(path) for name, path in order["artifacts"].items()}, inputs,
                                    order["rounds"], order["runs"], order["pause_s"])
    except Exception as err:  # noqa: BLE001 - the parent raises it as a TimingError
        answer = {"error": f"{type(err).__name__}: {err}"}
    else:
        answer = {"seconds": {name: timing.seconds for name, timing in timings.items()}}
    answers.write(json.dumps(answer) + "\n")
    answers.flush()
    return 1 if "error" in answer else 0


def _main() -> int:
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever native code prints goes to stderr, never into the answers
    if sys.argv[1:2] == [SIDE_BY_SIDE]:
        return side_by_side_main(sys.argv[2], sys.stdin, answers)
    return worker_main(sys.argv[1:], sys.stdin, answers)


if __name__ == "__main__":
    from pruneaug.runtime import skip_unused_torch

    skip_unused_torch()
    sys.exit(_main())
