"""An embedding-table collection: the unit that distributed runs shard table-wise (TorchRec's
EmbeddingBagCollection plays this role there)."""
from __future__ import annotations

import torch
from torch import nn


class EmbeddingTables(nn.ModuleList):
    """One embedding module per sparse feature; ``forward(sparse [B, F]) -> [B, dim_f]`` per feature.

    Each table is called as ``table(ids, offsets)`` with one id per sample (Criteo-style single-valued features),
    so ``nn.EmbeddingBag`` and every FIITED or baseline bag fit. Tables are children ``0 .. F-1``: state-dict keys
    are the same as a plain ``nn.ModuleList``'s, and the same whether the collection is sharded or not.
    """

    def forward(self, sparse: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        if sparse.dim() != 2 or sparse.shape[1] != len(self):
            raise ValueError(f"expected sparse ids of shape [batch, {len(self)}], got {tuple(sparse.shape)}")
        offsets = torch.arange(sparse.shape[0], device=sparse.device)
        return [table(sparse[:, i].contiguous(), offsets) for i, table in enumerate(self)]

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
