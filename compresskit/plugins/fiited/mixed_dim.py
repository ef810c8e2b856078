"""The mixed-dimension baseline (Ginart et al., *Mixed Dimension Embeddings with Application to Memory-Efficient
Recommendation Systems*, laid out as the DLRM repository's ``md_embedding``).

Rows are partitioned by access frequency into buckets; bucket ``i`` is a table of its rows with dim ``d_i`` plus a
projection ``Linear(d_i -> D, bias=False)`` (none when ``d_i == D``); an int32 remap turns a row id into its bucket
and local index. :func:`plan_mixed_dims` fits one table to its own budget; :func:`plan_mixed_dims_tables` /
:func:`mixed_dim_tables` fit all tables of a model to one model-wide budget (one global scale over every table's
buckets), so tiny tables are not starved by a per-table share.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...table_types import TableBytes
from .embedding import check_dense, replaced_table
from .natural import _NaturalBase, _tensor_bytes

__all__ = ["MixedDimEmbeddingBag", "plan_mixed_dims", "plan_mixed_dims_tables", "mixed_dim_tables"]

_INT32_MAX = 2**31 - 1


def _bucket_starts(sorted_counts: torch.Tensor, num_buckets: int) -> list[int]:
    """Boundaries (K+1 values) splitting frequency-sorted rows into buckets of about equal access mass.

    Greedy: bucket ``j`` ends at the first row where it holds its equal share of the accesses not yet taken,
    ``(total - taken) / (K - j)``, keeping at least one row for itself and for each later bucket (so a head
    row that alone exceeds a share does not starve the buckets after it).
    """
    n = sorted_counts.numel()
    k = min(num_buckets, n)
    cum = torch.cumsum(sorted_counts, 0)
    total = float(cum[-1])
    starts, prev, taken = [0], 0, 0.0
    for j in range(k - 1):
        target = taken + (total - taken) / (k - j)
        end = int(torch.searchsorted(cum, torch.tensor([target * (1 - 1e-12)], dtype=cum.dtype))) + 1
        end = min(max(end, prev + 1), n - (k - 1 - j))
        starts.append(end)
        prev, taken = end, float(cum[end - 1])
    starts.append(n)
    return starts


def _bucket_elems(rows, dim, embedding_dim: int):
    """Stored values of one bucket: its table plus its projection (none at full dim; dim 0 = dropped, nothing).

    Works elementwise on ints or on broadcastable integer tensors alike.
    """
    return rows * dim + dim * embedding_dim * ((dim > 0) & (dim < embedding_dim))


def _cheapest_dim(rows: int, embedding_dim: int) -> int:
    """Dim at which a bucket of ``rows`` rows stores the fewest values (1, or full width for a single row)."""
    return min(range(1, embedding_dim + 1), key=lambda d: int(_bucket_elems(rows, d, embedding_dim)))


def _index_bytes(num_embeddings: int, num_buckets: int) -> int:
    """Bytes of the remap (int32, int64 only past 2**31 rows) plus the int64 bucket boundaries."""
    remap_es = 4 if num_embeddings - 1 <= _INT32_MAX else 8
    return num_embeddings * remap_es + (num_buckets + 1) * 8


def _split_buckets(counts: torch.Tensor, num_buckets: int, what: str = "counts"
                   ) -> tuple[torch.Tensor, list[int], list[int], list[float]]:
    """Frequency buckets of one table: ``(order, starts, sizes, pops)``.

    ``pops[i]`` = mean accesses per row of bucket ``i`` / total accesses of the table (the access probability
    of one of its rows per lookup of the table), non-increasing in ``i``. All-zero counts read as uniform.
    """
    if counts.dim() != 1 or counts.numel() < 1:
        raise ValueError(f"{what} must be a non-empty 1-D tensor, got shape {tuple(counts.shape)}")
    c = counts.detach().to(torch.float64).cpu()
    if bool((c < 0).any()) or not bool(torch.isfinite(c).all()):
        raise ValueError(f"{what} must be finite and non-negative")
    if float(c.sum()) == 0:
        c = torch.ones_like(c)  # no information: every row equally popular
    sorted_counts, order = torch.sort(c, descending=True, stable=True)
    starts = _bucket_starts(sorted_counts, num_buckets)
    k = len(starts) - 1
    sizes = [starts[i + 1] - starts[i] for i in range(k)]
    total = float(sorted_counts.sum())
    pops = [float(sorted_counts[starts[i]:starts[i + 1]].sum()) / (sizes[i] * total) for i in range(k)]
    return order, starts, sizes, pops


def _drop_sequence(pops: list[list[float]]) -> list[tuple[int, int]]:
    """``(table, bucket)`` in the order buckets are dropped: globally least popular first (ties: later bucket,
    then later table), always a table's last kept bucket, never a table's bucket 0."""
    last = [len(p) - 1 for p in pops]
    seq = []
    while True:
        cand = [(pops[t][last[t]], -last[t], -t) for t in range(len(pops)) if last[t] > 0]
        if not cand:
            return seq
        _, j, t = min(cand)
        seq.append((-t, -j))
        last[-t] -= 1


def plan_mixed_dims_tables(counts: list[torch.Tensor], embedding_dim: int, budget_bytes: int, num_buckets: int = 4,
                           alpha: float = 0.5, element_size: int | list[int] = 4
                           ) -> list[tuple[torch.Tensor, list[int], list[int]]]:
    """Mixed-dim plan for several tables under one model-wide byte budget (DLRM: one lookup per table per sample).

    Each table is split into frequency buckets as in :func:`plan_mixed_dims`; a bucket's popularity ``p`` = mean
    accesses per row / total accesses of its table, comparable across tables. One global scale ``s`` sets
    ``d = clamp(round(s * (p / p_max)**alpha), 1, D)`` for every (table, bucket), taking the largest ``s`` for
    which the sum over tables of index (int32 remap + int64 boundaries) + payload (tables + projections, none at
    full dim, ``element_size`` bytes per value: one int or one per table) fits ``budget_bytes``. If no scale
    fits, the globally least popular buckets are dropped first (dim 0, rows read as zeros); a table always keeps
    its bucket 0. Raises ValueError (budget and minimum) when even every table's bucket 0 alone does not fit.

    Returns one ``(order, starts, dims)`` per table, as :func:`plan_mixed_dims`.
    """
    sizes = _check_plan_args(counts, embedding_dim, num_buckets, alpha, element_size)
    name = "counts" if len(counts) == 1 else "counts[{}]"
    buckets = _Buckets([_split_buckets(c, num_buckets, name.format(t)) for t, c in enumerate(counts)],
                       embedding_dim, alpha, sizes)
    dims = buckets.largest_fitting_dims(budget_bytes)
    if dims is None:
        raise ValueError(buckets.below_minimum(budget_bytes))
    return buckets.per_table(dims)


def _check_plan_args(counts: list[torch.Tensor], embedding_dim: int, num_buckets: int, alpha: float,
                     element_size: int | list[int]) -> list[int]:
    """ValueError for arguments no plan can take; the element size of each table."""
    if isinstance(counts, torch.Tensor) or len(counts) < 1:
        raise ValueError("counts must be a non-empty list of 1-D tensors, one per table")
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    sizes = [element_size] * len(counts) if isinstance(element_size, int) else list(element_size)
    if len(sizes) != len(counts) or any(int(e) < 1 for e in sizes):
        raise ValueError(f"element_size must be a positive int or one per table ({len(counts)}), got {element_size}")
    return sizes


class _Buckets:
    """Every (table, bucket) of a plan in one flat view, with the bytes each choice of dims costs."""

    def __init__(self, splits: list[tuple[torch.Tensor, list[int], list[int], list[float]]], embedding_dim: int,
                 alpha: float, element_sizes: list[int]) -> None:
        self.splits, self.d_full = splits, embedding_dim
        self.index = sum(_index_bytes(order.numel(), len(sizes)) for order, _, sizes, _ in splits)
        self.flat = [(t, j) for t, sp in enumerate(splits) for j in range(len(sp[2]))]
        self.pos = {tj: b for b, tj in enumerate(self.flat)}
        p_ref = max(p for sp in splits for p in sp[3])  # > 0: bucket 0 of a table holds its most accessed row
        self.w = torch.tensor([(splits[t][3][j] / p_ref) ** alpha for t, j in self.flat],   # 0 ** 0 == 1
                              dtype=torch.float64)
        self.rows = torch.tensor([splits[t][2][j] for t, j in self.flat], dtype=torch.int64)
        self.elem = torch.tensor([int(element_sizes[t]) for t, _ in self.flat], dtype=torch.int64)
        # candidate scales: every point where some rounded dim steps up; bytes are not monotone in the scale (a
        # bucket reaching D drops its projection), so the largest feasible scale is searched, not bisected
        steps = torch.arange(1, embedding_dim + 1, dtype=torch.float64) - 0.5
        pos_w = self.w[self.w > 0]
        self.scales = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64),
                                              (steps[None, :] / pos_w[:, None]).reshape(-1)]))  # ascending
        self.chunk = max(1, 2**20 // len(self.flat))
        self.keep = torch.ones(len(self.flat), dtype=torch.int64)

    def dims_at(self, s: torch.Tensor) -> torch.Tensor:
        """[S] scales -> [S, B] dims of the kept buckets (0 for dropped ones)."""
        raw = torch.floor(s[:, None] * self.w[None, :] * (1 + 1e-12) + 0.5).clamp_(1, self.d_full)
        return raw.to(torch.int64) * self.keep[None, :]

    def bytes_at(self, dims: torch.Tensor) -> torch.Tensor:
        """[S, B] dims -> [S] total bytes: index plus every bucket's table and projection."""
        return self.index + (_bucket_elems(self.rows[None, :], dims, self.d_full) * self.elem[None, :]).sum(1)

    def per_table(self, dims: torch.Tensor) -> list[tuple[torch.Tensor, list[int], list[int]]]:
        """One ``(order, starts, dims)`` per table."""
        dl = dims.tolist()
        return [(order, starts, [dl[self.pos[(t, j)]] for j in range(len(sizes))])
                for t, (order, starts, sizes, _) in enumerate(self.splits)]

    def largest_fitting_dims(self, budget_bytes: int) -> torch.Tensor | None:
        """The dims at the largest scale that fits ``budget_bytes`` with as many buckets kept as fit (the least
        popular dropped first); None when even every table's bucket 0 alone does not fit."""
        cheapest = [int(_bucket_elems(n, _cheapest_dim(n, self.d_full), self.d_full)) * int(e)
                    for n, e in zip(self.rows.tolist(), self.elem.tolist())]
        lower = self.index + sum(cheapest)  # no scale can store the kept buckets for less
        drops = _drop_sequence([sp[3] for sp in self.splits])
        for level in range(len(drops) + 1):
            if level:
                b = self.pos[drops[level - 1]]
                self.keep[b] = 0
                lower -= cheapest[b]
            if lower > budget_bytes:
                continue
            for hi in range(self.scales.numel(), 0, -self.chunk):
                dims = self.dims_at(self.scales[max(0, hi - self.chunk):hi])
                ok = (self.bytes_at(dims) <= budget_bytes).nonzero()
                if ok.numel():
                    return dims[int(ok[-1])]
        return None

    def below_minimum(self, budget_bytes: int) -> str:
        """Why nothing fits: the budget against the minimum, every table's bucket 0 alone at the cheapest dims one
        global scale allows (after :meth:`largest_fitting_dims` dropped every other bucket)."""
        best, best_dims = None, None
        for lo in range(0, self.scales.numel(), self.chunk):
            total = self.bytes_at(dims := self.dims_at(self.scales[lo:lo + self.chunk]))
            i = int(torch.argmin(total))  # first minimum: the smallest scale, hence the smallest dims
            if best is None or int(total[i]) < best:
                best, best_dims = int(total[i]), dims[i]
        num_tables, d_full = len(self.splits), self.d_full
        heads = [(t, self.splits[t][2][0], int(best_dims[self.pos[(t, 0)]])) for t in range(num_tables)]
        what = "the most frequent bucket alone at its cheapest dim" if num_tables == 1 else \
            "each table's most frequent bucket alone at the cheapest dims one global scale allows"
        parts = "; ".join(f"{'' if num_tables == 1 else f'table {t}: '}{n} rows at dim {d}"
                          f"{' with its projection' if d < d_full else ''}" for t, n, d in heads[:3])
        if len(heads) > 3:
            parts += f"; and {len(heads) - 3} more tables"
        tables = "" if num_tables == 1 else f" over {num_tables} tables"
        return (f"mixed-dim budget of {budget_bytes} bytes{tables} is below the minimum of {best} bytes "
                f"(remap index {self.index} bytes + {what}, {best - self.index} bytes: {parts})")


