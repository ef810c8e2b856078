"""A seeded click stream whose data drifts at a known point: which ids are popular, and what they mean for the label.

The training split is in time order (train it with ``train.shuffle: false``): before ``drift_at`` of it, ids are drawn
by a Zipf law over one popularity ranking and clicks follow one planted model; from ``drift_at`` on, both change
(a new ranking, new per-id effects). Validation and test are drawn from the post-drift distribution, so their AUC
measures how well a model has adapted. :func:`popular_ids` names the newly and formerly popular ids.
"""
from __future__ import annotations

from typing import Annotated

import torch

from ..schema import Range
from . import DataBundle, register_dataset
from .synthetic_ctr import _uniform, zipf_ranks

_LATENT = 4


class DriftCTR:
    """``fields`` sparse features of ``num_ids`` ids each (+ 2 dense noise features); phase 0 before the drift,
    phase 1 after. Per phase: a popularity permutation per field, a bias and a latent vector per id, and the label
    logit ``sum_f bias_f(id_f) + sum_{f<g} <latent_f(id_f), latent_g(id_g)>``."""

    def __init__(self, num_ids: int, fields: int = 4, zipf: float = 1.1, seed: int = 0) -> None:
        self.num_ids, self.fields, self.zipf, self.seed = num_ids, fields, zipf, seed
        gen = torch.Generator().manual_seed(seed + 104729)
        self.ranking = [[torch.randperm(num_ids, generator=gen) for _ in range(fields)] for _ in range(2)]

    def _effect(self, ids: torch.Tensor, field: int, phase: int) -> tuple[torch.Tensor, torch.Tensor]:
        salt = self.seed + 7 * phase
        bias = (_uniform(ids, field, salt) - 0.5) * 1.5
        latent = torch.stack([_uniform(ids, field, salt + 101 + k) - 0.5 for k in range(_LATENT)], -1) * 2.5
        return bias, latent

    def batch(self, n: int, phase: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` samples of one phase: dense float32 [n, 2], sparse int64 [n, fields], label float32 [n]."""
        ids = torch.stack([self.ranking[phase][f][zipf_ranks((n,), self.num_ids, self.zipf, gen)] for f in range(self.fields)], 1)
        logit = torch.full((n,), -0.5, dtype=torch.float64)
        latents = []
        for f in range(self.fields):
            bias, latent = self._effect(ids[:, f], f, phase)
            logit += bias
            latents.append(latent)
        for f in range(self.fields):
            for g in range(f + 1, self.fields):
                logit += (latents[f] * latents[g]).sum(-1)
        label = torch.bernoulli(torch.sigmoid(logit), generator=gen)
        dense = torch.randn(n, 2, generator=gen)
        return dense, ids, label.float()

    def popular_ids(self, phase: int, field: int, top: int) -> torch.Tensor:
        """The ``top`` most popular ids of ``field`` in ``phase``."""
        return self.ranking[phase][field][:top]

    def changed_ids(self, field: int, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(newly popular, formerly popular): ids of ``field`` in the ``top`` after the drift and not before it,
        and the other way round."""
        before, after = self.popular_ids(0, field, top), self.popular_ids(1, field, top)
        return after[~torch.isin(after, before)], before[~torch.isin(before, after)]


@register_dataset("drift-ctr", needs_path=False,
                  description="seeded click stream whose id popularity and id effects change at drift_at")
def load_drift_ctr(path: str | None = None, seed: int = 0,
                   num_samples: Annotated[int, Range(100, 10_000_000)] = 200_000,
                   num_ids: Annotated[int, Range(10, 100_000_000)] = 5000,
                   fields: Annotated[int, Range(2, 64)] = 4,
                   drift_at: Annotated[float, Range(0, 1)] = 0.5,
                   zipf: Annotated[float, Range(1, 10, min_exclusive=True)] = 1.1) -> DataBundle:
    """``num_samples`` training samples in time order (the drift after ``drift_at`` of them), plus 10% each of
    validation and test samples from the post-drift distribution."""
    from torch.utils.data import TensorDataset

    stream = DriftCTR(num_ids, fields, zipf, seed)
    gen = torch.Generator().manual_seed(seed)
    before = int(drift_at * num_samples)
    parts = [stream.batch(before, 0, gen), stream.batch(num_samples - before, 1, gen)]
    train = TensorDataset(*(torch.cat([p[i] for p in parts]) for i in range(3)))
    held = max(10, num_samples // 10)
    valid = TensorDataset(*stream.batch(held, 1, gen))
    test = TensorDataset(*stream.batch(held, 1, gen))
    info = {"num_dense": 2, "cardinalities": [num_ids] * fields, "source": "drift-ctr", "drift_step_fraction": drift_at}
    return DataBundle(train, valid, test, "binary", info)
