"""Chunk importance and the choice of what to prune, shared by FIITED and its baselines.

FIITED's chunk utility follows the paper: ``u <- gamma * u + a * g`` every step, where ``a * g`` is the chunk's
access count times its mean per-access gradient magnitude, i.e. the norm of the chunk's accumulated gradient in
that step. Rows keep a *prefix* of chunks, so a chunk's pruning score is the minimum utility over itself and the
chunks before it (tail chunks of unimportant rows go first).
"""
from __future__ import annotations

import torch

from .embedding import UTILITY, FiitedEmbeddingBag


def accumulate_utility(module: FiitedEmbeddingBag, decay: float) -> None:
    """Fold this step's chunk gradient norms into the module's decayed per-slot utility."""
    store = module.store
    util = getattr(store, UTILITY)
    grad = store.pool.grad
    util.mul_(decay)
    if grad is None:
        return
    if grad.is_sparse:
        grad = grad.coalesce()
        util.index_add_(0, grad.indices()[0], grad.values().norm(dim=1).to(util.dtype))
    else:
        util.add_(grad.norm(dim=1).to(util.dtype))


def prefix_scores(rows: torch.Tensor, chunks: torch.Tensor, values: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Per-entry score = min of ``values`` over the chunks ``0..chunk`` of the same row (running minimum)."""
    if rows.numel() == 0:
        return values
    uniq, inv = torch.unique(rows, return_inverse=True)
    grid = torch.full((uniq.numel(), num_chunks), float("inf"), dtype=values.dtype)
    grid[inv, chunks] = values
    grid = torch.cummin(grid, dim=1).values
    return grid[inv, chunks]


def row_sums(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per-entry score = sum of ``values`` over all stored chunks of the entry's row (whole-row importance)."""
    if rows.numel() == 0:
        return values
    uniq, inv = torch.unique(rows, return_inverse=True)
    totals = torch.zeros(uniq.numel(), dtype=values.dtype).index_add_(0, inv, values)
    return totals[inv]


def lowest(scores: torch.Tensor, chunks: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` lowest scores; ties go to the later chunk first (keeps rows as prefixes)."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long)
    by_chunk = torch.argsort(chunks, descending=True, stable=True)
    by_score = torch.argsort(scores[by_chunk], stable=True)
    return by_chunk[by_score[:count]]


def lowest_rows(scores: torch.Tensor, rows: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the entries of whole rows, lowest row score first, covering at least ``count`` entries.

    ``rows`` must identify rows globally (e.g. offset per module) and ``scores`` be constant within a row.
    """
    if count <= 0:
        return torch.empty(0, dtype=torch.long)
    uniq, inv = torch.unique(rows, return_inverse=True)
    row_score = torch.zeros(uniq.numel(), dtype=scores.dtype).scatter_reduce(0, inv, scores, "amax",
                                                                             include_self=False)
    order = torch.argsort(row_score, stable=True)
    covered = torch.cumsum(torch.bincount(inv, minlength=uniq.numel())[order], 0)
    n_rows = min(int(torch.searchsorted(covered, torch.tensor(count))) + 1, uniq.numel())
    chosen = torch.zeros(uniq.numel(), dtype=torch.bool)
    chosen[order[:n_rows]] = True
    return torch.nonzero(chosen[inv]).flatten()
