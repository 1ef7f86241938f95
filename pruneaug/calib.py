"""Calibration and evaluation data: `.npz` files of model inputs (and `labels`), checked against the model.

Loaded with allow_pickle=False: a file that needs pickle could run code, so it is refused.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from pruneaug.errors import CalibrationError
from pruneaug.ir.shape_folding import inferred_shapes

LABELS_KEY = "labels"


@dataclass(frozen=True)
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    path: str

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: array.shape for name, array in self.inputs.items()}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds: graph inputs that are not initializers."""
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def load_dataset(path: str | os.PathLike, model: onnx.ModelProto, option: str = "--calib") -> Dataset:
    """Read an .npz of inputs keyed by the model's input names; any mismatch is a CalibrationError naming it."""
    path = Path(path)
    where = f"{option} {path}"
    if not path.is_file():
        raise CalibrationError(f"{where}: no such file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise CalibrationError(f"{where}: holds object arrays that need pickle; save plain numeric arrays") from None
        raise CalibrationError(f"{where}: not a readable .npz file: {err}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise CalibrationError(f"{where}: not a readable .npz file: {err}") from None
    labels = arrays.pop(LABELS_KEY, None)
    inputs = graph_inputs(model)
    expected = {v.name for v in inputs}
    missing, extra = sorted(expected - arrays.keys()), sorted(arrays.keys() - expected)
    if missing:
        raise CalibrationError(f"{where}: no array for model input(s) {', '.join(missing)} (has {', '.join(sorted(arrays)) or 'none'})")
    if extra:
        raise CalibrationError(f"{where}: array(s) {', '.join(extra)} match no model input (inputs: {', '.join(sorted(expected))})")
    fixed = fixed_batch(model)
    batch = None
    for value in inputs:
        array = arrays[value.name]
        _check_input(where, value, array, fixed)
        batch = batch if batch is not None else array.shape[0] if array.ndim else None
        if fixed is not None and array.shape[0] != batch:  # (each a multiple of the fixed batch: _check_input)
            raise CalibrationError(f"{where}: input {value.name!r} has {array.shape[0]} rows on axis 0, "
                                   f"input {inputs[0].name!r} {batch}: every input needs as many")
    if labels is not None and batch is not None and labels.shape[:1] != (batch,):
        raise CalibrationError(f"{where}: 'labels' has {labels.shape[0] if labels.ndim else 0} rows, inputs have {batch}")
    return Dataset(arrays, labels, str(path))


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """B where every input's first dimension is the same static B, and so is every output's that declares a
    shape (a model exported without a dynamic batch axis: torch.onnx.export's default), else None.

    Such a model takes any multiple of B samples, run in chunks of B (`ort_run.batches`) whose outputs are
    concatenated, so data need not hold exactly B. Where the first axes differ (inputs of different static
    sizes, or an output whose first axis is another size: an input fed transposed, [features, batch]) axis 0
    is no batch axis and no chunking could serve it: the data needs exactly the inputs' shapes. An output the
    exporter left a symbolic first axis (Swin-T's logits: torch could not follow its shape computations) has
    the one shape inference finds at the inputs' static dims, its shape computations folded.
    """
    firsts = set()
    for value in graph_inputs(model):
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value <= 0:
            return None
        firsts.add(dims[0].dim_value)
    if not firsts:
        return None
    inferred: dict[str, list[int]] | None = None
    for value in model.graph.output:
        if value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                firsts.add(dims[0].dim_value)
                continue
            if inferred is None:
                inferred = inferred_shapes(model, {})  # the inputs' static dims, their dynamic ones at 1
            firsts.add((inferred.get(value.name) or [0])[0])
    return firsts.pop() if len(firsts) == 1 else None


def _check_input(where: str, value: onnx.ValueInfoProto, array: np.ndarray, fixed: int | None = None) -> None:
    """The array's type and shape against the model input's; with a `fixed` batch (`fixed_batch`), axis 0 may
    hold any positive multiple of it."""
    tensor_type = value.type.tensor_type
    want_dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    if array.dtype != want_dtype:
        raise CalibrationError(f"{where}: input {value.name!r} is {array.dtype}, the model wants {want_dtype}")
    if not tensor_type.HasField("shape"):
        return
    dims = tensor_type.shape.dim
    if array.ndim != len(dims):
        raise CalibrationError(f"{where}: input {value.name!r} has shape {array.shape}, the model wants rank {len(dims)}")
    if fixed is not None and (array.shape[0] == 0 or array.shape[0] % fixed):
        raise CalibrationError(f"{where}: input {value.name!r} has {array.shape[0]} rows on axis 0; the model has a "
                               f"fixed batch of {fixed}, so axis 0 must be a positive multiple of {fixed} (or export "
                               f"the model with a dynamic batch axis)")
    for axis, dim in enumerate(dims):
        if fixed is not None and axis == 0:
            continue
        if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != array.shape[axis]:
            want = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
            raise CalibrationError(f"{where}: input {value.name!r} has shape {array.shape}, the model wants {want}")
    if array.size == 0:
        raise CalibrationError(f"{where}: input {value.name!r} is empty")
