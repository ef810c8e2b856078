"""A seeded click dataset that knows each embedding row's true dimension.

Every id of every field has a latent vector of ``dim`` values of which only the first ``d_id`` are non-zero; the
true dimensions ``d_id`` are drawn from ``dims`` (heterogeneous, independent of popularity). Clicks follow
``sigmoid(bias + sum_{f<g} <v_f(id_f), v_g(id_g)>)``. A row's planted dimension is what an ideal per-row allocation
would give it, so a pruning method can be scored on how well its kept dimensions track them (:class:`PlantedCTR`).
"""
from __future__ import annotations

from typing import Annotated

import torch

from ..schema import Range
from . import DataBundle, bundle_from_tensors, register_dataset
from .synthetic_ctr import zipf_ranks

DEFAULT_DIMS = (0, 4, 8, 16, 32)


class PlantedCTR:
    """``fields`` sparse features of ``num_ids`` ids (Zipf popularity) and 2 dense noise features; per id a latent
    vector of true dimension drawn uniformly from ``dims``."""

    def __init__(self, num_ids: int, fields: int = 4, dim: int = 32, dims: tuple[int, ...] = DEFAULT_DIMS,
                 zipf: float = 1.05, seed: int = 0) -> None:
        if max(dims) > dim:
            raise ValueError(f"planted dims {dims} exceed the latent dim {dim}")
        self.num_ids, self.fields, self.dim, self.zipf = num_ids, fields, dim, zipf
        gen = torch.Generator().manual_seed(seed + 15485863)
        choices = torch.tensor(dims)
        self.true_dims = choices[torch.randint(len(dims), (fields, num_ids), generator=gen)]
        mask = torch.arange(dim)[None, None, :] < self.true_dims[:, :, None]
        # scale so that an interaction of two full-dimension rows has unit variance
        self.latent = torch.randn(fields, num_ids, dim, generator=gen) * mask / dim ** 0.5 * 3.0
        self.order = torch.stack([torch.randperm(num_ids, generator=gen) for _ in range(fields)])

    def _ids(self, n: int, gen: torch.Generator) -> torch.Tensor:
        rank = zipf_ranks((n, self.fields), self.num_ids, self.zipf, gen)
        return torch.stack([self.order[f][rank[:, f]] for f in range(self.fields)], 1)

    def batch(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` samples: dense float32 [n, 2], sparse int64 [n, fields], label float32 [n]."""
        ids = self._ids(n, gen)
        vectors = [self.latent[f][ids[:, f]] for f in range(self.fields)]
        logit = torch.full((n,), -0.3)
        for f in range(self.fields):
            for g in range(f + 1, self.fields):
                logit += (vectors[f] * vectors[g]).sum(1)
        label = torch.bernoulli(torch.sigmoid(logit), generator=gen)
        return torch.randn(n, 2, generator=gen), ids, label


@register_dataset("planted-ctr", needs_path=False,
                  description="seeded clicks from per-id latent vectors of planted, heterogeneous true dimension")
def load_planted_ctr(path: str | None = None, seed: int = 0,
                     num_samples: Annotated[int, Range(100, 10_000_000)] = 200_000,
                     num_ids: Annotated[int, Range(10, 10_000_000)] = 20_000,
                     fields: Annotated[int, Range(2, 64)] = 4,
                     dim: Annotated[int, Range(1, 1024)] = 32,
                     zipf: Annotated[float, Range(1, 10, min_exclusive=True)] = 1.05) -> DataBundle:
    """``num_samples`` samples split 80/10/10. ``PlantedCTR(num_ids, fields, dim, zipf=zipf, seed=seed).true_dims``
    holds every row's planted dimension (``[fields, num_ids]``)."""
    planted = PlantedCTR(num_ids, fields, dim, zipf=zipf, seed=seed)
    tensors = planted.batch(num_samples, torch.Generator().manual_seed(seed))
    info = {"num_dense": 2, "cardinalities": [num_ids] * fields, "source": "planted-ctr"}
    return bundle_from_tensors(tensors, "binary", info, seed)
