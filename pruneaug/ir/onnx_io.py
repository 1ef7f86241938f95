"""Reading a user's ONNX file and writing ONNX files: every failure becomes a `ModelError` naming the file.

The input is only ever read: nothing here writes next to it. Writing goes through a temporary file
and a rename, so a crash never leaves half a model behind.
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from pruneaug.errors import ModelError

# protobuf cannot serialise a message over 2 GiB; past this, weights go to an external data file.
PROTOBUF_LIMIT_BYTES = 1_800_000_000
# onnx's checker as imported: while TVM's frontend imports a model, `relax_build` has `onnx.checker.check_model`
# do nothing, and pruned.onnx is checked on another thread meanwhile (`compile._write_pruned`)
_ONNX_CHECK_MODEL = onnx.checker.check_model


def external_data_files(model: onnx.ModelProto) -> set[str]:
    """The relative paths of the external data files a model (loaded without its data) refers to."""
    files = set()
    for tensor in _all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            files.add(info.location)
    return files


def _all_tensors(model: onnx.ModelProto):
    """Initializers and attribute tensors of the graph and of every subgraph (If/Loop/Scan bodies)."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check a model file, its external data included; raise ModelError for any bad input."""
    return read_model(path)[0]


def read_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, set[str]]:
    """`load_model`, and the relative paths of the external data files the model was read from (once
    loaded, its tensors no longer say: parsing a 340 MB file again to list them cost ~0.5-1 s)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if not path.is_file():
        raise ModelError(f"{path}: not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, TypeError) as err:
        raise ModelError(f"{path}: not a readable ONNX model (truncated or another format): {_first_line(err)}") from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path}: not an ONNX model (no graph in the file)")
    data_files = external_data_files(model)
    for location in sorted(data_files):
        data_path = path.parent / location
        if not data_path.is_file():
            raise ModelError(f"{path}: external data file {location!r} not found (looked in {path.parent})")
    check_model(path, str(path))
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot read its external data: {_first_line(err)}") from None
    _check_finite_weights(model, str(path))
    return model, data_files


def check_model(model: onnx.ModelProto | str | os.PathLike, where: str) -> None:
    """onnx.checker on a model in memory or on its file, with the first line of its complaint, naming `where`.

    Prefer the file: onnx's C++ side reads it, with no 2 GB limit and no serialising in Python (BERT-base
    in memory: 2.4 s with the size check; its file: 1.1 s, or 5 ms with the weights in an external file)."""
    try:
        if not isinstance(model, onnx.ModelProto):
            _ONNX_CHECK_MODEL(os.fspath(model))
            return
        if tensor_bytes(model) > PROTOBUF_LIMIT_BYTES:
            return  # the in-memory checker cannot take it; onnxruntime validates the graph later
        _ONNX_CHECK_MODEL(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as err:
        raise ModelError(f"{where}: fails onnx.checker: {_first_line(err)}") from None


def _check_finite_weights(model: onnx.ModelProto, where: str) -> None:
    for tensor in model.graph.initializer:
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            continue
        array = numpy_helper.to_array(tensor)
        if not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise ModelError(f"{where}: initializer {tensor.name!r} has {bad} NaN or Inf values")


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write a model atomically; weights go to `<name>.data` beside it when the model is too big for protobuf.

    `model` is left as it is (onnx's external-data writer empties the tensors it moves out, so it gets
    a copy), and its size is estimated from the tensors' shapes: protobuf's `ByteSize` walks the
    whole message (1 s for BERT-base, as long as serialising it)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if tensor_bytes(model) > PROTOBUF_LIMIT_BYTES:
            onnx.save_model(copy.deepcopy(model), tmp_name, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data", size_threshold=1024)
        else:
            onnx.save_model(model, tmp_name)
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes it 0600; a saved model reads like any file written
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it: set it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tensor_bytes(model: onnx.ModelProto) -> int:
    """The bytes the model's tensors hold, from their shapes and types (string tensors count their strings;
    a type onnx does not know counts nothing: the checker is what says so)."""
    total = 0
    for tensor in _all_tensors(model):
        if tensor.data_type == onnx.TensorProto.STRING:
            total += sum(len(s) for s in tensor.string_data)
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except KeyError:
            continue
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
