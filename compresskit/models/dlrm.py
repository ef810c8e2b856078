"""DLRM (Naumov et al., 2019): bottom MLP on dense features, one EmbeddingBag per sparse feature, pairwise dot
interaction, top MLP producing one logit."""
from __future__ import annotations

import os
from typing import Annotated, Sequence

import torch
from torch import nn

from ..schema import Range
from . import register_model
from .materialize import machine_bytes, skip_draws, tables_to_build
from .tables import EmbeddingTables


def mlp(sizes: list[int], final_activation: bool) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ReLU between (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """Deep Learning Recommendation Model with dot interaction; ``forward(dense, sparse) -> logits [B]``.

    ``sparse`` is an int64 tensor [B, num_features] of one id per feature (Criteo-style single-valued features), or
    [B, num_features, L] of bags padded with -1 (multi-hot features); ``weights`` (optional, the shape of
    ``sparse``) weighs each id, as the ``csv``/``libfm`` loaders give it for weighted values.
    ``tables`` (optional) are the embedding modules to use, one per feature, each called as ``table(ids, offsets)``
    (as TorchRec's DLRM takes its EmbeddingBagCollection); by default, ``nn.EmbeddingBag`` tables are built
    (``sparse=True``: sparse gradients, as a recommendation user would train them). ``self.embeddings`` is an
    :class:`EmbeddingTables` collection, which distributed runs shard table-wise.
    """

    def __init__(self, num_dense: int, cardinalities: list[int], embedding_dim: int = 16,
                 bottom_mlp: list[int] | None = None, top_mlp: list[int] | None = None,
                 tables: Sequence[nn.Module] | None = None, sparse: bool = False) -> None:
        super().__init__()
        bottom = list(bottom_mlp or [64])
        top = list(top_mlp or [64])
        self.embedding_dim = embedding_dim
        self.bottom = mlp([num_dense, *bottom, embedding_dim], final_activation=True) if num_dense else None
        if tables is None:   # in a sharded run only this rank's tables get memory (materialize.py)
            build = tables_to_build([c * embedding_dim * 4 for c in cardinalities])
            built = []
            for c, mine in zip(cardinalities, build):   # every table's own init first, then every DLRM init
                built.append(nn.EmbeddingBag(c, embedding_dim, mode="sum", sparse=sparse,
                                             device=None if mine else "meta"))
                if not mine:
                    skip_draws(c * embedding_dim, "normal")
            self.embeddings = EmbeddingTables(built)
            for emb, mine in zip(self.embeddings, build):
                bound = emb.num_embeddings ** -0.5
                emb.init_std = bound / 3 ** 0.5     # the scale a lazy table made in place of this one starts at
                if mine:
                    nn.init.uniform_(emb.weight, -bound, bound)
                else:
                    skip_draws(emb.num_embeddings * embedding_dim, "uniform")
        else:
            if len(tables) != len(cardinalities):
                raise ValueError(f"got {len(tables)} tables for {len(cardinalities)} sparse features")
            self.embeddings = EmbeddingTables(tables)
        n = len(cardinalities) + (1 if num_dense else 0)
        self._tri = torch.triu_indices(n, n, offset=1)
        top_in = n * (n - 1) // 2 + (embedding_dim if num_dense else 0)
        self.top = mlp([top_in, *top, 1], final_activation=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor, weights: torch.Tensor | None = None
                ) -> torch.Tensor:
        vectors = list(self.embeddings(sparse) if weights is None else self.embeddings(sparse, weights))
        if self.bottom is not None:
            x = self.bottom(dense)
            vectors.insert(0, x)
        t = torch.stack(vectors, dim=1)                       # [B, n, d]
        inter = torch.bmm(t, t.transpose(1, 2))[:, self._tri[0], self._tri[1]]
        z = torch.cat([x, inter], dim=1) if self.bottom is not None else inter
        return self.top(z).squeeze(-1)


@register_model("dlrm")
def dlrm(num_dense: Annotated[int, Range(0, 1_000_000)], cardinalities: Annotated[list[int], Range(1, 2**31 - 1)],
         embedding_dim: Annotated[int, Range(1, 4096)] = 16,
         bottom_mlp: Annotated[list[int] | None, Range(1, 65536)] = None,
         top_mlp: Annotated[list[int] | None, Range(1, 65536)] = None, sparse: bool = False) -> DLRM:
    """DLRM; ``num_dense`` and ``cardinalities`` are filled from the dataset when omitted. ``sparse``: sparse
    gradients for the ``nn.EmbeddingBag`` tables."""
    sizes = [c * embedding_dim * 4 for c in cardinalities]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for t, size in enumerate(sizes):     # whole tables go to one rank: one bigger than half the machine fits none
        if size > memory // 2:
            raise ValueError(f"table {t} ({cardinalities[t]:,} rows x {embedding_dim}) needs {size / 2**30:,.2f} GiB, "
                             f"more than half of this machine's {memory / 2**30:,.1f} GiB: no process or rank can "
                             f"hold it whole")
    need = machine_bytes(sizes)          # every table in one process; this machine's ranks' tables when sharded
    if need > memory // 2:
        raise ValueError(f"the embedding tables need {need / 2**30:,.1f} GiB (sum(cardinalities) x embedding_dim x "
                         f"4 bytes{' over the ranks on this machine' if need < sum(sizes) else ''}), more than "
                         f"half of this machine's {memory / 2**30:,.1f} GiB")
    return DLRM(num_dense, cardinalities, embedding_dim, bottom_mlp, top_mlp, sparse=sparse)
