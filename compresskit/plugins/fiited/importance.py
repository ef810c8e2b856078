"""Chunk importance and the choice of what to prune, for FIITED and the AdaEmbed-style baseline.

FIITED's chunk utility follows the paper: ``u <- gamma * u + a * g`` every step, where ``a * g`` is the chunk's
access count times its mean per-access gradient magnitude, i.e. the norm of the chunk's gradient summed over the
batch. The kernels add it during backward (``FiitedEmbeddingBag.track_utility``). Rows keep a *prefix* of chunks, so
a chunk's pruning score is the minimum utility over itself and the chunks before it (tail chunks of unimportant
rows go first), raised to ``exponent`` and divided by ``(chunk + 1) ** discount``.

Scores are held as one ``[stored rows, num_chunks]`` float32 grid per table (absent chunks ``+inf``): a few bytes
per stored chunk, so a pruning round over a Criteo-sized model stays small next to the pool.
"""
from __future__ import annotations

import torch

from .embedding import FiitedEmbeddingBag


def chunk_utilities(module: FiitedEmbeddingBag) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stored rows, their chunk counts, utility grid ``[rows, num_chunks]`` with ``+inf`` for absent chunks)."""
    rows = torch.nonzero(module.store.row_counts()).flatten()
    first, cnt = module.store.row_slots(rows)
    j = torch.arange(module.num_chunks)
    present = j[None, :] < cnt[:, None]
    slots = torch.where(present, first[:, None] + j, 0)
    grid = module.utilities(slots.reshape(-1)).view(-1, module.num_chunks).float()
    return rows, cnt, grid.masked_fill_(~present, float("inf"))


def chunk_scores(utility: torch.Tensor, exponent: float, discount: float) -> torch.Tensor:
    """FIITED's pruning score grid from a utility grid: running minimum along the row, ``**exponent``, divided by
    ``(chunk + 1) ** discount``; non-increasing along every row, so the lowest scores are always row tails."""
    score = torch.cummin(utility, dim=1).values.clamp_(min=0).pow_(exponent)
    score.div_((torch.arange(utility.shape[1], dtype=score.dtype) + 1) ** discount)
    return score.masked_fill_(torch.isinf(utility), float("inf"))  # absent chunks stay out of reach


def tail_counts(scores: list[torch.Tensor], excess: int) -> list[torch.Tensor]:
    """Chunks to drop from the tail of every row so that exactly ``excess`` of the lowest scores go (over all
    grids together); ties at the threshold go to later chunks first, so every row keeps a prefix."""
    if excess <= 0:
        return [torch.zeros(s.shape[0], dtype=torch.int64) for s in scores]
    flat = torch.cat([s.reshape(-1) for s in scores])
    threshold = torch.kthvalue(flat, excess).values
    del flat
    drop = [s < threshold for s in scores]
    left = excess - sum(int(d.sum()) for d in drop)
    for c in reversed(range(scores[0].shape[1]) if scores else []):
        for d, s in zip(drop, scores):
            if left <= 0:
                break
            tied = torch.nonzero(s[:, c] == threshold).flatten()[:left]
            d[tied, c] = True
            left -= tied.numel()
    return [d.sum(1) for d in drop]


def whole_rows(row_scores: list[torch.Tensor], row_counts: list[torch.Tensor], excess: int) -> list[torch.Tensor]:
    """AdaEmbed-style: whole rows, lowest score first over all tables, until at least ``excess`` chunks are
    covered. Returns a drop mask per table."""
    drops = [torch.zeros(s.numel(), dtype=torch.bool) for s in row_scores]
    if excess <= 0 or not row_scores:
        return drops
    scores, counts = torch.cat(row_scores), torch.cat(row_counts)
    table = torch.cat([torch.full((s.numel(),), k) for k, s in enumerate(row_scores)])
    local = torch.cat([torch.arange(s.numel()) for s in row_scores])
    order = torch.argsort(scores, stable=True)
    covered = torch.cumsum(counts[order], 0)
    n = min(int(torch.searchsorted(covered, torch.tensor(excess))) + 1, order.numel())
    for k in range(len(drops)):
        pick = order[:n][table[order[:n]] == k]
        drops[k][local[pick]] = True
    return drops
