"""The fine-tuning round trip a user's training loop makes with masks.npz and plan.json (needs torch: `.[train]`).

    python tools/finetune_example.py [--budget 0.1 --epochs 5]

1. `pruneaug.compile` the bundled CNN: the search, at a loose budget so the accuracy it costs is visible;
2. load pruned.onnx's weights into the torch model that made the example, fine-tune on the digits
   training split with every mask held (weights and their gradients multiplied by the mask);
3. export, and compile the fine-tuned model with `--keep-sparsity`: the plan read off its zeros
   must be the plan it was fine-tuned with;
4. print top-1 on the held-out split: dense, pruned, fine-tuned.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_examples  # noqa: E402  (the torch model and the data split that made examples/cnn)

import pruneaug  # noqa: E402
from pruneaug.passes import ort_run  # noqa: E402
from pruneaug.passes.validate import accuracy  # noqa: E402

EXAMPLE = make_examples.EXAMPLES / "cnn"


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    return accuracy(ort_run.run(onnx.load(path), {"input": x})[0], y)


def as_parameter_layout(array: np.ndarray, parameter: torch.Tensor) -> torch.Tensor:
    """An ONNX initializer in the torch parameter's layout (Linear weights may be stored transposed)."""
    if tuple(array.shape) == tuple(parameter.shape):
        return torch.from_numpy(np.array(array))
    assert tuple(array.T.shape) == tuple(parameter.shape), (array.shape, parameter.shape)
    return torch.from_numpy(np.array(array.T))


def finetune(model: torch.nn.Module, masks: dict[str, torch.Tensor], x: np.ndarray, y: np.ndarray,
             epochs: int) -> torch.nn.Module:
    """Adam at a small learning rate; masked weights and their gradients stay zero throughout."""
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        parameters[name].register_hook(lambda grad, mask=mask: grad * mask)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    generator = torch.Generator().manual_seed(make_examples.SEED)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x_t), generator=generator).split(32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x_t[batch]), y_t[batch]).backward()
            optimizer.step()
            with torch.no_grad():
                for name, mask in masks.items():
                    parameters[name].mul_(mask)  # Adam's weight update is not zero where the gradient is
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.1, help="top-1 drop the search may spend (default 0.1)")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(make_examples.SEED)
    x_train, x_test, y_train, y_test = make_examples.load_data()
    x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    work = Path(tempfile.mkdtemp(prefix="pruneaug-finetune-"))

    first = pruneaug.compile(EXAMPLE / "model.onnx", calib=EXAMPLE / "calib.npz", eval=EXAMPLE / "eval.npz",
                             budget=args.budget, artifact=False, measure="none", out=work / "pruned")
    model = make_examples.cnn()
    pruned_weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(first.pruned_model).graph.initializer}
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(as_parameter_layout(pruned_weights[name], parameter))
    with np.load(first.masks) as stored:
        masks = {name: as_parameter_layout(stored[name].astype(np.float32), parameters[name]) for name in stored.files}
    finetune(model, masks, x_train, y_train, args.epochs)
    tuned_path = work / "finetuned.onnx"
    onnx.save(make_examples.to_onnx("cnn", model), tuned_path)

    again = pruneaug.compile(tuned_path, keep_sparsity=True, artifact=False, measure="none", out=work / "kept")
    same_plan = all(a["nnz_blocks"] == b["nnz_blocks"] and (a["block"] == b["block"] or a["sparsity"] == 0)
                    for a, b in zip(first.plan["layers"], again.plan["layers"], strict=True))
    rows = [("dense (examples/cnn)", onnx_accuracy(EXAMPLE / "model.onnx", x_test, y_test)),
            (f"pruned, searched at budget {args.budget:g} "
             f"({first.plan['totals']['weight_sparsity']:.0%} of weights)", onnx_accuracy(first.pruned_model, x_test, y_test)),
            (f"fine-tuned {args.epochs} epochs, masks held", onnx_accuracy(tuned_path, x_test, y_test))]
    print(f"{'model':<45} {'top-1 (360 held-out digits)':>28}")
    for label, value in rows:
        print(f"{label:<45} {value:>28.4f}")
    print(f"--keep-sparsity reads back the same blocks and kept-block counts: {same_plan}")
    print(json.dumps({"work": str(work), "layers": [(e["node"], e["block"], e["sparsity"]) for e in again.plan["layers"]]}))


if __name__ == "__main__":
    main()
