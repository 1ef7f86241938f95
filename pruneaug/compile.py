"""The CLI and the Python entry point: check the options, then wire the passes together. No pruning logic here.

    python -m pruneaug.compile model.onnx --target x86 --calib calib.npz --eval eval.npz --budget 0.01 --out out/
    python -m pruneaug.compile model.onnx --target x86 --block 8x8 --sparsity 0.8 --out out/

    >>> import pruneaug
    >>> result = pruneaug.compile("model.onnx", target="x86", block="8x8", sparsity=0.8, out="out")
    >>> result.plan["layers"][0]["sparsity"]
    0.8

Any user mistake is a PruneaugError: the CLI prints its one line to stderr and exits with 2, and
leaves no output folder behind.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pruneaug import options as opt
from pruneaug.artifacts import OutputFolder, write_json, write_masks
from pruneaug.calib import Dataset, graph_inputs, load_dataset
from pruneaug.errors import CodegenError, OptionError, PruneaugError
from pruneaug.ir.graph import IRModel, lift, lower
from pruneaug.ir.layer import BlockSpec
from pruneaug.ir.onnx_io import check_model, read_model, save_model
from pruneaug.passes import blockmask, importance, latency, proxy, search, sensitivity_store
from pruneaug.passes.reconstruct import reconstructor
from pruneaug.passes.validate import make_validator
from pruneaug.pick import Pick
from pruneaug.plan import build_plan, search_record
from pruneaug.report import write_report
from pruneaug.runtime import device_for

OUTPUT_FILES = ("pruned.onnx", "masks.npz", "plan.json", "report.md", "report.html", "pareto.png")


@dataclass
class CompileResult:
    """What a compile produced: the plan, and where each artifact was written."""

    plan: dict[str, Any]
    out_dir: Path
    pruned_model: Path
    masks: Path
    plan_file: Path
    report: Path
    artifact: Path | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Request:
    """Every option of one compile, checked before any file is read."""

    target: str
    fixed: BlockSpec | None
    keep_sparsity: bool
    blocks: list[tuple[int, int]]
    sparsities: list[float]
    pruner: str
    budget: float
    metric: str
    reconstruct: bool
    measure: str | None  # None: time kernels locally where the target runs here (x86; cuda with a GPU), else predict
    batch: int | None  # None: 1, or the model's own fixed batch
    shapes: dict[str, list[int]]  # --shape: inputs compiled at these full shapes
    artifact: bool

    @property
    def searching(self) -> bool:
        return self.fixed is None and not self.keep_sparsity


def compile_model(
    model: str | os.PathLike | onnx.ModelProto,
    target: str = "x86",
    out: str | os.PathLike = "out",
    block: str | None = None,
    sparsity: float | str | None = None,
    pruner: str = "magnitude",
    calib: str | os.PathLike | None = None,
    eval: str | os.PathLike | None = None,  # noqa: A002 - named as the CLI's --eval
    budget: float | str | None = None,
    metric: str | None = None,
    blocks: str = opt.DEFAULT_BLOCKS,
    sparsities: str = opt.DEFAULT_SPARSITIES,
    reconstruct: bool = False,
    measure: str | None = None,
    keep_sparsity: bool = False,
    batch: int | None = None,
    artifact: bool = True,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> CompileResult:
    """Prune `model` for `target`; write pruned.onnx, masks.npz, plan.json, the artifact and the report into `out`.

    The plan comes from `block` and `sparsity` (every prunable layer the same), from `keep_sparsity`
    (each layer's structure read off its zeros, nothing more pruned), or, with neither, from the
    search: per layer the block shape and sparsity of least predicted latency whose validated
    metric loss on `eval` stays within `budget` (default `options.DEFAULT_BUDGET`) in `metric` (default
    top1). The plan is costed and the artifact compiled for one static shape per input: `shapes`
    (`{name: [d, ...]}`, the CLI's --shape), else `batch` on axis 0 and the calibration data's sizes on
    the other dynamic axes.
    """
    request = check_request(target, block, sparsity, keep_sparsity, blocks, sparsities, pruner, budget, metric,
                            measure, batch, artifact, reconstruct, shapes)
    phases = PhaseClock()
    source, protected = _read_model(model)
    folder = OutputFolder(out, protected)
    folder.check(OUTPUT_FILES + tuple(f"model.{kind}.{suffix}" for kind in ("x86", "arm64", "cuda") for suffix in ("so", "tar")))
    calib_data = load_dataset(calib, source, "--calib") if calib is not None else None
    eval_data = load_dataset(eval, source, "--eval") if eval is not None else None
    from pruneaug import deploy
    from pruneaug.cost_model import cost_model  # TVM loads here: only once every input has been checked
    from pruneaug.cost_model.targets import resolve_target

    profile = resolve_target(request.target)
    measure_mode = request.measure or ("local" if deploy.runs_here(profile) else "none")
    notes: list[str] = []
    if request.pruner == "activation" and calib_data is None:
        raise OptionError("--pruner activation needs --calib FILE.npz (the inputs to measure activations on)")
    if request.reconstruct and calib_data is None:
        raise OptionError("--reconstruct needs --calib FILE.npz (the activations to re-fit the kept weights on)")
    if request.searching:
        eval_data = _search_data(eval_data, calib_data, request.metric, notes)
        calib_data = calib_data or eval_data
    else:
        unused = [option for option, value in (("--eval", eval), ("--budget", budget), ("--metric", metric))
                  if value is not None]
        if unused:
            notes.append(f"{' and '.join(unused)} not used: the plan is {'read off the model' if request.keep_sparsity else 'given'}, "
                         "so nothing is searched or validated")

    shapes = deploy_shapes(source, calib_data or eval_data, request.batch, request.shapes, notes)
    ir = lift(source, shapes)
    phases.lap("load")
    if not ir.prunable_nodes():
        reasons = sorted(set(ir.kept_dense.values()))
        notes.append("the model has no prunable MatMul/Gemm/Conv node: nothing was pruned" + (
            f" ({len(ir.kept_dense)} kept dense: {'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''})"
            if reasons else ""))
    costs = cost_model(profile, measure_mode)
    extra: dict[str, Any] = {
        "pruner": "keep-sparsity" if request.keep_sparsity else request.pruner,
        "reconstruct": request.reconstruct,
        "model_name": "model" if isinstance(model, onnx.ModelProto) else Path(model).name,
        "input_shapes": shapes,
        "phase_seconds": phases.seconds,
    }
    outcome: SearchOutcome | None = None
    if request.keep_sparsity:
        pruned = blockmask.apply_masks(blockmask.detect_blocks(importance.from_zeros(ir), request.blocks))
    else:
        scored = importance.by_pruner(ir, request.pruner, calib_data.inputs if calib_data else None)
        phases.lap("importance")
        finish = reconstructor(scored, calib_data.inputs) if request.reconstruct else None
        if request.searching and scored.prunable_nodes():
            outcome = _search(scored, profile, costs, request, calib_data, eval_data, finish, notes)
            pruned = outcome.ir
        else:
            spec = request.fixed or BlockSpec(1, 1, 0.0)
            pruned = blockmask.apply_masks(blockmask.assign_blocks(scored, {n: spec for n in ir.prunable_nodes()}))
            pruned = finish(pruned) if finish else pruned
    phases.lap("plan")

    if outcome is None:  # a given plan: the kernels it may run timed, as a search times its grid
        latency.measure_plan_kernels(costs, profile, pruned)
        phases.lap("plan kernels")
    with folder as staging, ThreadPoolExecutor(1, thread_name_prefix="pruneaug-write") as writer:
        pruned = latency.annotate(pruned, costs, dense_where_faster=not request.searching)
        _say_layers_run_dense(pruned, notes)
        inputs = deploy.sample_inputs(source, shapes, calib_data.inputs if calib_data else None) \
            if request.artifact else None  # the artifacts' gate and timing
        gate_inputs = inputs if request.artifact and deploy.runs_here(profile) else None
        written = _write_pruned(pruned, staging, writer, gate_inputs)
        picked = None
        if request.artifact and deploy.picks_here(profile):
            picked = _measured_pick(outcome, pruned, written, profile, costs, shapes, inputs, request.metric, staging,
                                    notes)
            if isinstance(picked, Pick) and picked.ir is not pruned:
                written.file.result()
                pruned = latency.annotate(picked.ir, costs)
                written = _write_pruned(pruned, staging, writer, None)  # (its artifact is built and gated)
            phases.lap("measured pick")
        if outcome is not None:
            extra["search"] = outcome.record
        artifact_name = None
        if request.artifact:
            artifact_name = _build_artifact(pruned, written, protected[0] if protected else source, profile, shapes,
                                            inputs, staging, extra, notes, phases, picked)
        written.file.result()  # (raises what writing them raised)
        plan = build_plan(pruned, profile.name, extra)
        write_json(staging / "plan.json", plan)
        write_report(staging, plan)
    out_dir = Path(out)
    return CompileResult(plan, out_dir, out_dir / "pruned.onnx", out_dir / "masks.npz", out_dir / "plan.json",
                         out_dir / "report.md", out_dir / artifact_name if artifact_name else None, notes)


def check_request(target, block, sparsity, keep_sparsity, blocks, sparsities, pruner, budget, metric, measure, batch,
                  artifact, reconstruct, shapes=None) -> Request:
    """Every option checked before any file is read: a typo costs nothing."""
    from pruneaug.cost_model.targets import check_target_name

    check_target_name(target)
    fixed = None
    if keep_sparsity:
        if block is not None or sparsity is not None:
            raise OptionError("--keep-sparsity reads the plan off the model's zeros: drop --block and --sparsity")
    elif block is not None or sparsity is not None:
        if block is None or sparsity is None:
            raise OptionError("a fixed plan needs both --block RxC and --sparsity S (or neither, to search)")
        fixed = BlockSpec.parse(block, opt.parse_sparsity(sparsity))
    if not (measure in (None, "local", "none") or str(measure).startswith("rpc://")):
        raise OptionError(f"--measure {measure!r}: expected local, none or rpc://HOST:PORT/KEY")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise OptionError(f"--batch {batch!r}: must be a positive integer")
    return Request(
        target=target, fixed=fixed, keep_sparsity=bool(keep_sparsity), blocks=opt.parse_blocks(blocks),
        sparsities=opt.parse_sparsities(sparsities), pruner=opt.check_choice("--pruner", pruner, opt.PRUNERS),
        budget=opt.parse_budget(opt.DEFAULT_BUDGET if budget is None else budget),
        metric=opt.check_choice("--metric", opt.METRICS[0] if metric is None else metric, opt.METRICS),
        reconstruct=bool(reconstruct), measure=measure, batch=batch, shapes=opt.parse_shapes(shapes),
        artifact=bool(artifact),
    )


def _search_data(eval_data: Dataset | None, calib_data: Dataset | None, metric: str, notes: list[str]) -> Dataset:
    """The data the search validates on: --eval, else --calib with a warning; neither is an error."""
    if eval_data is None:
        if calib_data is None:
            raise OptionError("the search validates its plan end to end: give --eval FILE.npz (or at least --calib), "
                              "or a fixed plan with --block and --sparsity")
        notes.append(f"no --eval: validating on the calibration data {calib_data.path}, which pruning also saw")
        eval_data = calib_data
    if metric == "top1" and eval_data.labels is None:
        notes.append(f"{eval_data.path} has no 'labels': top1 is measured as agreement with the dense model's argmax")
    return eval_data


SHOWN_LAYERS = 4  # layers a warning names before it refers to plan.json


def _say_layers_run_dense(ir: IRModel, notes: list[str]) -> None:
    """A note naming the pruned layers that run dense (`latency.annotate`), with both predicted latencies."""
    named = []
    for node in ir.prunable_nodes():
        data = ir.graph.nodes[node]
        if data["block_sparse_latency_s"] is not None:
            spec, sparse_us, dense_us = data["block"], data["block_sparse_latency_s"] * 1e6, data["dense_latency_s"] * 1e6
            named.append(f"{node} ({spec.rows}x{spec.cols} at {spec.sparsity:.2f}: block-sparse {sparse_us:.1f} µs, "
                         f"dense {dense_us:.1f} µs)")
    if named:
        more = f"; and {len(named) - SHOWN_LAYERS} more (plan.json's 'kernel')" if len(named) > SHOWN_LAYERS else ""
        notes.append(f"{len(named)} pruned layer(s) run dense in the artifact, zeros kept, where the block-sparse "
                     f"kernel is predicted no faster: {'; '.join(named[:SHOWN_LAYERS])}{more}")


def deploy_shapes(model: onnx.ModelProto, data: Dataset | None, batch: int | None,
                  given: Mapping[str, Sequence[int]] | None = None, notes: list[str] | None = None
                  ) -> dict[str, list[int]]:
    """The static input shapes the plan is costed and the artifact compiled for.

    An input named in `given` (--shape) takes that shape, which must keep the model's fixed sizes.
    Otherwise axis 0 of a dynamic input is the batch (`--batch`, default 1) and its other dynamic axes
    take the data's sizes (a sequence length, ...), or 1 without data; each size so taken is said in
    `notes`, since the artifact runs at that size only. A `batch` other than an input's fixed one, or
    than its --shape's, is an OptionError: the artifact cannot be compiled for it, and costing the plan
    at it would mislead.
    """
    given = given or {}
    inputs = graph_inputs(model)
    unknown = sorted(set(given) - {value.name for value in inputs})
    if unknown:
        raise OptionError(f"--shape {', '.join(unknown)}: not an input of the model (its inputs: "
                          f"{', '.join(value.name for value in inputs)})")
    shapes = {}
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        fixed = [dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None for dim in dims]
        if value.name in given:
            shapes[value.name] = _given_shape(value.name, given[value.name], fixed, batch)
            continue
        seen = data.inputs[value.name].shape if data is not None else None
        shape = []
        for axis, size in enumerate(fixed):
            if size is not None:
                if axis == 0 and batch is not None and batch != size:
                    raise OptionError(f"--batch {batch}: the model's input {value.name!r} has a fixed batch of "
                                      f"{size}; export it with a dynamic batch axis to compile it for another")
                shape.append(size)
            elif axis == 0:
                shape.append(batch or 1)
            else:
                shape.append(int(seen[axis]) if seen is not None else 1)
                if notes is not None:
                    source = f"as in {data.path}" if seen is not None else "with no data to size it"
                    notes.append(f"input {value.name!r} axis {axis} ({dims[axis].dim_param or 'dynamic'}) is "
                                 f"{shape[-1]} in the artifact, {source}; --shape {value.name}=DIMS compiles it "
                                 "for another size")
        shapes[value.name] = shape
    return shapes


def _given_shape(name: str, dims: Sequence[int], fixed: Sequence[int | None], batch: int | None) -> list[int]:
    """An input's --shape, checked against the model's rank and fixed sizes and against --batch."""
    text = f"--shape {name}={'x'.join(map(str, dims))}"
    if len(dims) != len(fixed):
        raise OptionError(f"{text}: the model's input {name!r} has {len(fixed)} axes, not {len(dims)}")
    for axis, (size, want) in enumerate(zip(dims, fixed)):
        if want is not None and size != want:
            raise OptionError(f"{text}: axis {axis} of the model's input {name!r} is fixed at {want}")
    if batch is not None and dims and dims[0] != batch:
        raise OptionError(f"{text} and --batch {batch} disagree on the batch")
    return list(dims)


class PhaseClock:
    """Wall-clock seconds per compile phase, for plan.json: where a slow compile spends its time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._last, 3)
        self._last = now


def _read_model(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, list[Path]]:
    """The checked model, and the files an output must never overwrite (the model and its external data)."""
    if isinstance(model, onnx.ModelProto):
        check_model(model, "the model given")
        return model, []
    path = Path(model)
    loaded, data_files = read_model(path)
    return loaded, [path, *(path.parent / f for f in sorted(data_files))]


@dataclass
class SearchOutcome:
    """The search's chosen plan, plan.json's `search` record, and what the measured pick chooses among."""

    ir: IRModel
    record: dict[str, Any]
    results: dict[str, Any]  # every validated plan by name (`search.search_with_baselines`, less "chosen")
    make_ir: Any  # a plan's pruned IR from its report


def _search(scored: IRModel, profile, costs, request: Request, calib_data: Dataset, eval_data: Dataset,
            finish, notes: list[str]) -> SearchOutcome:
    """The per-layer search and its baselines: the chosen IR and plan.json's `search` record."""
    started = time.perf_counter()
    supported = latency.block_supported(profile)
    # the dense run on the eval data first: bad labels stop the compile before any kernel is timed
    validate = make_validator(scored, eval_data.inputs, eval_data.labels, request.metric, labels_file=eval_data.path)
    kernels_measured = latency.measure_search_kernels(costs, profile, scored.layers(), request.blocks)
    layer_latency = latency.layer_latency(costs)
    model_key = sensitivity_store.model_digest(scored)
    # per-block probes: no consistent gain, 2.7x the runs
    ir, recalled = sensitivity_store.sensitivities(scored, calib_data.inputs, costs.cache, model_key=model_key)
    memo = sensitivity_store.validation_memo(costs.cache, model_key, eval_data.inputs, eval_data.labels, request.metric,
                                             reconstructed_on=calib_data.inputs if finish else None)
    probe = proxy.refit_probe(ir, calib_data.inputs, finish)
    stored_probe = sensitivity_store.stored_probe(costs.cache, model_key, calib_data.inputs, probe.losses) \
        if probe else None
    chosen, results = search.search_with_baselines(ir, layer_latency, validate, request.budget, request.blocks,
                                                   request.sparsities, supported, finish,
                                                   shares=sensitivity_store.cached_shares(costs.cache),
                                                   probe=stored_probe, memo=memo)
    report = results.pop("chosen")
    record = search_record(report, results, request.metric)
    record["chosen_from"] = next(name for name, result in results.items() if result is report)
    if record["chosen_from"] == "dense":
        record["message"] = results["searched"].message or "no pruned plan met the budget: the dense plan is returned"
        notes.append(record["message"])
    record.update(time_s=time.perf_counter() - started, kernels_measured=kernels_measured,
                  layer_probes=probe.runs if probe else 0,
                  sensitivities="recalled from the cache" if recalled else "measured")
    return SearchOutcome(chosen, record, results, lambda report: search.report_ir(ir, report, finish))


@dataclass
class _Written:
    """The pruned model, and pruned.onnx and masks.npz being written beside the artifact's build (`file`
    answers pruned.onnx's path once both are written and checked), then onnxruntime's outputs of that
    file on the gate's inputs (`expected`; None where no gate runs here)."""

    model: onnx.ModelProto
    file: Future[Path]
    expected: Future[list[np.ndarray]] | None

    @property
    def reference(self) -> Callable[[], list[np.ndarray]] | None:
        """`deploy.build_artifact`'s `expected`: waits for the gate's reference (None: the gate runs its own)."""
        return self.expected.result if self.expected else None


def _write_pruned(pruned: IRModel, staging: Path, writer: ThreadPoolExecutor,
                  gate_inputs: dict[str, np.ndarray] | None) -> _Written:
    """pruned.onnx (checked as a file: onnx checks it without a copy in Python) and masks.npz, written by a
    child process (`forked.start_forked`), and the gate's reference, on `writer`'s thread once they are.

    Why not here: the artifact builds meanwhile. For BERT-base that is ~4 s of writing (on a thread it
    still held the GIL for half of that, and slowed the build by ~2 s) and ~1 s of onnxruntime (which
    cannot run in a forked child)."""
    from pruneaug.forked import start_forked
    from pruneaug.gate import onnxruntime_outputs

    pruned_model = lower(pruned)
    masks = _stored_masks(pruned)
    path = staging / "pruned.onnx"

    def write() -> None:
        save_model(pruned_model, path)
        check_model(path, "pruned.onnx")
        write_masks(staging / "masks.npz", masks)

    written = start_forked(write)
    file = writer.submit(lambda: written() or path)
    expected = None if gate_inputs is None else writer.submit(lambda: onnxruntime_outputs(file.result(), gate_inputs))
    return _Written(pruned_model, file, expected)


def _measured_pick(outcome: SearchOutcome | None, chosen: IRModel, written: _Written, profile, costs,
                   shapes: dict[str, list[int]], inputs: dict[str, np.ndarray], metric: str, staging: Path,
                   notes: list[str]) -> Pick | CodegenError:
    """`pick.measured_pick` of the artifact that ships, among the search's near-equal validated plans
    (`outcome`; None: the plan was given) and their parallel and serial builds; `chosen` is the search's
    plan, `written` as `_write_pruned` writes it. The builds go to a folder of `staging` that is gone
    again when this returns; the kept one is moved to its place in `staging`. Updates the search record
    (to the picked plan's figures where it changed). Returns the pick, or the error of the chosen plan's
    own build."""
    import shutil

    from pruneaug import deploy, pick
    from pruneaug.codegen.export import move_artifact

    def build(ir: IRModel, build_profile, stem: Path) -> Path:
        # the chosen plan is lowered already, and its gate's reference computed beside the build; another
        # runs its dense layers in the chosen plan's dense kernels (`latency.annotate`)
        if ir is chosen:
            model, expected, kernels = written.model, written.reference, deploy.sparse_weights(ir)
        else:
            model, expected, kernels = lower(ir), None, deploy.sparse_weights(latency.annotate(ir, costs))
        return deploy.plan_builder(model, kernels, shapes, inputs, expected)(build_profile, stem)

    record = outcome.record if outcome else None
    builds = staging / "builds"
    builds.mkdir()
    try:
        with deploy.quiet_native_stderr():
            picked = pick.measured_pick(record["chosen_from"] if record else "given", chosen,
                                        outcome.results if outcome else None, outcome.make_ir if outcome else None,
                                        build, profile, pick.side_by_side(inputs), builds)
        picked.artifact = move_artifact(picked.artifact, staging / f"model.{profile.kind}")
    except CodegenError as err:  # the chosen plan's own build failed: the artifact step reports it
        if record is not None:
            record["measured_pick"] = {"skipped": f"no artifact: {err}"}
        return err
    finally:
        shutil.rmtree(builds, ignore_errors=True)  # the builds not kept
    if record is None:
        return picked
    if picked.name != record["chosen_from"]:
        medians = {name: f[f["counted"]]["median_s"] for name, f in picked.plans["contenders"].items() if f["counted"]}
        predicted = record["chosen_from"]
        notes.append(f"measured pick: {picked.name} ran {medians[predicted] / medians[picked.name]:.2f}x as fast "
                     f"(median) as the search's predicted choice ({predicted}) and is kept" if predicted in medians
                     else f"measured pick: {picked.name} is kept (the search's predicted choice, {predicted}, "
                          f"could not be timed)")
        kept = {key: record[key] for key in ("time_s", "kernels_measured", "sensitivities")}
        record = outcome.record = search_record(outcome.results[picked.name], outcome.results, metric)
        record.update(kept, chosen_from=picked.name)
    record["measured_pick"] = picked.plans
    return picked


def _build_artifact(pruned: IRModel, written: _Written, dense_model: onnx.ModelProto | Path, profile,
                    shapes: dict[str, list[int]], inputs: dict[str, np.ndarray], staging: Path, extra: dict[str, Any],
                    notes: list[str], phases: "PhaseClock", picked: Pick | CodegenError | None) -> str | None:
    """The artifact: the measured pick's (`picked`, or the error of its build) where it ran, else compiled,
    checked and exported here; then, where it runs here, the whole model timed. A model TVM cannot
    compile leaves the other outputs whole. `written`: pruned.onnx and the gate's reference as
    `_write_pruned` writes them."""
    from pruneaug import deploy

    try:
        if isinstance(picked, CodegenError):
            raise picked
        if picked is None:
            with deploy.quiet_native_stderr():
                artifact = deploy.plan_builder(written.model, deploy.sparse_weights(pruned), shapes, inputs,
                                               written.reference)(profile, staging / f"model.{profile.kind}")
        else:
            artifact = picked.artifact
            extra["threading"] = picked.threading
    except CodegenError as err:
        extra["artifact_error"] = str(err)
        notes.append(f"no compiled artifact: {err}")
        return None
    finally:
        phases.lap("artifact")
    if not deploy.runs_here(profile):  # the gate needs the target: say so, and how to run it there
        extra["artifact_unchecked"] = (f"{artifact.name} is not checked against onnxruntime: {profile.name} does not run "
                                       "on this machine; copy the output folder there and run "
                                       "`python tools/check_artifact.py OUT --calib CALIB.npz`")
        notes.append(extra["artifact_unchecked"])
    else:  # timed where it runs: a CUDA artifact on this GPU, onnxruntime's CPU figures for reference only
        deploy.release_freed_memory()  # before the workers load their models
        # the dense model's own file (when it has one) and the pruned.onnx just written: nothing saved again
        extra["model_latency"] = deploy.measure_model_latency(dense_model, written.file.result(), artifact, inputs,
                                                              device=device_for(profile.kind))
        phases.lap("whole-model timing")
        for competitor, error in extra["model_latency"].get("errors", {}).items():
            notes.append(f"whole-model timing of {competitor} failed: {error}")
    return artifact.name


def _stored_masks(ir: IRModel) -> dict[str, np.ndarray]:
    masks = {}
    for node in ir.prunable_nodes():
        layer = ir.layer(node)
        masks[layer.weight] = layer.layout.from_canonical(ir.graph.nodes[node]["mask"])
    return masks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pruneaug.compile",
        description="Prune an ONNX model into block-sparse layers for a target; write the plan, the pruned model, "
                    "the compiled artifact and a report.",
    )
    parser.add_argument("model", help="the ONNX model file (never modified)")
    parser.add_argument("--target", default="x86", help="x86 (this host), arm64[:PROFILE], cuda[:sm_80|sm_90]")
    parser.add_argument("--out", default="out", help="output folder (default: out)")
    parser.add_argument("--calib", help=".npz of calibration inputs keyed by the model's input names")
    parser.add_argument("--eval", help=".npz of evaluation inputs (and 'labels') the search validates on")
    parser.add_argument("--budget", help=f"largest metric loss the pruned model may have (default {opt.DEFAULT_BUDGET})")
    parser.add_argument("--metric", help=f"{', '.join(opt.METRICS)} (default {opt.METRICS[0]}): top1 (accuracy drop), "
                                         "cosine (1 - similarity), relerr")
    parser.add_argument("--blocks", default=opt.DEFAULT_BLOCKS, help=f"block shapes to consider ({opt.DEFAULT_BLOCKS})")
    parser.add_argument("--sparsities", default=opt.DEFAULT_SPARSITIES,
                        help=f"sparsity grid: sparsities and START:STOP:STEP ranges, comma-separated "
                             f"({opt.DEFAULT_SPARSITIES})")
    parser.add_argument("--pruner", default="magnitude", help="importance: magnitude or activation (needs --calib)")
    parser.add_argument("--reconstruct", action="store_true",
                        help="re-fit the kept weights by least squares on the calibration activations")
    parser.add_argument("--measure", help="kernel latencies: local (default for x86, and for cuda on a machine with a "
                                          "GPU), none (predict only; default for arm64, and for cuda without a GPU), "
                                          "rpc://HOST:PORT/KEY (a device behind a TVM RPC tracker)")
    parser.add_argument("--batch", type=int, help="batch size the artifact is compiled for (default 1, or the "
                                                   "model's own fixed batch)")
    parser.add_argument("--shape", action="append", metavar="NAME=DIMS",
                        help="an input's full shape for the artifact, e.g. input=1x128x768 (repeat per input; "
                             "default: --batch on axis 0, the calibration data's sizes on other dynamic axes)")
    parser.add_argument("--block", help="fixed plan: this block shape ROWSxCOLS for every prunable layer")
    parser.add_argument("--sparsity", help="fixed plan: this share of blocks removed in every layer, in [0, 1)")
    parser.add_argument("--keep-sparsity", action="store_true",
                        help="read each layer's block structure off the model's zeros; prune nothing more")
    parser.add_argument("--no-artifact", action="store_true", help="skip the TVM compile (plan and pruned model only)")
    return parser


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as for every other bad input
        raise _ArgumentError(message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.__class__ = _Parser
    caught: list[warnings.WarningMessage] = []
    try:
        args = parser.parse_args(argv)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = compile_model(
                args.model, target=args.target, out=args.out, block=args.block, sparsity=args.sparsity,
                pruner=args.pruner, calib=args.calib, eval=args.eval, budget=args.budget, metric=args.metric,
                blocks=args.blocks, sparsities=args.sparsities, reconstruct=args.reconstruct, measure=args.measure,
                keep_sparsity=args.keep_sparsity, batch=args.batch, artifact=not args.no_artifact,
                shapes=args.shape,
            )
    except (PruneaugError, _ArgumentError) as err:
        _print_warnings(_own_warnings(caught))
        print(f"pruneaug: error: {err}", file=sys.stderr)
        return 2
    _print_warnings([*result.warnings, *(w for w in _own_warnings(caught) if w not in result.warnings)])
    totals = result.plan["totals"]
    written = [name for name in OUTPUT_FILES if (result.out_dir / name).is_file()]
    written += [result.artifact.name] if result.artifact else []
    print(f"pruned {totals['pruned_layers']} of {totals['prunable_layers']} prunable layers to "
          f"{totals['weight_sparsity']:.1%} weight sparsity for "
          f"{result.plan['target']}; wrote {', '.join(written)} to {result.out_dir}")
    return 0


def _own_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The messages of the warnings pruneaug itself raised (a noisy machine, a cache set aside, a device
    lost), each once: the libraries' own (deprecations and the like) say nothing to the user."""
    package = Path(__file__).resolve().parent
    own = [str(w.message) for w in caught if Path(w.filename).resolve().is_relative_to(package)]
    return list(dict.fromkeys(own))


def _print_warnings(messages: list[str]) -> None:
    for message in messages:
        print(f"pruneaug: warning: {message}", file=sys.stderr)


class _CallableModule(types.ModuleType):
    """Lets `pruneaug.compile(...)` call the compile while `python -m pruneaug.compile` stays the CLI."""

    def __call__(self, *args, **kwargs) -> CompileResult:
        return compile_model(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    from pruneaug.runtime import skip_unused_torch

    skip_unused_torch()
    sys.exit(main())
