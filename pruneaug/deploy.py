"""From pruned.onnx to a checked artifact, and the whole-model latency the report quotes.

The correctness gate runs the exported artifact wherever its code runs here (the host; CUDA on a
machine with a GPU): it must match pruned.onnx in onnxruntime on the calibration inputs, else a
CodegenError names the first layer that differs. Whole-model latencies are measured wherever the
artifact runs, against onnxruntime on the CPU, each runtime in its own process (`pruneaug.timing`
says why); for other targets the report gives the cost model's predictions.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pruneaug.calib import graph_inputs
from pruneaug.codegen.schedule import DENSE_BLOCK
from pruneaug.errors import CodegenError, PruneaugError
from pruneaug.gate import GATE_RTOL
from pruneaug.ir.onnx_io import save_model
from pruneaug.passes.latency import runs_block_sparse
from pruneaug.pool import pool_threads
from pruneaug.timing import Competitor, time_interleaved

BENCH_REPEAT = 50  # timed runs per competitor (fewer where a large model's rounds exceed BENCH_BUDGET_S)
BENCH_BUDGET_S = 4.0  # seconds of timed rounds: BERT-base gets 4-5 rounds of one run each, small models all 10 x 5
RUNS_PER_ROUND = 5


@contextlib.contextmanager
def quiet_native_stderr():
    """Drop what TVM's C++ side prints to stderr (LOG(WARNING) notes on schedules and scopes).

    Real failures reach us as exceptions with their message; the CLI's stderr stays for our own lines.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def release_freed_memory() -> None:
    """Collect garbage and hand the heap that Python and numpy freed back to the OS (glibc's
    `malloc_trim`; nothing elsewhere).

    Before a compile starts its timing workers: after the search and the build, the compile holds
    ~3.7 GB for BERT-base, much of it freed but not returned, and the workers' model loads then ran
    largely in kernel time (workers ready 7.6 s after their start instead of 4.9 s; the whole-model
    timing 12-13 s instead of 9.6-10.9 s). (Before the build it made the build slower: the memory
    it returned was faulted in again.)"""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def runs_here(profile) -> bool:
    """Whether `profile`'s code runs on this machine, so that the gate can run the artifact and the
    whole model be timed: the host target always, CUDA where a GPU is present (arm64 is only ever
    emulated, in the tests). A CUDA artifact's onnxruntime competitors run on the CPU beside it, for
    reference only: a GPU artifact against a CPU session is no fair comparison (the report says so)."""
    from pruneaug.runtime import has_cuda_gpu

    return profile.kind == "x86" or (profile.kind == "cuda" and has_cuda_gpu())


def picks_here(profile) -> bool:
    """Whether the compile picks between plans and thread layouts by timing their artifacts here: on
    the host CPU, whose thread pool the parallel and serial builds differ in (`pruneaug.pick`)."""
    return profile.kind == "x86"


