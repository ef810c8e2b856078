"""A seeded, Criteo-shaped synthetic CTR generator: 13 dense + 26 sparse features, Zipf-skewed ids, planted clicks.

Nothing is stored per id: every id's planted effect is a hash of (feature, id, seed), so the generator scales from a
few thousand rows to the full Criteo Kaggle cardinalities (33.8M rows) and can stream batches forever.
"""
from __future__ import annotations

import math
from typing import Annotated

import torch

from ..schema import Range
from . import DataBundle, bundle_from_tensors, register_dataset

# Per-feature cardinalities of the Criteo Kaggle display-advertising dataset (as used by the DLRM reference).
KAGGLE_CARDINALITIES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                        14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
NUM_DENSE = 13
_LATENT = 4
_MASK32 = 0xFFFFFFFF


def scaled_cardinalities(scale: float) -> list[int]:
    """Kaggle cardinalities multiplied by ``scale`` (at least 2 rows per feature)."""
    return [max(2, int(round(c * scale))) for c in KAGGLE_CARDINALITIES]


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (murmur3 finaliser) on int64 tensors."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & _MASK32
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def zipf_ranks(shape: tuple[int, ...], card: int, s: float, gen: torch.Generator) -> torch.Tensor:
    """Popularity ranks in ``[0, card)`` of a (continuous, inverse-CDF sampled) Zipf law with exponent ``s``."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if abs(s - 1.0) < 1e-9:
        rank = torch.exp(u * math.log(card + 1)) - 1
    else:
        top = (card + 1) ** (1 - s) - 1
        rank = (u * top + 1) ** (1 / (1 - s)) - 1
    return rank.long().clamp_(0, card - 1)


def _uniform(ids: torch.Tensor, feature: int, salt: int) -> torch.Tensor:
    """Deterministic pseudo-uniform [0, 1) value per id."""
    h = _mix(ids * 0x9E3779B1 + (feature * 0x632BE5AB + salt * 0x27D4EB2F))
    return h.to(torch.float64) / 2**32


class SyntheticCTR:
    """Criteo-shaped click data with a planted logistic model (learnable, Zipf-skewed ids)."""

    def __init__(self, cardinalities: list[int], zipf: float = 1.1, seed: int = 0, noise: float = 1.0) -> None:
        self.cardinalities = list(cardinalities)
        self.zipf = zipf
        self.seed = seed
        gen = torch.Generator().manual_seed(seed + 7919)
        self.dense_w = torch.randn(NUM_DENSE, generator=gen, dtype=torch.float64) * 0.4
        self.bias_scale = torch.rand(len(cardinalities), generator=gen, dtype=torch.float64) * 1.2 + 0.2
        n = len(cardinalities)
        pairs = torch.randperm(n * n, generator=gen)[: 2 * n]
        self.pairs = [(int(p) // n, int(p) % n) for p in pairs if int(p) // n < int(p) % n][:12]
        self.noise = noise
        self.offset = -1.0  # base click rate ~ 25%, like Criteo

    def _sample_ids(self, n: int, card: int, gen: torch.Generator) -> torch.Tensor:
        rank = zipf_ranks((n,), card, self.zipf, gen)
        # scramble ranks into ids with an affine bijection so popular ids are spread over the table
        step = 2654435761 % card or 1
        while math.gcd(step, card) != 1:
            step += 1
        return (rank * step + self.seed) % card

    def _effect(self, ids: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
        bias = (_uniform(ids, f, self.seed) - 0.5) * 2 * self.bias_scale[f]
        latent = torch.stack([_uniform(ids, f, self.seed + 101 + k) - 0.5 for k in range(_LATENT)], dim=-1) * 2
        return bias, latent

    def batch(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` samples: dense float32 [n, 13], sparse int64 [n, 26], label float32 [n]."""
        dense = torch.randn(n, NUM_DENSE, generator=gen, dtype=torch.float64)
        sparse = torch.stack([self._sample_ids(n, c, gen) for c in self.cardinalities], dim=1)
        logit = dense @ self.dense_w + self.offset
        latents = {}
        for f in range(len(self.cardinalities)):
            bias, latents[f] = self._effect(sparse[:, f], f)
            logit = logit + bias
        for a, b in self.pairs:
            logit = logit + 1.5 * (latents[a] * latents[b]).sum(-1)
        logit = logit + self.noise * torch.randn(n, generator=gen, dtype=torch.float64) * 0.3
        label = torch.bernoulli(torch.sigmoid(logit), generator=gen)
        # Criteo dense features are log-transformed counts: keep them non-negative and skewed
        dense_obs = torch.log1p(torch.exp(dense))
        return dense_obs.float(), sparse, label.float()

    def stream(self, batch_size: int, seed: int):
        """Endless iterator of batches (for training at full Kaggle scale without materialising data)."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield self.batch(batch_size, gen)


@register_dataset("synthetic-ctr", needs_path=False,
                  description="seeded Criteo-shaped synthetic clicks (13 dense, 26 sparse, Zipf ids)")
def load_synthetic_ctr(path: str | None = None, seed: int = 0,
                       num_samples: Annotated[int, Range(10, 10_000_000)] = 100_000,
                       cardinality_scale: Annotated[float, Range(0, 1, min_exclusive=True)] = 0.001,
                       zipf: Annotated[float, Range(0, 10, min_exclusive=True)] = 1.1) -> DataBundle:
    """Materialise ``num_samples`` synthetic samples split 80/10/10; cardinalities = Kaggle x ``cardinality_scale``.

    Argument bounds are declared with :class:`Range` and checked by ``check_data_config`` before loading.
    """
    cards = scaled_cardinalities(cardinality_scale)
    gen_data = SyntheticCTR(cards, zipf=zipf, seed=seed)
    dense, sparse, label = gen_data.batch(num_samples, torch.Generator().manual_seed(seed))
    info = {"num_dense": NUM_DENSE, "cardinalities": cards, "source": "synthetic-ctr"}
    return bundle_from_tensors((dense, sparse, label), "binary", info, seed)
