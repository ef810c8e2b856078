"""Quality metrics (AUC, log loss, accuracy) and memory accounting shared by every plugin."""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn


def roc_auc(labels: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula, ties averaged."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(labels: torch.Tensor, probs: torch.Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` against 0/1 ``labels``."""
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
