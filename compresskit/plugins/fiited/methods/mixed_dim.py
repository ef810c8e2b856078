"""``method: mixed_dim``: static frequency-bucketed tables of different dims with projections (the DLRM
mixed-dimension layout, ``mixed_dim.MixedDimEmbeddingBag``), planned over every table before training."""
from __future__ import annotations

import torch
from torch import nn

from ....data.batches import batches, to_model_inputs
from ..mixed_dim import mixed_dim_tables
from .base import TableMethod, TableSet


class MixedDim(TableMethod):
    """One budget over all tables' frequency buckets, from row counts of one pass over the training data."""

    name = "mixed_dim"
    single_process = True

    def replace(self, model: nn.Module, tables: TableSet, budget_bytes: int, ctx) -> list[nn.Module]:
        if ctx.data is None:
            raise self.error("method", "mixed_dim needs training data to count row frequencies")
        counts = count_rows(model, tables.modules, ctx.data)
        return mixed_dim_tables([m for _, m in tables.modules], [counts[name] for name, _ in tables.modules],
                                budget_bytes, alpha=self.config.mixed_dim_alpha)


def count_rows(model: nn.Module, tables: list[tuple[str, nn.Module]], data) -> dict[str, torch.Tensor]:
    """How often each row of each table is looked up in one pass over the training data."""
    counts = {name: torch.zeros(m.num_embeddings, dtype=torch.int64) for name, m in tables}

    def hook(name):
        def count(module, args, kwargs):   # ids by position, or as input= (TorchRec's collections call so)
            ids = args[0] if args else kwargs["input"]
            counts[name].add_(torch.bincount(ids.reshape(-1), minlength=module.num_embeddings))
        return count

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in tables]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for inputs, label in batches(data.train, 8192):
                model(*to_model_inputs(data.collate, inputs, label)[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts
