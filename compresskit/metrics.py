"""Quality metrics (AUC, log loss, accuracy) and memory accounting shared by every plugin."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def roc_auc(labels: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``); NaN when only one class is present."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    from sklearn.metrics import roc_auc_score   # imported here: scikit-learn takes seconds to import

    if np.unique(y).size < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def log_loss(labels: torch.Tensor, probs: torch.Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` against 0/1 ``labels`` (in torch: no copy to numpy;
    tests check it against scikit-learn's ``log_loss``)."""
    p = probs.double().clamp(eps, 1 - eps)
    y = labels.double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def accuracy(labels: torch.Tensor, predictions: torch.Tensor) -> float:
    """Fraction of predictions equal to labels."""
    return float((labels == predictions).double().mean())


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes held by a tensor's elements."""
    return t.numel() * t.element_size()


def module_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of a module's parameters and buffers (each tensor counted once)."""
    seen: set[int] = set()
    params = buffers = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += tensor_bytes(p)
    for b in model.buffers():
        if id(b) not in seen:
            seen.add(id(b))
            buffers += tensor_bytes(b)
    return {"parameters": params, "buffers": buffers, "total": params + buffers}