def plan_mixed_dims(counts: torch.Tensor, embedding_dim: int, budget_bytes: int, num_buckets: int = 4,
                    alpha: float = 0.5, element_size: int = 4) -> tuple[torch.Tensor, list[int], list[int]]:
    """Frequency buckets and their dims for :class:`MixedDimEmbeddingBag` (see its docstring for the rules).

    Returns ``(order, starts, dims)``: ``order`` the row ids sorted by count (descending, ties by id), bucket ``i``
    holding rows ``order[starts[i]:starts[i + 1]]`` with dim ``dims[i]`` (0 = bucket dropped, reads as zeros).
    Raises ValueError when even the most frequent bucket alone, at its cheapest dim, does not fit ``budget_bytes``.
    The one-table case of :func:`plan_mixed_dims_tables`.
    """
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"counts must be a tensor, got {type(counts).__name__} (use plan_mixed_dims_tables)")
    return plan_mixed_dims_tables([counts], embedding_dim, budget_bytes, num_buckets, alpha, element_size)[0]


class MixedDimEmbeddingBag(_NaturalBase):
    """Mixed-dimension baseline (Ginart et al.; the DLRM ``md_embedding`` layout) on frequency buckets.

    Bucket split: rows sorted by access count (descending, ties by id) are cut into ``num_buckets`` buckets of
    about equal total accesses: greedily, each bucket takes an equal share of the accesses left by the buckets
    before it (each keeps at least one row; fewer buckets when there are fewer rows). With that
    split every bucket carries about the same access mass, as each per-feature table does in DLRM (one lookup per
    sample), so ``d_i ~ p_i**alpha`` reduces to DLRM's ``alpha_power_rule`` ``d_i ~ n_i**-alpha``; the hot head
    becomes a few rows with a wide dim and the long tail a large, narrow table.

    Dim rule: ``p_i`` = mean access probability of a row of bucket ``i``;
    ``d_i = clamp(round(s * (p_i / p_0)**alpha), 1, D)``, with the scale ``s`` the largest for which
    ``payload + index <= budget_bytes`` (payload = tables + projections, element size of the dense weight;
    index = the remap, int32 per row (int64 past 2**31 rows), plus ``K + 1`` int64 bucket boundaries). The most
    frequent bucket therefore gets the largest dim. Bytes are not monotone in ``s`` (a bucket reaching ``D``
    loses its ``d_i x D`` projection, so a small bucket can be cheaper at full width), hence every scale at
    which a rounded dim changes is tried and the largest that fits is kept. If no scale fits with every bucket
    kept, the rarest buckets are dropped one at a time (their rows then read as zeros and get no gradient) and
    the survivors' dims re-fitted; ValueError (naming the budget and the minimum) when even bucket 0 alone, at
    its cheapest dim, does not fit. Buckets with no accesses at all get ``d_i = 1`` when ``alpha > 0``.

    Model-wide budget (:func:`plan_mixed_dims_tables`): the same rule with ``p`` normalised per table (mean
    accesses per row / the table's total accesses, i.e. per-sample access probability when every table is looked
    up once per sample), one scale for every (table, bucket), the sum of all tables' bytes against the budget,
    and the globally least popular buckets dropped first (every table keeps its bucket 0).

    Init (:meth:`from_dense`): bucket tables take the first ``d_i`` columns of their dense rows and projections
    are ``[I; 0]``, so before training the output equals the dense output with each row truncated to ``d_i``.

    Args:
        num_embeddings, embedding_dim: shape of the table replaced (output width ``D``).
        order, starts, dims: the plan of :func:`plan_mixed_dims` (one table, its own budget) or one entry of
            :func:`plan_mixed_dims_tables` (all tables, one model-wide budget; see :func:`mixed_dim_tables`).
        mode, include_last_offset, sparse, bag: as :class:`NarrowEmbeddingBag` (``sparse`` applies to tables).
        weight: dense ``[num_embeddings, D]`` values to copy (default N(0, 1)).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, order: torch.Tensor, starts: list[int],
                 dims: list[int], mode: str = "sum", include_last_offset: bool = False, bag: bool = True,
                 sparse: bool = False, weight: torch.Tensor | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, mode, include_last_offset, bag, sparse)
        if order.numel() != num_embeddings or len(starts) != len(dims) + 1 or starts[0] != 0 \
                or starts[-1] != num_embeddings or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError("order / starts / dims do not describe a partition of the rows into non-empty buckets")
        if any(not 0 <= d <= embedding_dim for d in dims) or dims[0] == 0 \
                or any(b > 0 and a == 0 for a, b in zip(dims, dims[1:])):
            raise ValueError(f"dims must be in [1, {embedding_dim}] (0 only for trailing dropped buckets), got "
                             f"{dims}")
        if weight is None:
            weight = torch.randn(num_embeddings, embedding_dim)
        if tuple(weight.shape) != (num_embeddings, embedding_dim):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({num_embeddings}, {embedding_dim})")
        self.dims = list(dims)
        self.kept = sum(d > 0 for d in dims)
        order = order.to(device=weight.device, dtype=torch.long)
        remap_dtype = torch.int32 if num_embeddings - 1 <= _INT32_MAX else torch.int64
        remap = torch.empty(num_embeddings, dtype=remap_dtype, device=weight.device)
        remap[order] = torch.arange(num_embeddings, dtype=remap_dtype, device=weight.device)
        self.register_buffer("remap", remap)  # row id -> rank in frequency order (bucket + local index)
        self.register_buffer("bucket_starts", torch.tensor(starts, dtype=torch.int64, device=weight.device))
        self.tables = nn.ParameterList()
        self.projections = nn.ModuleList()
        w = weight.detach()
        for i in range(self.kept):
            d = dims[i]
            self.tables.append(nn.Parameter(w[order[starts[i]:starts[i + 1]], :d].clone()))
            if d < embedding_dim:
                proj = nn.Linear(d, embedding_dim, bias=False, device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    proj.weight.zero_()
                    proj.weight[:d].copy_(torch.eye(d, dtype=w.dtype, device=w.device))
                self.projections.append(proj)
            else:
                self.projections.append(nn.Identity())

    @classmethod
    def from_dense(cls, dense: nn.EmbeddingBag | nn.Embedding, counts: torch.Tensor, budget_bytes: int,
                   num_buckets: int = 4, alpha: float = 0.5) -> "MixedDimEmbeddingBag":
        """Plan buckets and dims from per-row access ``counts`` to fit ``budget_bytes``, and copy ``dense``."""
        check_dense(dense, cls.__name__)
        if counts.numel() != dense.num_embeddings:
            raise ValueError(f"counts has {counts.numel()} entries, the table {dense.num_embeddings} rows")
        order, starts, dims = plan_mixed_dims(counts.reshape(-1), dense.embedding_dim, budget_bytes, num_buckets,
                                              alpha, dense.weight.element_size())
        return cls.from_plan(dense, order, starts, dims)

    @classmethod
    def from_plan(cls, dense: nn.EmbeddingBag | nn.Embedding, order: torch.Tensor, starts: list[int],
                  dims: list[int]) -> "MixedDimEmbeddingBag":
        """Copy ``dense`` (values and options) into the buckets of a precomputed plan: one ``(order, starts,
        dims)`` of :func:`plan_mixed_dims` or of :func:`plan_mixed_dims_tables`."""
        bag = check_dense(dense, cls.__name__)
        return cls(dense.num_embeddings, dense.embedding_dim, order, starts, dims,
                   mode=dense.mode if bag else "sum", include_last_offset=dense.include_last_offset if bag else False,
                   bag=bag, sparse=dense.sparse, weight=dense.weight.detach())

    def record_args(self) -> dict[str, Any]:
        """What rebuilds this table's buckets from a layout record (``compresskit.layout``): boundaries and dims;
        the row order (``remap``), tables and projections come from its state dict."""
        return {**self._options(), "starts": [int(s) for s in self.bucket_starts.tolist()], "dims": list(self.dims)}

    @classmethod
    def from_record(cls, model: nn.Module, name: str, args: dict[str, Any]) -> "MixedDimEmbeddingBag":
        """The buckets :meth:`record_args` describes, with unset values (its state dict fills them)."""
        replaced_table(model, name, args)
        rows, dim = int(args["num_embeddings"]), int(args["embedding_dim"])
        return cls(**args, order=torch.arange(rows), weight=torch.empty(rows, dim))

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``nn.EmbeddingBag`` / ``nn.Embedding`` forward (see the class); rows of dropped buckets read zeros."""
        self._check_args(input, offsets, per_sample_weights)
        ids, bag_of, weights, bags = self._flatten(input, offsets, per_sample_weights)
        rank = self.remap[ids].to(torch.long)
        bucket = torch.searchsorted(self.bucket_starts[1:], rank, right=True)
        local = rank - self.bucket_starts[bucket]
        out = self.tables[0].new_zeros(bags, self.embedding_dim)
        for i in range(self.kept):
            sel = (bucket == i).nonzero().squeeze(1)
            vec = self.projections[i](F.embedding(local[sel], self.tables[i], sparse=self.sparse))
            if weights is not None:
                vec = vec * weights[sel].to(vec.dtype)[:, None]
            out = out.index_add(0, bag_of[sel], vec)
        if not self.bag:
            return out.view(*input.shape, self.embedding_dim)
        return out

    @torch.no_grad()
    def to_dense(self) -> nn.EmbeddingBag | nn.Embedding:
        """The dense equivalent (same options): row ``r`` is its bucket row times the bucket's projection (zeros in
        a dropped bucket), so it equals this module's output up to float rounding."""
        by_rank = self.tables[0].new_zeros(self.num_embeddings, self.embedding_dim)
        starts = self.bucket_starts.tolist()
        for i in range(self.kept):
            by_rank[starts[i]:starts[i + 1]] = self.projections[i](self.tables[i].detach())
        return self._dense_module(by_rank[self.remap.long()])

    def table_bytes(self) -> TableBytes:
        """Bytes measured from the tensors held: payload (tables + projections), index (remap + boundaries)."""
        payload = sum(_tensor_bytes(t) for t in self.tables)
        payload += sum(_tensor_bytes(p.weight) for p in self.projections if isinstance(p, nn.Linear))
        return TableBytes(payload, _tensor_bytes(self.remap) + _tensor_bytes(self.bucket_starts))

    def extra_repr(self) -> str:
        sizes = [int(b - a) for a, b in zip(self.bucket_starts[:-1], self.bucket_starts[1:])]
        return (f"{self.num_embeddings}, {self.embedding_dim}, bucket_rows={sizes}, dims={self.dims}, "
                f"mode={self.mode!r}, bag={self.bag}")


