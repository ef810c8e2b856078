"""An embedding-table collection: the unit that distributed runs shard table-wise (TorchRec's
EmbeddingBagCollection plays this role there)."""
from __future__ import annotations

import torch
from torch import nn


class EmbeddingTables(nn.ModuleList):
    """One embedding module per sparse feature; ``forward(sparse, weights=None) -> [B, dim_f]`` per feature.

    ``sparse`` is ``[B, F]`` (one id per sample and feature, Criteo-style) or ``[B, F, L]`` (a bag of up to ``L``
    ids per sample and feature, padded with -1: multi-hot features); ``weights`` (optional, the shape of ``sparse``)
    weighs each id, as ``nn.EmbeddingBag``'s ``per_sample_weights``. Each table is called as
    ``table(ids, offsets[, per_sample_weights=...])``, so ``nn.EmbeddingBag`` and every FIITED or baseline bag fit.
    Tables are children ``0 .. F-1``: state-dict keys are the same as a plain ``nn.ModuleList``'s, and the same
    whether the collection is sharded or not.
    """

    def forward(self, sparse: torch.Tensor, weights: torch.Tensor | None = None  # type: ignore[override]
                ) -> list[torch.Tensor]:
        check_sparse(sparse, weights, len(self))
        return [table(*bags) for table, bags in zip(self, feature_bags(sparse, weights))]

    def dims(self) -> list[int]:
        """Output width of every table."""
        return [table_dim(t) for t in self]

    def to_batched(self) -> nn.Module | None:
        """One module that serves every table in one call (as FBGEMM's table-batched embeddings do), where the
        tables' class offers one: a ``batched(tables)`` classmethod (FIITED's packed tables). None otherwise, or when
        the tables cannot share one (different classes, dims, storage)."""
        tables = list(self)
        make = getattr(type(tables[0]), "batched", None) if tables else None
        if not callable(make) or any(type(t) is not type(tables[0]) for t in tables):
            return None
        return make(tables)


def table_dim(table: nn.Module) -> int:
    """Width of the vectors a table returns."""
    return int(getattr(table, "embedding_dim"))


def check_sparse(sparse: torch.Tensor, weights: torch.Tensor | None, features: int) -> None:
    """ValueError unless ``sparse`` is ``[B, features]`` or ``[B, features, L]`` and ``weights`` (if any) has its
    shape."""
    if sparse.dim() not in (2, 3) or sparse.shape[1] != features:
        raise ValueError(f"expected sparse ids of shape [batch, {features}] (or [batch, {features}, bag] for "
                         f"multi-hot features), got {tuple(sparse.shape)}")
    if weights is not None and weights.shape != sparse.shape:
        raise ValueError(f"expected weights of the ids' shape {tuple(sparse.shape)}, got {tuple(weights.shape)}")


def feature_bags(sparse: torch.Tensor, weights: torch.Tensor | None) -> list[tuple]:
    """``(ids, offsets[, per_sample_weights])`` of each feature's bags: one id per sample for ``[B, F]`` input (the
    offsets built once for all features), the non-padding (>= 0) ids of each sample for ``[B, F, L]``."""
    out = []
    if sparse.dim() == 2:
        offsets = torch.arange(sparse.shape[0], device=sparse.device)
        for f in range(sparse.shape[1]):
            ids = sparse[:, f].contiguous()
            out.append((ids, offsets) if weights is None else (ids, offsets, weights[:, f].contiguous()))
        return out
    for f in range(sparse.shape[1]):
        slots = sparse[:, f]
        kept = slots >= 0
        counts = kept.sum(1)
        offsets = torch.cumsum(counts, 0) - counts
        out.append((slots[kept], offsets) if weights is None else (slots[kept], offsets, weights[:, f][kept]))
    return out


def feature_major_bags(sparse: torch.Tensor, weights: torch.Tensor | None = None,
                       values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Padded bags ``[B, F, L]`` (-1: padding) laid out feature-major, as a KJT or a table-batched lookup holds
    them: ``(ids, lengths [F * B], weights or None)``. ``values`` (the shape of ``sparse``): taken in place of the
    ids at the same slots, which are still chosen by ``sparse`` (e.g. ids shifted into a batched row space)."""
    major = sparse.transpose(0, 1)
    kept = major >= 0
    taken = major if values is None else values.transpose(0, 1)
    return taken[kept], kept.sum(2).reshape(-1), None if weights is None else weights.transpose(0, 1)[kept]
