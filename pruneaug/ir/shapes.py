"""ONNX shape inference at fixed input shapes, the model's weights left out of it."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

SHAPE_TENSOR_MAX_ELEMENTS = 64  # initializers inference reads the values of (shapes, axes); larger ones: dims only


def static_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Every tensor's static shape from ONNX shape inference with the inputs' dynamic dims fixed (empty where
    inference fails: the layers' sizes are then unknown, not wrong). Shape computations are not folded here
    (`shape_folding.inferred_shapes` folds them first): a tensor whose shape one of them decides has none."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.initializer[:]  # weights' shapes suffice; small tensors (Reshape shapes...) keep their data
    for tensor in model.graph.initializer:
        if np.prod(tensor.dims) <= SHAPE_TENSOR_MAX_ELEMENTS:
            fixed.graph.initializer.append(tensor)
            continue
        stub = fixed.graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
    _fix_input_dims(fixed.graph, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        return {}
    shapes = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def _fix_input_dims(graph: onnx.GraphProto, input_shapes: Mapping[str, Sequence[int]]) -> None:
    for value in graph.input:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        given = input_shapes.get(value.name)
        for axis, dim in enumerate(tensor_type.shape.dim):
            if given is not None and axis < len(given):
                dim.Clear()
                dim.dim_value = int(given[axis])
            elif not dim.HasField("dim_value") or dim.dim_value <= 0:
                dim.Clear()
                dim.dim_value = 1
