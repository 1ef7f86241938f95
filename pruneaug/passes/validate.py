"""End-to-end validation: how much worse a pruned model's outputs are than the dense model's, on eval data.

Needs: the dense IR (before pruning) and eval inputs. Leaves nothing on the IR: a `Validator`
runs the dense model once, keeps its outputs, and then each call is one onnxruntime run of the
candidate.

    >>> validate = make_validator(dense_ir, data.inputs, data.labels, metric="top1")   # examples/mlp
    >>> validate(pruned)                      # every layer 8x8 at 50%: 34.7 points of accuracy lost
    0.3472222222222222
    >>> validate(reconstruct(pruned, calib.inputs))
    0.008333333333333304

Every metric is a loss, 0 for the dense model, larger is worse, so the search compares it with
the user's budget directly:

- `top1`: dense accuracy minus pruned accuracy against the labels (argmax over the last axis of
  the first output); without labels, 1 - agreement of the pruned model's argmax with the dense
  model's (the validator's `note` says so).
- `cosine`: 1 - mean cosine similarity of each sample's output to the dense one's.
- `relerr`: ||pruned - dense|| / ||dense|| over the whole output.

Several outputs: `top1` reads the first; `cosine` and `relerr` take the worst output.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pruneaug.ir.graph import IRModel, lower
from pruneaug.options import METRICS, check_choice
from pruneaug.passes import ort_run


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    predicted = np.argmax(logits, axis=-1)
    return float(np.mean(predicted.reshape(labels.shape) == labels))


def top1_loss(dense: np.ndarray, pruned: np.ndarray, labels: np.ndarray | None) -> float:
    if labels is None:
        return 1.0 - accuracy(pruned, np.argmax(dense, axis=-1))
    return accuracy(dense, labels) - accuracy(pruned, labels)


def cosine_loss(dense: np.ndarray, pruned: np.ndarray) -> float:
    """1 - mean over samples (axis 0) of the cosine similarity of the flattened outputs; 0-vector pairs count as equal."""
    a = dense.reshape(len(dense), -1).astype(np.float64)
    b = pruned.reshape(len(pruned), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    similarity = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
    return float(1.0 - similarity.mean())


def relerr_loss(dense: np.ndarray, pruned: np.ndarray) -> float:
    reference = np.linalg.norm(dense.astype(np.float64))
    error = np.linalg.norm(pruned.astype(np.float64) - dense)
    return float(error / reference) if reference > 0 else float(error)


@dataclass(frozen=True)
class Validator:
    """The metric loss of a candidate IR against the dense outputs computed once at construction."""

    metric: str
    runner: ort_run.WeightFedRunner  # the dense model with its prunable weights fed per run
    weights: frozenset[str]
    dense_outputs: Sequence[np.ndarray]
    labels: np.ndarray | None
    note: str

    def __call__(self, candidate: IRModel) -> float:
        """One onnxruntime run: the candidate's prunable weights fed into the dense model's session."""
        return self.loss(self.runner.run({name: candidate.weights[name] for name in self.weights}))

    def loss(self, outputs: Sequence[np.ndarray]) -> float:
        if self.metric == "top1":
            return top1_loss(self.dense_outputs[0], outputs[0], self.labels)
        measure = cosine_loss if self.metric == "cosine" else relerr_loss
        return max(measure(d, o) for d, o in zip(self.dense_outputs, outputs))


def make_validator(dense_ir: IRModel, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None = None,
                   metric: str = "top1", batch_size: int = 256) -> Validator:
    """Run the dense model on `inputs` once; the returned Validator scores candidates against it."""
    check_choice("--metric", metric, METRICS)
    note = ""
    if metric == "top1" and labels is None:
        note = "top1 without labels: measured as disagreement with the dense model's argmax"
    weights = frozenset(dense_ir.layer(n).weight for n in dense_ir.prunable_nodes())
    runner = ort_run.WeightFedRunner(lower(dense_ir), set(weights), inputs, batch_size)
    return Validator(metric, runner, weights, runner.run({}), labels, note)