def mixed_dim_tables(denses: list[nn.Module], counts: list[torch.Tensor], budget_bytes: int, num_buckets: int = 4,
                     alpha: float = 0.5) -> list[MixedDimEmbeddingBag]:
    """Mixed-dim twins of several dense tables fitted to one model-wide ``budget_bytes`` (the sum of their
    ``table_bytes().serving``), planned by :func:`plan_mixed_dims_tables` from per-row access ``counts``."""
    if len(denses) != len(counts) or not denses:
        raise ValueError(f"need one counts tensor per dense table, got {len(denses)} tables and {len(counts)} counts")
    for t, (dense, c) in enumerate(zip(denses, counts)):
        check_dense(dense, MixedDimEmbeddingBag.__name__)
        if c.numel() != dense.num_embeddings:
            raise ValueError(f"counts[{t}] has {c.numel()} entries, table {t} {dense.num_embeddings} rows")
    dims = {dense.embedding_dim for dense in denses}
    if len(dims) != 1:
        raise ValueError(f"all tables need the same embedding_dim for one global plan, got {sorted(dims)}")
    plans = plan_mixed_dims_tables([c.reshape(-1) for c in counts], dims.pop(), budget_bytes, num_buckets, alpha,
                                   [dense.weight.element_size() for dense in denses])
    return [MixedDimEmbeddingBag.from_plan(dense, *plan) for dense, plan in zip(denses, plans)]
