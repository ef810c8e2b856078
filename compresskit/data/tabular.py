"""Helpers shared by the tabular CTR loaders: categorical vocabularies and dense standardisation."""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch


def encode_categorical(values: Sequence[str], min_count: int = 1) -> tuple[torch.Tensor, int]:
    """Map string values to contiguous ids by first appearance; values seen < ``min_count`` times (and '') -> id 0.

    Returns (ids int64, cardinality including the shared out-of-vocabulary id 0).
    """
    counts = Counter(values)
    vocab: dict[str, int] = {}
    ids = []
    for v in values:
        if v == "" or counts[v] < min_count:
            ids.append(0)
            continue
        if v not in vocab:
            vocab[v] = len(vocab) + 1
        ids.append(vocab[v])
    return torch.tensor(ids, dtype=torch.long), len(vocab) + 1


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-variance columns (constant columns become zero)."""
    std = x.std(dim=0, unbiased=False)
    return (x - x.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
