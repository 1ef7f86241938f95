"""Running a model in onnxruntime over a data set, in batches, with chosen intermediate tensors as outputs.

Importance, sensitivity and validation all need "run these inputs, give me these tensors";
this is the one place that knows how to ask onnxruntime for it.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from pruneaug.calib import fixed_batch, graph_inputs
from pruneaug.ir.onnx_io import PROTOBUF_LIMIT_BYTES, tensor_bytes


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str], elem_type: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs are `tensors` (intermediates included), in that order."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    existing = {v.name: v for v in model.graph.output}
    del result.graph.output[:]
    for name in tensors:
        value = existing.get(name) or onnx.helper.make_tensor_value_info(name, elem_type, None)
        result.graph.output.append(value)
    return result


def make_session(model: onnx.ModelProto | os.PathLike, threads: int | None = None,
                 spinning: bool = True) -> ort.InferenceSession:
    """A CPU session of a model in memory or of a file; `spinning=False` lets its intra-op threads sleep
    between runs instead of busy-waiting.

    Timing next to another runtime needs spinning off: spinning threads take the cores the other one needs.
    A file (one already checked) is handed to onnxruntime as it is: loading BERT-base into a proto and
    serialising it again took 4.7 s of CPU, reading the file 0.5 s.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(os.fspath(model), options, providers=["CPUExecutionProvider"])
    assert tensor_bytes(model) < PROTOBUF_LIMIT_BYTES, "models over 2 GB need a file-backed session"
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def chunk_rows(model: onnx.ModelProto, batch_size: int) -> int | None:
    """Rows of the data set per onnxruntime run of `model`: its fixed batch B where every input's first
    dimension is that static B (`calib.fixed_batch`: the data holds a multiple of B, and onnxruntime takes
    exactly B), `batch_size` where every input's first dimension is dynamic, else None (the whole set in
    one run: the inputs' first axes are not one batch axis).

    Importance, reconstruction, sensitivity probes and validation all slice through `batches`, so this is
    the one place that decides it.
    """
    fixed = fixed_batch(model)
    if fixed is not None:
        return fixed
    dynamic = all(v.type.tensor_type.shape.dim and not v.type.tensor_type.shape.dim[0].HasField("dim_value")
                  for v in graph_inputs(model))
    return batch_size if dynamic else None


def batches(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Slices of `inputs` along axis 0 of `chunk_rows(model, batch_size)` rows each; the whole set at once
    where that is None or the set is no larger."""
    rows = chunk_rows(model, batch_size)
    total = len(next(iter(inputs.values())))
    if rows is None or total <= rows:
        yield dict(inputs)
        return
    assert total % rows == 0 or fixed_batch(model) is None, \
        f"{total} rows are no multiple of the model's fixed batch {rows}: calib.load_dataset checks the data"
    for start in range(0, total, rows):
        yield {name: array[start:start + rows] for name, array in inputs.items()}


def run(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], batch_size: int = 256) -> list[np.ndarray]:
    """The model's outputs on the whole data set, batches concatenated along axis 0."""
    session = make_session(model)
    parts = [session.run(None, batch) for batch in batches(model, inputs, batch_size)]
    return [np.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(len(parts[0]))]


def weights_as_inputs(model: onnx.ModelProto, weights: set[str]) -> dict[str, np.ndarray]:
    """Turn the named initializers of `model` (changed in place) into graph inputs; return their values.

    One onnxruntime session then serves every probe and every validation: building a session per
    candidate (serialising and optimising the whole model) costs more than the run itself on large models.
    The weights leave the graph instead of staying as overridable defaults: the session of BERT-base
    then builds from a few hundred KB, not from 340 MB serialised again (3.4 s).
    """
    declared = {v.name for v in model.graph.input}
    kept, values = [], {}
    for tensor in model.graph.initializer:
        if tensor.name not in weights:
            kept.append(tensor)
            continue
        values[tensor.name] = numpy_helper.to_array(tensor)
        if tensor.name not in declared:
            model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return values


class WeightFedRunner:
    """One session of a model whose named weights each run may replace: run(feeds) -> outputs over the whole data set."""

    def __init__(self, model: onnx.ModelProto, weights: set[str], inputs: Mapping[str, np.ndarray], batch_size: int):
        self.batches = list(batches(model, inputs, batch_size))  # while the weights are still initializers
        self.weights = weights_as_inputs(model, weights)  # the dense values, fed where a run replaces none
        self.session = make_session(model)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        parts = [self.session.run(None, {**batch, **self.weights, **feeds}) for batch in self.batches]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