def sample_inputs(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]],
                  calib: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Inputs of the deployment shapes: the first calibration rows, or seeded random values without calibration data."""
    rng = np.random.default_rng(0)
    inputs = {}
    for value in graph_inputs(model):
        shape = tuple(shapes[value.name])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        rows = calib_rows(calib, value.name, shape)
        inputs[value.name] = rows if rows is not None else rng.standard_normal(shape).astype(dtype)
    return inputs


def calib_rows(calib: Mapping[str, np.ndarray] | None, name: str, shape: Sequence[int]) -> np.ndarray | None:
    """The first calibration rows of input `name` at `shape`, or None where the data has no such rows
    (another sequence length, fewer rows than the batch, no data)."""
    if calib is None or name not in calib:
        return None
    array = calib[name]
    if array.shape[1:] != tuple(shape[1:]) or len(array) < shape[0]:
        return None
    return np.ascontiguousarray(array[: shape[0]])


def sparse_weights(ir) -> dict[str, tuple[int, int]]:
    """Weight name -> block shape of every layer `build_artifact` runs in a BSR kernel of a block shape of its
    own: the pruned layers, and the dense ones whose dense kernel `latency.annotate` builds in another block
    shape than the default (`dense_block`: every block kept). The rest run in the default dense kernel."""
    blocks = {}
    for node in ir.prunable_nodes():
        data = ir.graph.nodes[node]
        sparse = runs_block_sparse(data)
        block = data["block"].shape if sparse else tuple(data.get("dense_block", DENSE_BLOCK))
        if sparse or block != DENSE_BLOCK:
            blocks[ir.layer(node).weight] = block
    return blocks


def plan_builder(pruned_model: onnx.ModelProto, sparse_weights: Mapping[str, tuple[int, int]],
                 shapes: Mapping[str, Sequence[int]], inputs: Mapping[str, np.ndarray],
                 expected: Callable[[], Sequence[np.ndarray]] | None = None) -> Callable[[Any, Path], Path]:
    """`build_artifact` of one plan with the target profile and stem left open, `(profile, stem) -> path`:
    the measured pick builds each plan for two profiles (parallel and serial kernels)."""
    return lambda profile, stem: build_artifact(pruned_model, sparse_weights, profile, shapes, stem, inputs, expected)


def build_artifact(pruned_model: onnx.ModelProto, sparse_weights: Mapping[str, tuple[int, int]], profile,
                   shapes: Mapping[str, Sequence[int]], stem: Path, inputs: Mapping[str, np.ndarray],
                   expected: Callable[[], Sequence[np.ndarray]] | None = None) -> Path:
    """Compile for `profile`, export, and gate the exported artifact against onnxruntime where its code runs
    here; returns the artifact's path. An artifact that fails the gate is deleted again. `expected()`,
    where onnxruntime's outputs of the pruned model on `inputs` are being computed elsewhere (from its
    saved file, while this builds), waits for and returns them; without it the gate runs onnxruntime itself.

    The gate loads the very file that ships (one export, not one for the gate and one to keep: exporting
    BERT-base takes seconds), which also proves that it loads."""
    from pruneaug.codegen.export import export_artifact, model_signature, remove_artifact
    from pruneaug.codegen.relax_build import build_model, check_against_onnxruntime
    from pruneaug.runtime import device_for, load

    with _failures_as_codegen_errors(f"TVM failed to compile the model for {profile.name}"):
        executable = build_model(pruned_model, sparse_weights, profile, shapes)
        path = export_artifact(executable, profile, stem, model_signature(pruned_model, shapes))
    if runs_here(profile):
        try:
            with _failures_as_codegen_errors(f"the correctness gate could not run the artifact for {profile.name}"):
                reference = expected() if expected else None  # (a ModelError from writing pruned.onnx stays one)
                check_against_onnxruntime(load(path, device_for(profile.kind)), pruned_model, inputs, GATE_RTOL,
                                          sparse_weights=sparse_weights, target=profile, expected=reference)
        except BaseException:
            remove_artifact(path)
            raise
    return path


@contextlib.contextmanager
def _failures_as_codegen_errors(what: str):
    """TVM's (and the gate's onnxruntime's) own exceptions as a CodegenError saying `what` failed: they end
    the codegen, not the compile. A user error (`PruneaugError`) stays what it is."""
    try:
        yield
    except PruneaugError:
        raise
    except Exception as err:  # noqa: BLE001
        text = str(err).strip().splitlines()
        raise CodegenError(f"{what}: {type(err).__name__}: {text[-1] if text else ''}") from err


def _on_disk(model: onnx.ModelProto | Path, where: Path) -> Path:
    """`model`'s file: its own path, or `where` once it is saved there."""
    if isinstance(model, onnx.ModelProto):
        save_model(model, where)
        return where
    return Path(model)


GPU_NOTE = (" (the artifact on its GPU, inputs copied in and outputs out on each run; onnxruntime on the CPU, "
            "for reference: not the baseline a GPU user would pick, so its speed-ups say little)")
LATENCY_KEYS = {"onnxruntime_dense_s": "onnxruntime", "onnxruntime_pruned_s": "onnxruntime", "tvm_pruned_s": "artifact"}


def measure_model_latency(dense_model: onnx.ModelProto | Path, pruned_model: onnx.ModelProto | Path, artifact: Path,
                          inputs: Mapping[str, np.ndarray], repeat: int = BENCH_REPEAT,
                          runs_per_round: int = RUNS_PER_ROUND, device: str = "cpu") -> dict:
    """Whole-model latency of onnxruntime (dense and pruned models) and of the artifact (built for
    `device`; its worker loads it there), for plan.json.

    Each runs in its own process, interleaved (`pruneaug.timing`), with the host's thread count; a
    model given as a file is read from there (a compile has both on disk already), one given in
    memory is saved for its worker. A competitor that could not be timed has null figures and its
    reason under `errors`: a failed measurement never fails the compile.
    """
    threads = pool_threads()
    rounds = max(1, -(-repeat // runs_per_round))
    with tempfile.TemporaryDirectory(prefix="pruneaug-models-") as folder:
        paths = {"onnxruntime_dense_s": _on_disk(dense_model, Path(folder) / "dense.onnx"),
                 "onnxruntime_pruned_s": _on_disk(pruned_model, Path(folder) / "pruned.onnx"),
                 "tvm_pruned_s": Path(artifact)}
        run = time_interleaved([Competitor(key, kind, paths[key]) for key, kind in LATENCY_KEYS.items()], inputs,
                               threads, rounds=rounds, runs=runs_per_round, budget_s=BENCH_BUDGET_S)
    timings = run.results
    latency: dict = {key: timings[key].median_s for key in LATENCY_KEYS}
    latency.update(
        p10_s={key: timings[key].p10_s for key in LATENCY_KEYS},
        p90_s={key: timings[key].p90_s for key in LATENCY_KEYS},
        repeat=run.repeat, rounds=run.rounds, runs_per_round=run.runs, threads=threads,
        load_average=list(run.load_average), device=device,
        note=f"input shapes {', '.join(f'{k}{list(v.shape)}' for k, v in inputs.items())}; measured on this host"
             f"{GPU_NOTE if device == 'cuda' else ''}, {run.method()}",
    )
    errors = {key: timings[key].error.removeprefix(f"{key}: ") for key in LATENCY_KEYS if timings[key].error}
    if errors:
        latency["errors"] = errors
    return latency
