"""Trains and exports the two bundled example models on scikit-learn's digits (8x8 images, 10 classes).

    python tools/make_examples.py            # writes examples/{mlp,cnn}/{model.onnx,calib.npz,eval.npz}

Needs torch (the ``train`` extra); nothing else in pruneaug does. Training is seeded and runs on one
thread with deterministic algorithms, the ONNX graphs are written with onnx.helper from the trained
weights (so they hold exactly the ops named below, weights as initializers, nothing from training),
and the .npz archives carry fixed timestamps: a rerun on the same machine and torch build writes the
same bytes. The script checks onnxruntime against torch and prints each model's test accuracy.

- ``mlp``: input ``input`` float32 [batch, 64] -> MatMul+Add 256, Relu, Gemm(transB=1) 256, Relu,
  Gemm(transB=0) 10 -> ``logits``.
- ``cnn``: input ``input`` float32 [batch, 1, 8, 8] -> Conv 1x1 32, Relu, Conv 3x3 64, Relu,
  depthwise Conv 3x3 64, Relu, Conv 3x3 stride 2 64, Relu, Flatten, Gemm 128, Relu, Gemm 10 -> ``logits``.

Pixels are scaled to [0, 1] (digits' 0..16 divided by 16).
"""

from __future__ import annotations

import argparse
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
OPSET = 17
INPUT, OUTPUT, BATCH = "input", "logits", "batch"
CALIB_SAMPLES = 256
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def mlp() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(64, 256), relu1=nn.ReLU(),
        fc2=nn.Linear(256, 256), relu2=nn.ReLU(),
        fc3=nn.Linear(256, 10),
    ))


def cnn() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        pointwise=nn.Conv2d(1, 32, 1), relu1=nn.ReLU(),
        conv1=nn.Conv2d(32, 64, 3, padding=1), relu2=nn.ReLU(),
        depthwise=nn.Conv2d(64, 64, 3, padding=1, groups=64), relu3=nn.ReLU(),
        conv2=nn.Conv2d(64, 64, 3, stride=2, padding=1), relu4=nn.ReLU(),
        flatten=nn.Flatten(),
        fc1=nn.Linear(64 * 4 * 4, 128), relu5=nn.ReLU(),
        fc2=nn.Linear(128, 10),
    ))


class Example(NamedTuple):
    build: Callable[[], nn.Sequential]
    input_shape: list[int | str]
    epochs: int
    # How each nn.Linear is written: "matmul" (MatMul+Add), "gemm_transB" or "gemm" (transB=0).
    linear_layout: dict[str, str]


EXAMPLES_SPEC = {
    "mlp": Example(mlp, [BATCH, 64], 40, {"fc1": "matmul", "fc2": "gemm_transB", "fc3": "gemm"}),
    "cnn": Example(cnn, [BATCH, 1, 8, 8], 30, {"fc1": "gemm_transB", "fc2": "gemm_transB"}),
}


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 80/20 split of digits, pixels in [0, 1]: (x_train, x_test, y_train, y_test)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=SEED)


def train(model: nn.Sequential, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Sequential:
    """Adam with cosine decay on shuffled mini-batches of 32, every random draw from seeded generators."""
    generator = torch.Generator().manual_seed(SEED)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x_t), generator=generator).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_t[batch]), y_t[batch]).backward()
            optimizer.step()
        schedule.step()
    return model.eval()


def to_onnx(name: str, model: nn.Sequential) -> onnx.ModelProto:
    """Writes the trained ``model`` layer by layer as ONNX nodes with its weights as initializers."""
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    tensor = INPUT

    def weight(array: torch.Tensor, tensor_name: str) -> str:
        initializers.append(numpy_helper.from_array(array.detach().numpy().astype(np.float32), tensor_name))
        return tensor_name

    def node(op_type: str, inputs: list[str], node_name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op_type, inputs, [node_name], name=node_name, **attrs))
        return node_name

    layers = list(model.named_children())
    for index, (layer_name, layer) in enumerate(layers):
        if isinstance(layer, nn.Linear):
            layout = EXAMPLES_SPEC[name].linear_layout[layer_name]
            bias = weight(layer.bias, f"{layer_name}.bias")
            if layout == "matmul":
                w = weight(layer.weight.T, f"{layer_name}.weight")
                product = node("MatMul", [tensor, w], f"{layer_name}/MatMul")
                tensor = node("Add", [product, bias], f"{layer_name}/Add")
            else:
                transposed = layout == "gemm_transB"
                w = weight(layer.weight if transposed else layer.weight.T, f"{layer_name}.weight")
                tensor = node("Gemm", [tensor, w, bias], f"{layer_name}/Gemm", transB=int(transposed))
        elif isinstance(layer, nn.Conv2d):
            inputs = [tensor, weight(layer.weight, f"{layer_name}.weight"), weight(layer.bias, f"{layer_name}.bias")]
            pad_h, pad_w = layer.padding
            tensor = node("Conv", inputs, f"{layer_name}/Conv", kernel_shape=list(layer.kernel_size),
                          strides=list(layer.stride), pads=[pad_h, pad_w, pad_h, pad_w],
                          dilations=list(layer.dilation), group=layer.groups)
        elif isinstance(layer, nn.ReLU):
            tensor = node("Relu", [tensor], f"{layer_name}/Relu")
        elif isinstance(layer, nn.Flatten):
            tensor = node("Flatten", [tensor], f"{layer_name}/Flatten", axis=1)
        else:
            raise TypeError(f"{name}.{layer_name}: no ONNX export for {type(layer).__name__}")
        if index == len(layers) - 1:
            nodes[-1].output[0] = OUTPUT
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, EXAMPLES_SPEC[name].input_shape)],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [BATCH, 10])], initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    onnx_model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets),
                                   producer_name="pruneaug tools/make_examples.py")
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed member timestamps, so that reruns write identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def make(name: str, out: Path) -> float:
    """Trains, exports and checks one example; returns its test accuracy in onnxruntime."""
    x_train, x_test, y_train, y_test = load_data()
    spec = EXAMPLES_SPEC[name]
    shape = [-1 if d == BATCH else d for d in spec.input_shape]
    x_train, x_test = x_train.reshape(shape), x_test.reshape(shape)
    torch.manual_seed(SEED)  # the initial weights
    model = train(spec.build(), x_train, y_train, spec.epochs)
    onnx_model = to_onnx(name, model)

    calib_rows = np.random.default_rng(SEED).permutation(len(x_train))[:CALIB_SAMPLES]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onnx_model, folder / "model.onnx")
    save_npz(folder / "calib.npz", {INPUT: x_train[np.sort(calib_rows)]})
    save_npz(folder / "eval.npz", {INPUT: x_test, "labels": y_test})

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run([OUTPUT], {INPUT: x_test})[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(x_test)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4, err_msg=f"{name}: onnxruntime != torch")
    return float((logits.argmax(axis=1) == y_test).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EXAMPLES, help="folder to write mlp/ and cnn/ into")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in EXAMPLES_SPEC:
        accuracy = make(name, args.out)
        print(f"{name}: test accuracy in onnxruntime {accuracy:.4f} on {args.out / name / 'eval.npz'}")


if __name__ == "__main__":
    main()
