"""Natural-form tables: the shared base of the baselines that replace a dense table by a smaller one of their own
form, and the uniform baseline.

* :class:`NarrowEmbeddingBag` ("uniform"): one narrower dense table ``[rows, d']``; its output is zero-padded to
  the full dim ``D`` so it drops into a model built for ``D``. Stores ``rows * d'`` values and no index.

Every natural-form table (this one, ``mixed_dim.MixedDimEmbeddingBag`` and the hashing family of ``hashing.py``)
mirrors ``nn.EmbeddingBag`` (1-D input + offsets with or without ``include_last_offset``, 2-D input,
``per_sample_weights``, modes 'sum' / 'mean') or ``nn.Embedding`` (ids of any shape -> ``ids.shape + (D,)``),
whichever it replaces, and reports ``table_bytes()`` measured from its tensors like the FIITED modules.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...table_types import TableBytes
from .embedding import check_dense, replaced_table
from .kernels import check_ids

__all__ = ["NarrowEmbeddingBag", "uniform_dim_for_budget"]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _NaturalBase(nn.Module):
    """Shared options, argument checks and id flattening of the natural-form tables."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str, include_last_offset: bool, bag: bool,
                 sparse: bool) -> None:
        super().__init__()
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got '{mode}'")
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"need num_embeddings >= 1 and embedding_dim >= 1, got {num_embeddings}, "
                             f"{embedding_dim}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.mode, self.include_last_offset, self.bag, self.sparse = mode, include_last_offset, bag, sparse

    def _check_args(self, input: torch.Tensor, offsets: torch.Tensor | None,
                    per_sample_weights: torch.Tensor | None) -> None:
        """ValueError for arguments the replaced module refuses; IndexError for an id outside the table."""
        check_ids(input, self.num_embeddings)
        if not self.bag:
            if offsets is not None or per_sample_weights is not None:
                raise ValueError("this module replaces nn.Embedding: forward(ids) takes no offsets / weights")
            return
        if input.dim() == 2 and offsets is not None:
            raise ValueError("offsets must be None when input is 2-D")
        if input.dim() == 1 and offsets is None:
            raise ValueError("offsets are required when input is 1-D")
        if input.dim() not in (1, 2):
            raise ValueError(f"input must be 1-D or 2-D, got {input.dim()}-D")
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise ValueError("per_sample_weights are only supported with mode='sum' (as in nn.EmbeddingBag)")
            if per_sample_weights.shape != input.shape:
                raise ValueError(f"per_sample_weights shape {tuple(per_sample_weights.shape)} != input shape "
                                 f"{tuple(input.shape)}")

    def _flatten(self, input: torch.Tensor, offsets: torch.Tensor | None,
                 per_sample_weights: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """(ids, bag of each id, weight of each id or None, number of bags)."""
        dev = input.device
        if not self.bag:
            ids = input.reshape(-1)
            return ids, torch.arange(ids.numel(), device=dev), None, ids.numel()
        if input.dim() == 2:
            bags, length = input.shape
            lengths = torch.full((bags,), length, dtype=torch.long, device=dev)
            ids = input.reshape(-1)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
        else:
            offsets = offsets.to(torch.long)
            end = offsets[-1:] if self.include_last_offset else offsets.new_tensor([input.numel()])
            starts = offsets[:-1] if self.include_last_offset else offsets
            bags = starts.numel()
            lengths = torch.diff(torch.cat([starts, end]))
            stop = int(end[0]) if bags else 0
            ids = input[:stop]
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights[:stop]
        bag_of = torch.repeat_interleave(torch.arange(bags, device=dev), lengths)
        weights = per_sample_weights
        if self.mode == "mean":
            weights = 1.0 / lengths.clamp(min=1).to(torch.float32)[bag_of]
        return ids, bag_of, weights, bags

    def table_bytes(self) -> TableBytes:  # pragma: no cover - overridden
        """Bytes measured from the tensors held (``compresskit.table_types``)."""
        raise NotImplementedError

    def to_packed(self) -> "_NaturalBase":
        """This module: the baseline's natural form is already what serving reads (``compresskit export --format
        packed`` keeps it)."""
        return self

    def _options(self) -> dict[str, Any]:
        """The options every natural-form table shares, as constructor arguments."""
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "mode": self.mode,
                "include_last_offset": self.include_last_offset, "bag": self.bag, "sparse": self.sparse}

    def _dense_module(self, weight: torch.Tensor) -> nn.EmbeddingBag | nn.Embedding:
        """The torch module this one replaced (same options), holding ``weight [num_embeddings, embedding_dim]``."""
        if self.bag:
            return nn.EmbeddingBag(self.num_embeddings, self.embedding_dim, mode=self.mode,
                                   include_last_offset=self.include_last_offset, sparse=self.sparse, _weight=weight)
        return nn.Embedding(self.num_embeddings, self.embedding_dim, sparse=self.sparse, _weight=weight)


