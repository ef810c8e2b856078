"""Chunk importance and the choice of what to prune (and regrow), for FIITED and the AdaEmbed baseline.

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

ROW_BATCH = 1 << 18     # rows a batch when reading utilities (bounds a pruning round's temporary memory)
KTHVALUE_LIMIT = 1 << 20   # above this many scores the threshold is found by bisection, without copies of them


def per_access(module: FiitedEmbeddingBag, rows: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``grid`` (utilities of ``rows``) divided by ``1 + `` each row's decayed access count, in place: a chunk's
    gradient per access, what the row needs rather than how often it is seen (the one is a prior access, so a row
    seen once is not ranked on one sample's gradient alone). Needs ``module.track_access()``."""
    return grid.div_((1.0 + module.row_accesses(rows)).float()[:, None])


WEIGHT_SIGNALS = ("magnitude", "gradient_weight")   # utilities that read the chunks' weights at the pruning round


def chunk_weight_norms(module: FiitedEmbeddingBag, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``[len(rows), num_chunks]`` norms of the chunks at ``slots`` (``rows``' chunk grid, flattened) as the model
    serves them: a row in the FP32 hot-row cache from the cache, whose values are the master copy (its codes in the
    store are stale until the row leaves the cache)."""
    norms = module.store.read(slots, rows.repeat_interleave(module.num_chunks)).norm(dim=1).view(
        rows.numel(), module.num_chunks)
    cache = getattr(module, "cache", None)
    if cache is not None:
        hit, pos = cache.positions(rows)
        if bool(hit.any()):
            norms[hit] = cache.dense_rows(pos[hit]).view(-1, module.num_chunks, module.chunk_size).norm(dim=2)
    return norms


def chunk_utilities(module: FiitedEmbeddingBag, by_access: bool = False, signal: str = "gradient"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stored rows, their chunk counts, utility grid ``[rows, num_chunks]`` with ``+inf`` for absent chunks);
    ``by_access``: utilities :func:`per_access`. ``signal``: ``gradient`` (the decayed gradient utility),
    ``magnitude`` (each chunk's weight norm) or ``gradient_weight`` (their product: a bound on the first-order loss
    change of removing the chunk, sum over steps of ``|g . w|``)."""
    rows = torch.nonzero(module.store.row_counts()).flatten()
    cnt = torch.empty_like(rows)
    grid = torch.empty(rows.numel(), module.num_chunks)
    j = torch.arange(module.num_chunks)
    for start in range(0, rows.numel(), ROW_BATCH):     # a batch of rows at a time: slot grids stay small
        part = slice(start, start + ROW_BATCH)
        first, cnt[part] = module.store.row_slots(rows[part])
        present = j[None, :] < cnt[part, None]
        slots = torch.where(present, first[:, None] + j, 0)
        flat = slots.reshape(-1)
        if signal == "gradient":
            values = module.utilities(flat).float().view(-1, module.num_chunks)
        else:
            values = chunk_weight_norms(module, rows[part], flat)
            if signal == "gradient_weight":
                values.mul_(module.utilities(flat).float().view(-1, module.num_chunks))
        grid[part] = values.masked_fill_(~present, float("inf"))
    if by_access:
        per_access(module, rows, grid)
    return rows, cnt, grid


def regrowth_grid(module: FiitedEmbeddingBag, by_access: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunk_utilities` plus each row's *candidate*: its first missing chunk, with the utility the row earned
    for it while it was missing (``FiitedEmbeddingBag.track_candidates('chunk')``), in the column after its stored
    prefix. Rows with no stored chunk but a candidate are included. Returns (rows, chunks a row would hold if its
    candidate came back, grid); a row's candidate counts only when its utility is positive. ``by_access``: every
    utility :func:`per_access`."""
    counts = module.store.row_counts()
    candidate = module.candidate_utilities(torch.arange(module.num_embeddings))
    open_ = (counts < module.num_chunks) & (candidate > 0)
    rows = torch.nonzero((counts > 0) | open_).flatten()
    first, cnt = module.store.row_slots(rows)
    j = torch.arange(module.num_chunks)
    present = j[None, :] < cnt[:, None]
    if module.store.capacity:
        slots = torch.where(present, first[:, None] + j, 0)
        grid = module.utilities(slots.reshape(-1)).view(-1, module.num_chunks).float()
        grid.masked_fill_(~present, float("inf"))
    else:   # every chunk of the table was pruned: only candidates are left
        grid = torch.full((rows.numel(), module.num_chunks), float("inf"))
    has = open_[rows]
    at = torch.nonzero(has).flatten()
    grid[at, cnt[at]] = candidate[rows[at]].float()
    if by_access:
        per_access(module, rows, grid)
    return rows, cnt + has.long(), grid


def chunk_scores(utility: torch.Tensor, exponent: float, discount: float, inplace: bool = False) -> torch.Tensor:
    """FIITED's pruning score grid from a utility grid: running minimum along the row, ``**exponent``, divided by
    ``(chunk + 1) ** discount``; non-increasing along every row, so the lowest scores are always row tails.
    ``inplace``: computed in ``utility``'s memory (a pruning round over large tables holds one grid, not two)."""
    absent = torch.isinf(utility)
    score = utility if inplace else utility.clone()
    for c in range(1, score.shape[1]):     # the running minimum in place (cummin would add an int64 index grid)
        torch.minimum(score[:, c], score[:, c - 1], out=score[:, c])
    score.clamp_(min=0).pow_(exponent)
    score.div_((torch.arange(utility.shape[1], dtype=score.dtype) + 1) ** discount)
    return score.masked_fill_(absent, float("inf"))  # absent chunks stay out of reach


_DIGITS = (7, 8, 8, 8)      # a non-negative float's 31 bits (the sign dropped), highest first: one count a digit


def kth_smallest(values: list[torch.Tensor], k: int, coll=None, weights: list[torch.Tensor] | None = None
                 ) -> float:
    """The smallest ``t`` such that the (weighted) count of values ``<= t`` over every rank reaches ``k``: the
    k-th smallest value. Values are non-negative (``+inf`` allowed). One process, unweighted, up to 2^20 values:
    ``torch.kthvalue`` over their concatenation. Otherwise (several ranks, weights, or more values than a copy
    should take): a radix select over the bit patterns of non-negative floats (their order is the integer order):
    per digit (7, 8, 8, 8 bits, highest first) one pass counting the digit among the values that share the digits
    found so far, ``ROW_BATCH`` rows at a time, and one (all-reduced) count of 128 or 256 bins, so every rank gets
    the same exact threshold."""
    if (coll is None or not coll.distributed) and weights is None and sum(v.numel() for v in values) <= KTHVALUE_LIMIT:
        flat = torch.cat([v.reshape(-1) for v in values]) if values else torch.zeros(0)
        return float(torch.kthvalue(flat, k).values)
    prefix, shift = 0, 31
    for width in _DIGITS:
        shift -= width
        counts = torch.zeros(1 << width, dtype=torch.int64 if weights is None else torch.float64)
        for i, v in enumerate(values):
            for start in range(0, v.shape[0], ROW_BATCH):
                bits = v[start:start + ROW_BATCH].contiguous().view(torch.int32) & 0x7FFFFFFF   # -0.0 is 0.0
                w = None if weights is None else weights[i][start:start + ROW_BATCH].double()
                if shift + width < 31:
                    match = (bits >> (shift + width)) == prefix
                    bits = bits[match]
                    w = None if w is None else w[match]          # weights: one a value, shaped alike
                counts += torch.bincount(((bits >> shift) & ((1 << width) - 1)).reshape(-1),
                                         weights=None if w is None else w.reshape(-1), minlength=1 << width)
        if coll is not None and coll.distributed:
            coll.all_reduce(counts)
        below = torch.cumsum(counts, 0)
        digit = int(torch.searchsorted(below, torch.tensor(k, dtype=below.dtype)))   # first reaching k
        k -= below[digit - 1].item() if digit else 0
        prefix = (prefix << width) | digit
    return float(torch.tensor([prefix], dtype=torch.int32).view(torch.float32))


def tail_counts(scores: list[torch.Tensor], excess: int, coll=None, table_ids: list[int] | None = None,
                num_tables: int | None = None, num_chunks: int | None = None) -> list[torch.Tensor]:
    """Chunks to drop from the tail of every row so that exactly ``excess`` of the lowest scores go (over all
    grids together, on every rank when ``coll`` is distributed); ties at the threshold go to later chunks first,
    then to earlier tables (``table_ids``: each grid's position in the global table order), then to earlier rows,
    so every row keeps a prefix and the choice does not depend on how tables are spread over ranks. Counts per row
    are built table by table (no drop mask over every grid)."""
    if excess <= 0:
        return [torch.zeros(s.shape[0], dtype=torch.int64) for s in scores]
    sum_all = coll.sum if coll is not None else (lambda x: x)
    table_ids = list(range(len(scores))) if table_ids is None else table_ids
    num_tables = len(scores) if num_tables is None else num_tables
    width = max([s.shape[1] for s in scores], default=0) if num_chunks is None else num_chunks
    threshold = kth_smallest(scores, excess, coll)
    cuts = [(s < threshold).sum(1) for s in scores]
    left = excess - sum_all(sum(int(c.sum()) for c in cuts))
    ties = torch.zeros(num_tables, width, dtype=torch.int64)
    for t, s in zip(table_ids, scores):
        ties[t, :s.shape[1]] = (s == threshold).sum(0)
    if coll is not None:
        coll.all_reduce(ties)
    take = _tied_drops(ties, left)
    for t, s, cut in zip(table_ids, scores, cuts):
        for c in torch.nonzero(take[t]).flatten().tolist():   # a tied chunk is never below: the row's cut grows
            cut[torch.nonzero(s[:, c] == threshold).flatten()[:int(take[t, c])]] += 1
    return cuts


def _tied_drops(ties: torch.Tensor, left: int) -> torch.Tensor:
    """How many of the ``ties [tables, chunks]`` at the threshold each (table, chunk) gives up, ``left`` in all:
    later chunks first, then earlier tables."""
    take = torch.zeros_like(ties)
    for c in reversed(range(ties.shape[1])):
        for t in range(ties.shape[0]):
            if left <= 0:
                return take
            take[t, c] = min(left, int(ties[t, c]))
            left -= int(take[t, c])
    return take


def whole_rows(row_scores: list[torch.Tensor], row_counts: list[torch.Tensor], excess: int, coll=None,
               table_ids: list[int] | None = None, num_tables: int | None = None) -> list[torch.Tensor]:
    """AdaEmbed-style: whole rows, lowest score first over all tables (and ranks), until at least ``excess``
    chunks are covered; ties go to earlier tables, then earlier rows. Returns a drop mask per table."""
    drops = [torch.zeros(s.numel(), dtype=torch.bool) for s in row_scores]
    if excess <= 0:
        return drops
    table_ids = list(range(len(row_scores))) if table_ids is None else table_ids
    num_tables = len(row_scores) if num_tables is None else num_tables
    threshold = kth_smallest(row_scores, excess, coll, weights=row_counts)
    below = [s < threshold for s in row_scores]
    covered = sum(int(c[b].sum()) for b, c in zip(below, row_counts))
    tied = torch.zeros(num_tables, dtype=torch.int64)
    for t, s, c in zip(table_ids, row_scores, row_counts):
        tied[t] = c[s == threshold].sum()
    if coll is not None:
        covered = coll.sum(covered)
        coll.all_reduce(tied)
    before = covered + torch.cumsum(tied, 0) - tied      # chunks covered before each table's tied rows
    for k, (t, s, c) in enumerate(zip(table_ids, row_scores, row_counts)):
        drops[k] = below[k].clone()
        at = torch.nonzero(s == threshold).flatten()
        if at.numel():
            start = int(before[t]) + torch.cumsum(c[at], 0) - c[at]   # covered just before each tied row
            drops[k][at[start < excess]] = True
    return drops


def normalised_importance(importance: torch.Tensor, percentile: float = 0.95) -> torch.Tensor:
    """AdaEmbed's per-feature normalisation: a table's row importances divided by their ``percentile`` over the
    rows seen so far (importance > 0), so that one global threshold serves tables of different scales."""
    seen = importance[importance > 0]
    if seen.numel() == 0:
        return importance.clone()
    scale = float(torch.quantile(seen.double(), percentile)) if seen.numel() <= 1 << 24 else float(
        torch.kthvalue(seen, max(1, int(percentile * seen.numel()))).values)
    return importance / max(scale, 1e-30)
