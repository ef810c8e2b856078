"""Drop-in ``nn.EmbeddingBag`` / ``nn.Embedding`` replacements backed by a :class:`VHPIStore`.

Before any pruning the modules compute exactly what the dense modules compute. After pruning, a row reads its
missing chunks as zeros and gradients reach only the chunks that are stored.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .store import VHPIStore

UTILITY = "utility"


class _PoolBagSum(torch.autograd.Function):
    """Weighted bag sums over the chunk pool; the backward is one ``index_add_`` of per-entry gradients.

    ``F.embedding_bag``'s own dense backward does per-row bookkeeping over the whole pool, which is slow for a pool
    of many short rows (chunks); this keeps the backward at the cost of zeroing the gradient plus the scatter.
    """

    @staticmethod
    def forward(ctx, pool, slots, offsets, weights, sparse):
        ctx.save_for_backward(slots, offsets, weights)
        ctx.pool_shape, ctx.sparse = pool.shape, sparse
        return F.embedding_bag(slots, pool, offsets, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad_out):
        slots, offsets, weights = ctx.saved_tensors
        lengths = torch.diff(offsets, append=offsets.new_tensor([slots.numel()]))
        bag_of = torch.repeat_interleave(torch.arange(offsets.numel(), device=slots.device), lengths)
        entries = grad_out.index_select(0, bag_of) * weights[:, None]
        if ctx.sparse:
            grad = torch.sparse_coo_tensor(slots[None], entries, ctx.pool_shape, check_invariants=False)
        else:
            grad = entries.new_zeros(ctx.pool_shape).index_add_(0, slots, entries)
        return grad, None, None, None, None


class FiitedEmbeddingBag(nn.Module):
    """``nn.EmbeddingBag`` with per-row variable dimension (a prefix of chunks) stored in a VHPI chunk store.

    Args:
        num_embeddings, embedding_dim, mode, include_last_offset: as ``nn.EmbeddingBag`` (modes 'sum', 'mean').
        chunk_size: values per chunk; must divide ``embedding_dim``.
        weight: initial dense table to copy (default: N(0, 1) like ``nn.EmbeddingBag``).
        lazy: start empty and allocate a row's chunks when training first touches it (for tables too large to
            materialise); ``capacity`` then bounds the pool (chunk slots).
        sparse: produce sparse gradients for the pool (use with SGD / Adagrad, as ``nn.EmbeddingBag(sparse=True)``).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, chunk_size: int = 8, mode: str = "sum",
                 include_last_offset: bool = False, weight: torch.Tensor | None = None, lazy: bool = False,
                 capacity: int | None = None, sparse: bool = False, load_factor: float = 0.75,
                 init_std: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got '{mode}'")
        if chunk_size < 1 or embedding_dim % chunk_size:
            raise ValueError(f"chunk_size {chunk_size} must divide embedding_dim {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.chunk_size = num_embeddings, embedding_dim, chunk_size
        self.num_chunks = embedding_dim // chunk_size
        self.mode, self.include_last_offset, self.sparse, self.lazy = mode, include_last_offset, sparse, lazy
        self.init_std = init_std
        full = num_embeddings * self.num_chunks
        if lazy:
            cap = capacity if capacity is not None else full
            self.store = VHPIStore(num_embeddings, self.num_chunks, chunk_size, capacity=cap, max_capacity=cap,
                                   load_factor=load_factor)
            self.register_buffer("seen", torch.zeros(num_embeddings, dtype=torch.bool))
            self._gen = torch.Generator().manual_seed(seed)
        else:
            self.store = VHPIStore(num_embeddings, self.num_chunks, chunk_size, capacity=full,
                                   load_factor=load_factor)
            if weight is None:
                weight = torch.randn(num_embeddings, embedding_dim) * init_std
            if tuple(weight.shape) != (num_embeddings, embedding_dim):
                raise ValueError(f"weight shape {tuple(weight.shape)} != ({num_embeddings}, {embedding_dim})")
            rows = torch.arange(num_embeddings).repeat_interleave(self.num_chunks)
            chunks = torch.arange(self.num_chunks).repeat(num_embeddings)
            self.store.insert(rows, chunks, weight.detach().reshape(-1, chunk_size))
        self.store.register_slot_buffer(UTILITY)
        self.counts: torch.Tensor | None = None  # access counts while counting is on (see count_accesses)
        self.new_slots: list[torch.Tensor] = []  # slots allocated lazily since the last optimizer step

    @classmethod
    def from_dense(cls, dense: nn.EmbeddingBag, chunk_size: int, **kwargs) -> "FiitedEmbeddingBag":
        """Copy an ``nn.EmbeddingBag`` (its weights and options) into a FIITED bag."""
        unsupported = {"max_norm": dense.max_norm, "padding_idx": dense.padding_idx}
        for name, value in unsupported.items():
            if value is not None:
                raise ValueError(f"{name}={value} is not supported by FiitedEmbeddingBag")
        if dense.mode not in ("sum", "mean"):
            raise ValueError(f"mode '{dense.mode}' is not supported (only 'sum' and 'mean')")
        return cls(dense.num_embeddings, dense.embedding_dim, chunk_size, mode=dense.mode,
                   include_last_offset=dense.include_last_offset, weight=dense.weight.detach(),
                   sparse=dense.sparse, **kwargs)

    # ----------------------------------------------------------------------------------------------- forward
    def _allocate_rows(self, rows: torch.Tensor) -> None:
        """Lazy mode: give never-seen rows all their chunks while free slots last."""
        rows = rows[~self.seen[rows]]
        if rows.numel() == 0:
            return
        n_fit = min(rows.numel(), self.store.free_slots // self.num_chunks)
        rows = rows[:n_fit]
        if n_fit == 0:
            return
        c = self.num_chunks
        values = torch.randn(n_fit * c, self.chunk_size, generator=self._gen) * self.init_std
        slots = self.store.insert(rows.repeat_interleave(c), torch.arange(c).repeat(n_fit), values)
        self.seen[rows] = True
        self.new_slots.append(slots)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when input is 2-D")
            bags, length = input.shape
            offsets = torch.arange(0, bags * length, length, device=input.device)
            input = input.reshape(-1)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
        elif input.dim() == 1:
            if offsets is None:
                raise ValueError("offsets are required when input is 1-D")
            if self.include_last_offset:
                offsets = offsets[:-1]
        else:
            raise ValueError(f"input must be 1-D or 2-D, got {input.dim()}-D")
        if per_sample_weights is not None and self.mode != "sum":
            raise ValueError("per_sample_weights are only supported with mode='sum' (as in nn.EmbeddingBag)")
        n, bags, c, cs = input.numel(), offsets.numel(), self.num_chunks, self.chunk_size
        pool = self.store.pool
        if n == 0 or pool.shape[0] == 0:
            return pool.new_zeros(bags, self.embedding_dim) + 0 * pool.sum()

        uniq, inverse = torch.unique(input, return_inverse=True)
        if self.lazy and self.training:
            self._allocate_rows(uniq)
        if self.counts is not None:
            self.counts.index_add_(0, uniq, torch.bincount(inverse, minlength=uniq.numel()).to(self.counts.dtype))
        slots = self.store.lookup_rows(uniq)[inverse]                   # [n, c], -1 = chunk not stored
        weight = (slots >= 0).to(pool.dtype)
        if per_sample_weights is not None:
            weight = weight * per_sample_weights.to(pool.dtype)[:, None]
        if self.mode == "mean":
            lengths = torch.diff(offsets, append=offsets.new_tensor([n]))
            bag_of = torch.repeat_interleave(torch.arange(bags, device=input.device), lengths)
            weight = weight / lengths.clamp(min=1).to(pool.dtype)[bag_of][:, None]
        # chunk-major layout: bag (chunk j, bag b) holds the j-th chunk of every id in bag b
        flat_slots = slots.clamp(min=0).t().reshape(-1)
        flat_weight = weight.t().reshape(-1)
        flat_offsets = (offsets[None, :] + torch.arange(c, device=input.device)[:, None] * n).reshape(-1)
        if flat_weight.requires_grad:  # gradient w.r.t. per_sample_weights wanted: torch's own path
            out = F.embedding_bag(flat_slots, pool, flat_offsets, mode="sum", sparse=self.sparse,
                                  per_sample_weights=flat_weight)
        else:
            out = _PoolBagSum.apply(pool, flat_slots, flat_offsets, flat_weight, self.sparse)
        return out.view(c, bags, cs).permute(1, 0, 2).reshape(bags, c * cs)

    # ----------------------------------------------------------------------------------------------- helpers
    def row_chunk_counts(self) -> torch.Tensor:
        """Number of stored chunks of every row (int64 [num_embeddings])."""
        rows, _, _ = self.store.entries()
        return torch.bincount(rows, minlength=self.num_embeddings)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense table (pruned chunks as zeros)."""
        return self.store.dense()

    def count_accesses(self, on: bool) -> None:
        """Start (zeroed) or stop counting how often each row is looked up."""
        self.counts = torch.zeros(self.num_embeddings, dtype=torch.float64) if on else None

    def memory_bytes(self) -> dict[str, int]:
        """Store bytes (payload / index / stats) plus the lazy 'seen' bitmap in the index figure."""
        mem = self.store.memory_bytes()
        if self.lazy:
            extra = self.seen.numel() * self.seen.element_size()
            mem["index"] += extra
            mem["metadata"] += extra
            mem["total"] += extra
        return mem

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, chunk_size={self.chunk_size}, mode={self.mode!r}, "
                f"stored_chunks={self.store.live}/{self.num_embeddings * self.num_chunks}")


class FiitedEmbedding(FiitedEmbeddingBag):
    """``nn.Embedding`` drop-in: ``forward(ids of any shape) -> ids.shape + (embedding_dim,)``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, chunk_size: int = 8, **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, chunk_size, mode="sum", **kwargs)

    @classmethod
    def from_dense(cls, dense: nn.Embedding, chunk_size: int, **kwargs) -> "FiitedEmbedding":
        """Copy an ``nn.Embedding`` into a FIITED embedding."""
        for name in ("max_norm", "padding_idx"):
            if getattr(dense, name) is not None:
                raise ValueError(f"{name}={getattr(dense, name)} is not supported by FiitedEmbedding")
        return cls(dense.num_embeddings, dense.embedding_dim, chunk_size, weight=dense.weight.detach(),
                   sparse=dense.sparse, **kwargs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        flat = input.reshape(-1)
        out = super().forward(flat, torch.arange(flat.numel(), device=input.device))
        return out.view(*input.shape, self.embedding_dim)


def fiited_modules(model: nn.Module) -> Iterator[tuple[str, FiitedEmbeddingBag]]:
    """(name, module) for every FIITED embedding in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FiitedEmbeddingBag):
            yield name, module


def convert_embeddings(model: nn.Module, chunk_size: int = 8, include: list[str] | None = None,
                       **kwargs) -> list[str]:
    """Swap every ``nn.EmbeddingBag`` / ``nn.Embedding`` (whose name matches a pattern in ``include``, if given)
    for its FIITED twin, copying weights. Returns the converted module names."""
    import fnmatch

    converted = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.EmbeddingBag, nn.Embedding)):
            continue
        if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            continue
        if module.embedding_dim % chunk_size:
            raise ValueError(f"{name}: embedding_dim {module.embedding_dim} is not a multiple of chunk_size "
                             f"{chunk_size}")
        twin_cls = FiitedEmbeddingBag if isinstance(module, nn.EmbeddingBag) else FiitedEmbedding
        model.set_submodule(name, twin_cls.from_dense(module, chunk_size, **kwargs))
        converted.append(name)
    return converted
