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
  model's (the validator's `note` says so). Labels are class indices (integers, or whole floats; one
  per prediction) or one-hot rows of the output's shape; one outside the output's classes is a
  CalibrationError (it would make the dense accuracy 0, and every plan meet the budget), and a dense
  accuracy no better than chance a warning.
- `cosine`: 1 - mean cosine similarity of each sample's output to the dense one's (an output pruned to
  zero is dissimilar to a non-zero one).
- `relerr`: ||pruned - dense|| / ||dense|| over the whole output.

Several outputs: `top1` reads the first; `cosine` and `relerr` take the worst output.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pruneaug.errors import CalibrationError
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
    """1 - mean over samples (axis 0) of the cosine similarity of the flattened outputs.

    A pair of 0-vectors counts as equal (similarity 1); one 0-vector against a non-zero one as unrelated
    (similarity 0): a layer pruned away entirely zeroes the output, and must not read as lossless.
    """
    a = dense.reshape(len(dense), -1).astype(np.float64)
    b = pruned.reshape(len(pruned), -1).astype(np.float64)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    norms = norm_a * norm_b
    dots = np.sum(a * b, axis=1)
    similarity = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), (norm_a == 0) & (norm_b == 0))
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
    labels: np.ndarray | None  # class indices (`class_labels`)
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
                   metric: str = "top1", batch_size: int = 256, labels_file: str | None = None) -> Validator:
    """Run the dense model on `inputs` once; the returned Validator scores candidates against it.

    `labels_file`: the eval file the labels came from, which a CalibrationError or warning about them names.
    """
    check_choice("--metric", metric, METRICS)
    note = ""
    if metric == "top1" and labels is None:
        note = "top1 without labels: measured as disagreement with the dense model's argmax"
    weights = frozenset(dense_ir.layer(n).weight for n in dense_ir.prunable_nodes())
    runner = ort_run.WeightFedRunner(lower(dense_ir), set(weights), inputs, batch_size)
    dense_outputs = runner.run({})
    if metric == "top1" and labels is not None:
        where = f"{labels_file or 'the eval data'}: 'labels'"
        labels = class_labels(labels, dense_outputs[0], where)
        warning = chance_warning(accuracy(dense_outputs[0], labels), dense_outputs[0].shape[-1], where)
        if warning:
            warnings.warn(warning, stacklevel=2)  # (the CLI prints pruneaug's own warnings)
    return Validator(metric, runner, weights, dense_outputs, labels, note)


def class_labels(labels: np.ndarray, logits: np.ndarray, where: str) -> np.ndarray:
    """`labels` as class indices into the last axis of `logits`, or a CalibrationError naming `where`.

    One class index per prediction (any shape of as many), or one-hot / per-class scores of the logits'
    own shape (read by their argmax). An index outside [0, classes) or not a whole number never matches
    any prediction: the dense accuracy would be 0 and every plan, however pruned, would meet a top1
    budget, so such labels are refused rather than measured.
    """
    classes = logits.shape[-1]
    if labels.shape == logits.shape and labels.ndim > 1:
        return np.argmax(labels, axis=-1)
    if labels.size != logits.size // max(classes, 1):
        raise CalibrationError(f"{where} has shape {labels.shape}: the model's output {logits.shape} wants one "
                               f"class index per prediction ({logits.shape[:-1]}) or one-hot rows ({logits.shape})")
    if not np.issubdtype(labels.dtype, np.number) or np.issubdtype(labels.dtype, np.complexfloating):
        raise CalibrationError(f"{where} is {labels.dtype}: expected integer class indices")
    bad = ~np.isfinite(labels) | (labels < 0) | (labels >= classes) | (labels != np.floor(labels))
    if bad.any():
        value = labels.ravel()[np.flatnonzero(bad)[0]].item()
        raise CalibrationError(f"{where} holds {value}, not a class of the model's output: its last axis has "
                               f"{classes} classes, so labels must be whole numbers in [0, {classes - 1}]")
    return labels


def chance_warning(dense_accuracy: float, classes: int, where: str) -> str:
    """A warning where the dense model's own accuracy on the labels is no better than chance (1/classes),
    else "": a top1 budget measured against labels the model does not predict says nothing about pruning."""
    if classes < 2 or dense_accuracy > 1.0 / classes:
        return ""
    return (f"{where}: the dense model's own top1 accuracy on them is {dense_accuracy:.3f}, no better than chance "
            f"(1/{classes}): are they this model's classes? A top1 budget against them measures nothing")
