"""Trains and exports the bundled example models: two on scikit-learn's digits, a transformer encoder on a synthetic task.

    python tools/make_examples.py                   # writes examples/{mlp,cnn,encoder}/{model.onnx,calib.npz,eval.npz}
    python tools/make_examples.py --only encoder    # one of them
    python tools/make_examples.py --only encoder --hidden 256 --ffn 1024 --out /tmp/wide   # a wider encoder, for benchmarks

Needs torch (the ``train`` extra); nothing else in pruneaug does. Training is seeded and runs on one
thread with deterministic algorithms, the ONNX graphs are written with onnx.helper from the trained
weights (so they hold exactly the ops named below, weights as initializers, nothing from training),
and the .npz archives carry fixed timestamps: a rerun on the same machine and torch build writes the
same bytes. The script checks onnxruntime against torch and prints each model's test accuracy.

- ``mlp``: input ``input`` float32 [batch, 64] -> MatMul+Add 256, Relu, Gemm(transB=1) 256, Relu,
  Gemm(transB=0) 10 -> ``logits``.
- ``cnn``: input ``input`` float32 [batch, 1, 8, 8] -> Conv 1x1 32, Relu, Conv 3x3 64, Relu,
  depthwise Conv 3x3 64, Relu, Conv 3x3 stride 2 64, Relu, Flatten, Gemm 128, Relu, Gemm 10 -> ``logits``.

- ``encoder``: input ``input`` float32 [batch, 16, 8] -> MatMul+Add 128 plus a position table, two
  post-norm BERT layers (hidden 128, 4 heads, FFN 512, Erf GELU; the graph of tools/encoder_graph.py),
  mean over the sequence, Gemm 8 -> ``logits``. The task (`synthetic_task`): 16 noisy one-hot symbols
  of 8; the label is the symbol that occurs most often in the first half, while the second half
  repeats another symbol more often still, so the model must tell the halves apart.

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
from encoder_graph import encoder as encoder_graph
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


HIDDEN, FFN = 128, 512  # the bundled encoder's widths


class Encoder(nn.Module):
    """The torch twin of tools/encoder_graph.py's graph (same ops, same order), trained here, exported there."""

    def __init__(self, in_features: int = 8, seq: int = 16, hidden: int = HIDDEN, heads: int = 4, ffn: int = FFN,
                 layers: int = 2, classes: int = 8):
        super().__init__()
        self.shape = dict(hidden=hidden, ffn=ffn, layers=layers, seq=seq, heads=heads, in_features=in_features,
                          classes=classes)
        self.embed = nn.Linear(in_features, hidden)
        self.position = nn.Parameter(0.02 * torch.randn(seq, hidden))
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            q=nn.Linear(hidden, hidden), k=nn.Linear(hidden, hidden), v=nn.Linear(hidden, hidden),
            o=nn.Linear(hidden, hidden), ln1=nn.LayerNorm(hidden), ffn1=nn.Linear(hidden, ffn),
            ffn2=nn.Linear(ffn, hidden), ln2=nn.LayerNorm(hidden))) for _ in range(layers))
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        heads, head_dim = self.shape["heads"], self.shape["hidden"] // self.shape["heads"]
        x = self.embed(x) + self.position
        for layer in self.layers:
            q, k, v = (layer[n](x).reshape(batch, seq, heads, head_dim).transpose(1, 2) for n in "qkv")
            probs = torch.softmax(q @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1)
            context = (probs @ v).transpose(1, 2).reshape(batch, seq, -1)
            x = layer["ln1"](x + layer["o"](context))
            x = layer["ln2"](x + layer["ffn2"](nn.functional.gelu(layer["ffn1"](x))))
        return self.classifier(x.mean(dim=1))

    def weight(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The trained value of an encoder_graph weight name (MatMul weights are nn.Linear's transposed)."""
        if name == "position":
            return self.position.detach().numpy().astype(np.float32)
        *path, kind = name.split(".")
        layer = path[0].removeprefix("layer")
        module = self.layers[int(layer)][path[1]] if layer.isdigit() else getattr(self, path[0])
        value = getattr(module, {"gamma": "weight", "beta": "bias"}.get(kind, kind))
        if kind == "weight" and path[0] != "classifier":
            value = value.T
        return value.detach().numpy().astype(np.float32)


def synthetic_task(samples: int, rng: np.random.Generator, seq: int = 16, symbols: int = 8,
                   noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(features [samples, seq, symbols], labels): the majority symbol of the first half, against a
    more frequent distractor in the second half; one-hot symbols with Gaussian noise."""
    half = seq // 2
    tokens = np.empty((samples, seq), np.int64)
    labels = rng.integers(0, symbols, samples)
    for row, label in enumerate(labels):
        while True:  # the label 4 times in the first half, no other symbol as often
            others = rng.choice(np.delete(np.arange(symbols), label), half - 4)
            if np.bincount(others, minlength=symbols).max() < 4:
                break
        first = rng.permutation(np.concatenate([[label] * 4, others]))
        distractor = rng.choice(np.delete(np.arange(symbols), label))
        second = rng.permutation(np.concatenate([[distractor] * 5, rng.integers(0, symbols, seq - half - 5)]))
        tokens[row] = np.concatenate([first, second])
    features = np.eye(symbols, dtype=np.float32)[tokens] + noise * rng.standard_normal((samples, seq, symbols))
    return features.astype(np.float32), labels


def make_encoder(out: Path, train_samples: int = 8000, eval_samples: int = 1000, epochs: int = 15,
                 hidden: int = HIDDEN, ffn: int = FFN) -> float:
    """Trains the encoder example (or one `hidden` and `ffn` wide) on the synthetic task and writes it;
    returns its eval accuracy in onnxruntime."""
    rng = np.random.default_rng(SEED)
    x_train, y_train = synthetic_task(train_samples, rng)
    x_test, y_test = synthetic_task(eval_samples, rng)
    torch.manual_seed(SEED)
    model = train(Encoder(hidden=hidden, ffn=ffn), x_train, y_train, epochs)
    onnx_model = encoder_graph(**model.shape, weights=model.weight, batch=BATCH, input_name=INPUT, output_name=OUTPUT)
    onnx_model.producer_name = "pruneaug tools/make_examples.py"
    return _write_and_check("encoder", onnx_model, model, x_train, x_test, y_test, out)


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
    """Trains, exports and checks one digits example; returns its test accuracy in onnxruntime."""
    x_train, x_test, y_train, y_test = load_data()
    spec = EXAMPLES_SPEC[name]
    shape = [-1 if d == BATCH else d for d in spec.input_shape]
    x_train, x_test = x_train.reshape(shape), x_test.reshape(shape)
    torch.manual_seed(SEED)  # the initial weights
    model = train(spec.build(), x_train, y_train, spec.epochs)
    return _write_and_check(name, to_onnx(name, model), model, x_train, x_test, y_test, out)


def _write_and_check(name: str, onnx_model: onnx.ModelProto, model: nn.Module, x_train: np.ndarray,
                     x_test: np.ndarray, y_test: np.ndarray, out: Path) -> float:
    """Writes model.onnx, calib.npz (CALIB_SAMPLES training rows) and eval.npz; checks onnxruntime against torch."""
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
    parser.add_argument("--out", type=Path, default=EXAMPLES, help="folder to write the examples' folders into")
    parser.add_argument("--only", choices=[*EXAMPLES_SPEC, "encoder"], help="write this example alone")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help=f"the encoder's hidden width (bundled: {HIDDEN})")
    parser.add_argument("--ffn", type=int, default=FFN, help=f"the encoder's feed-forward width (bundled: {FFN})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    makers = {**{name: lambda out, name=name: make(name, out) for name in EXAMPLES_SPEC},
              "encoder": lambda out: make_encoder(out, hidden=args.hidden, ffn=args.ffn)}
    for name, maker in makers.items():
        if args.only in (None, name):
            accuracy = maker(args.out)
            print(f"{name}: test accuracy in onnxruntime {accuracy:.4f} on {args.out / name / 'eval.npz'}")


if __name__ == "__main__":
    main()
