"""Per-target latency of block-sparse layers: measured, fitted or analytical.

    >>> from pruneaug.cost_model import predict
    >>> p = predict("x86", 768, 3072, 128, (16, 16), 0.8)
    >>> float(p), p.source
    (0.00041, 'fitted')
"""
from pruneaug.cost_model.model import CostModel, Prediction, cost_model, measure, predict

__all__ = ["CostModel", "Prediction", "cost_model", "measure", "predict"]