def uniform_dim_for_budget(num_embeddings: int, embedding_dim: int, budget_bytes: int,
                           element_size: int = 4) -> int:
    """Largest ``d' <= embedding_dim`` with ``num_embeddings * d' * element_size <= budget_bytes`` (0 if none)."""
    return max(0, min(embedding_dim, budget_bytes // (num_embeddings * element_size)))


class NarrowEmbeddingBag(_NaturalBase):
    """Uniform baseline: a ``[num_embeddings, dim]`` table whose output is zero-padded to ``embedding_dim``.

    Args:
        num_embeddings, embedding_dim: shape of the table it replaces (``embedding_dim`` = output width ``D``).
        dim: stored width ``d'`` in ``[1, D]``.
        mode, include_last_offset, sparse: as ``nn.EmbeddingBag`` (modes 'sum', 'mean').
        bag: True to mirror ``nn.EmbeddingBag.forward``, False to mirror ``nn.Embedding.forward``.
        weight: initial ``[num_embeddings, dim]`` values (default N(0, 1) like the torch modules).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dim: int, mode: str = "sum",
                 include_last_offset: bool = False, bag: bool = True, sparse: bool = False,
                 weight: torch.Tensor | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, mode, include_last_offset, bag, sparse)
        if not 1 <= dim <= embedding_dim:
            raise ValueError(f"dim must be in [1, {embedding_dim}], got {dim}")
        self.dim = dim
        if weight is None:
            weight = torch.randn(num_embeddings, dim)
        if tuple(weight.shape) != (num_embeddings, dim):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({num_embeddings}, {dim})")
        self.weight = nn.Parameter(weight.detach().clone())

    @classmethod
    def from_dense(cls, dense: nn.EmbeddingBag | nn.Embedding, dim: int) -> "NarrowEmbeddingBag":
        """Copy the first ``dim`` columns (and the options) of a dense ``nn.EmbeddingBag`` / ``nn.Embedding``."""
        bag = check_dense(dense, cls.__name__)
        return cls(dense.num_embeddings, dense.embedding_dim, dim, mode=dense.mode if bag else "sum",
                   include_last_offset=dense.include_last_offset if bag else False, bag=bag, sparse=dense.sparse,
                   weight=dense.weight.detach()[:, :dim])

    def record_args(self) -> dict[str, Any]:
        """What rebuilds this table from a layout record (``compresskit.layout``); the values come from its
        state dict."""
        return {**self._options(), "dim": self.dim}

    @classmethod
    def from_record(cls, model: nn.Module, name: str, args: dict[str, Any]) -> "NarrowEmbeddingBag":
        """The table :meth:`record_args` describes, with unset values (its state dict fills them)."""
        replaced_table(model, name, args)
        return cls(**args, weight=torch.empty(int(args["num_embeddings"]), int(args["dim"])))

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``nn.EmbeddingBag`` / ``nn.Embedding`` forward (see the class), zero-padded to ``embedding_dim``."""
        self._check_args(input, offsets, per_sample_weights)
        if self.bag:
            out = F.embedding_bag(input, self.weight, offsets, mode=self.mode, sparse=self.sparse,
                                  per_sample_weights=per_sample_weights,
                                  include_last_offset=self.include_last_offset)
        else:
            out = F.embedding(input, self.weight, sparse=self.sparse)
        return F.pad(out, (0, self.embedding_dim - self.dim))

    def to_dense(self) -> nn.EmbeddingBag | nn.Embedding:
        """The equivalent ``nn.EmbeddingBag`` / ``nn.Embedding`` (same options): the table zero-padded to
        ``embedding_dim`` columns, so it loads into the model this module replaced."""
        weight = F.pad(self.weight.detach(), (0, self.embedding_dim - self.dim))
        return self._dense_module(weight)

    def table_bytes(self) -> TableBytes:
        """Bytes measured from the tensors held: payload (the table); no index, no training state."""
        return TableBytes(_tensor_bytes(self.weight))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, dim={self.dim}, mode={self.mode!r}, "
                f"bag={self.bag}")
