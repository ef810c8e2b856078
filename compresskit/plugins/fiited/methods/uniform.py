"""``method: uniform``: every table a narrower plain table (``natural.NarrowEmbeddingBag``), sized before
training."""
from __future__ import annotations

from torch import nn

from ..natural import NarrowEmbeddingBag, uniform_dim_for_budget
from .base import TableMethod, TableSet


class Uniform(TableMethod):
    """The same fraction of each table's dims: ``floor(ratio * dim)`` columns, output zero-padded; no index."""

    name = "uniform"

    def replace(self, model: nn.Module, tables: TableSet, budget_bytes: int, ctx) -> list[nn.Module]:
        ratio = self.config.target_memory_ratio
        twins = []
        for name, m in tables.modules:
            dim = uniform_dim_for_budget(m.num_embeddings, m.embedding_dim,
                                         int(ratio * m.weight.numel() * m.weight.element_size()))
            if dim < 1:
                raise ValueError(f"{ratio} of {name}'s {m.embedding_dim} dims is below one dimension a row")
            twins.append(NarrowEmbeddingBag.from_dense(m, dim))
        return twins
