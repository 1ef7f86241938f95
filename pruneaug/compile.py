"""The CLI and the Python entry point: parse, then wire the passes together. No pruning logic lives here.

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
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pruneaug import options as opt
from pruneaug.artifacts import OutputFolder, write_json, write_masks
from pruneaug.calib import Dataset, load_dataset
from pruneaug.cost_model.targets import resolve_target
from pruneaug.errors import OptionError, PruneaugError
from pruneaug.ir.graph import IRModel, lift, lower
from pruneaug.ir.layer import BlockSpec
from pruneaug.ir.onnx_io import check_model, external_data_files, load_model, save_model
from pruneaug.passes import blockmask, importance
from pruneaug.plan import build_plan

OUTPUT_FILES = ("pruned.onnx", "masks.npz", "plan.json")


@dataclass
class CompileResult:
    """What a compile produced: the plan, and where each artifact was written."""

    plan: dict[str, Any]
    out_dir: Path
    pruned_model: Path
    masks: Path
    plan_file: Path
    artifact: Path | None = None
    warnings: list[str] = field(default_factory=list)


def compile_model(
    model: str | os.PathLike | onnx.ModelProto,
    target: str = "x86",
    out: str | os.PathLike = "out",
    block: str | None = None,
    sparsity: float | str | None = None,
    pruner: str = "magnitude",
    calib: str | os.PathLike | None = None,
    keep_sparsity: bool = False,
    blocks: str = opt.DEFAULT_BLOCKS,
) -> CompileResult:
    """Prune `model` for `target` and write pruned.onnx, masks.npz and plan.json into `out`.

    With `block` and `sparsity` every prunable layer gets that block shape and sparsity; with
    `keep_sparsity` each layer's structure is read off its zeros (the largest shape of `blocks` they
    form) and nothing more is pruned.
    """
    spec = _fixed_plan(block, sparsity, keep_sparsity)
    candidates = opt.parse_blocks(blocks)
    opt.check_choice("--pruner", pruner, opt.PRUNERS)
    profile = resolve_target(target)
    source, protected = _read_model(model)
    folder = OutputFolder(out, protected)
    folder.check(OUTPUT_FILES)
    calib_data = load_dataset(calib, source, "--calib") if calib is not None else None
    if pruner == "activation" and calib_data is None:
        raise OptionError("--pruner activation needs --calib FILE.npz (the inputs to measure activations on)")

    ir = lift(source, calib_data.shapes if calib_data else None)
    notes = []
    if not ir.prunable_nodes():
        notes.append("the model has no prunable MatMul/Gemm/Conv node: nothing was pruned")
        warnings.warn(notes[-1], stacklevel=2)
    if keep_sparsity:
        pruned = blockmask.apply_masks(blockmask.detect_blocks(importance.from_zeros(ir), candidates))
    else:
        scored = _score(ir, pruner, calib_data)
        pruned = blockmask.apply_masks(blockmask.assign_blocks(scored, {n: spec for n in ir.prunable_nodes()}))

    plan = build_plan(pruned, profile.name, {"pruner": "keep-sparsity" if keep_sparsity else pruner})
    with folder as staging:
        pruned_model = lower(pruned)
        check_model(pruned_model, "pruned.onnx")
        save_model(pruned_model, staging / "pruned.onnx")
        write_masks(staging / "masks.npz", _stored_masks(pruned))
        write_json(staging / "plan.json", plan)
    out_dir = Path(out)
    return CompileResult(plan, out_dir, out_dir / "pruned.onnx", out_dir / "masks.npz", out_dir / "plan.json",
                         warnings=notes)


def _fixed_plan(block: str | None, sparsity: float | str | None, keep_sparsity: bool) -> BlockSpec | None:
    if keep_sparsity:
        if block is not None or sparsity is not None:
            raise OptionError("--keep-sparsity reads the plan off the model's zeros: drop --block and --sparsity")
        return None
    if block is None or sparsity is None:
        raise OptionError("give both --block RxC and --sparsity S (or --keep-sparsity); "
                          "the per-layer search is not available yet")
    return BlockSpec.parse(block, opt.parse_sparsity(sparsity))


def _read_model(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, list[Path]]:
    """The checked model, and the files an output must never overwrite (the model and its external data)."""
    if isinstance(model, onnx.ModelProto):
        check_model(model, "the model given")
        return model, []
    path = Path(model)
    loaded = load_model(path)
    raw = onnx.load(str(path), load_external_data=False)
    return loaded, [path, *(path.parent / f for f in external_data_files(raw))]


def _score(ir: IRModel, pruner: str, calib: Dataset | None) -> IRModel:
    if pruner == "activation":
        assert calib is not None
        return importance.activation(ir, calib.inputs)
    return importance.magnitude(ir)


def _stored_masks(ir: IRModel) -> dict[str, np.ndarray]:
    masks = {}
    for node in ir.prunable_nodes():
        layer = ir.layer(node)
        masks[layer.weight] = layer.layout.from_canonical(ir.graph.nodes[node]["mask"])
    return masks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pruneaug.compile",
        description="Prune an ONNX model into block-sparse layers for a target and write the plan and artifacts.",
    )
    parser.add_argument("model", help="the ONNX model file (never modified)")
    parser.add_argument("--target", default="x86", help="x86 (this host), arm64[:PROFILE], cuda[:sm_80|sm_90]")
    parser.add_argument("--out", default="out", help="output folder (default: out)")
    parser.add_argument("--block", help="fixed plan: this block shape ROWSxCOLS for every prunable layer")
    parser.add_argument("--sparsity", help="fixed plan: this share of blocks removed in every layer, in [0, 1)")
    parser.add_argument("--keep-sparsity", action="store_true",
                        help="read each layer's block structure off the model's zeros; prune nothing more")
    parser.add_argument("--blocks", default=opt.DEFAULT_BLOCKS,
                        help=f"block shapes to consider (default {opt.DEFAULT_BLOCKS})")
    parser.add_argument("--pruner", default="magnitude", help="importance: magnitude or activation (needs --calib)")
    parser.add_argument("--calib", help=".npz of calibration inputs keyed by the model's input names")
    return parser


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as for every other bad input
        raise _ArgumentError(message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.__class__ = _Parser
    try:
        args = parser.parse_args(argv)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = compile_model(
                args.model, target=args.target, out=args.out, block=args.block, sparsity=args.sparsity,
                pruner=args.pruner, calib=args.calib, keep_sparsity=args.keep_sparsity, blocks=args.blocks,
            )
    except (PruneaugError, _ArgumentError) as err:
        print(f"pruneaug: error: {err}", file=sys.stderr)
        return 2
    for note in result.warnings:
        print(f"pruneaug: warning: {note}", file=sys.stderr)
    totals = result.plan["totals"]
    print(f"pruned {totals['prunable_layers']} layers to {totals['weight_sparsity']:.1%} weight sparsity "
          f"for {result.plan['target']}; wrote {', '.join(OUTPUT_FILES)} to {result.out_dir}")
    return 0


class _CallableModule(types.ModuleType):
    """Lets `pruneaug.compile(...)` call the compile while `python -m pruneaug.compile` stays the CLI."""

    def __call__(self, *args, **kwargs) -> CompileResult:
        return compile_model(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
