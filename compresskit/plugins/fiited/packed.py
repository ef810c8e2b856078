"""Inference-only FIITED tables: what a pruned :class:`FiitedEmbeddingBag` needs to serve, and nothing else.

A :class:`PackedEmbeddingBag` holds three buffers, the chunk store's layout (``store.py``) with the pool packed:

    values [live_chunks, chunk_size]   every stored chunk, rows in order, each row's chunks contiguous
    counts [8 * blocks] uint8          stored chunks of every row (padded to whole blocks of 8 rows)
    base   [blocks] int64              slot of the first chunk of each block of 8 rows

    slot(r) = base[r // 8] + counts[8 * (r // 8)] + ... + counts[r - 1]

No utilities, no optimizer state, no Parameters (nothing for autograd). The forward pass is plain torch ops
(gathers, masks, ``index_add``), so the module runs without compresskit's C++ kernels and goes through
``torch.export``. It mirrors ``nn.EmbeddingBag`` (modes 'sum' / 'mean', 1-D input with offsets, with or without
``include_last_offset``, 2-D input, ``per_sample_weights``) and :class:`PackedEmbedding` mirrors ``nn.Embedding``;
an id outside ``[0, num_embeddings)`` raises ``IndexError`` as ``nn.Embedding`` does.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .kernels import BLOCK, check_ids


def _tracing() -> bool:
    """Whether torch.export / torch.compile is tracing (a data-dependent Python check cannot run then)."""
    return torch.compiler.is_compiling()


class PackedEmbeddingBag(nn.Module):
    """Pruned FIITED table for inference: ``values``, ``counts`` and ``base`` buffers (module docstring).

    Args:
        num_embeddings, embedding_dim, mode, include_last_offset: as ``nn.EmbeddingBag`` (modes 'sum', 'mean').
        chunk_size: values per chunk (divides ``embedding_dim``).
        live_chunks: chunks stored (rows of ``values``).
        dtype: of ``values``.

    Build one from a trained table with :meth:`FiitedEmbeddingBag.to_packed`; the constructor alone gives an
    empty shell of the right shapes for ``load_state_dict`` (``compresskit.export.load_packed`` does that).
    """

    bag = True

    def __init__(self, num_embeddings: int, embedding_dim: int, chunk_size: int, live_chunks: int,
                 mode: str = "sum", include_last_offset: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got '{mode}'")
        if chunk_size < 1 or embedding_dim % chunk_size:
            raise ValueError(f"chunk_size {chunk_size} must divide embedding_dim {embedding_dim}")
        if not 0 <= live_chunks <= num_embeddings * (embedding_dim // chunk_size):
            raise ValueError(f"live_chunks must be in [0, {num_embeddings * (embedding_dim // chunk_size)}], "
                             f"got {live_chunks}")
        self.num_embeddings, self.embedding_dim, self.chunk_size = num_embeddings, embedding_dim, chunk_size
        self.num_chunks = embedding_dim // chunk_size
        self.mode, self.include_last_offset = mode, include_last_offset
        blocks = (num_embeddings + BLOCK - 1) // BLOCK
        self.register_buffer("values", torch.zeros(live_chunks, chunk_size, dtype=dtype))
        self.register_buffer("counts", torch.zeros(blocks * BLOCK, dtype=torch.uint8))
        self.register_buffer("base", torch.zeros(blocks, dtype=torch.int64))

    @classmethod
    def from_store(cls, store: Any, mode: str = "sum", include_last_offset: bool = False) -> "PackedEmbeddingBag":
        """Copy a :class:`ChunkStore`'s stored chunks, packed (holes left by moves are dropped; quantized chunks as
        FP32), and its counts."""
        rows, _, slots = store.entries()            # ordered by row, then chunk: the packed order
        packed = cls(store.num_rows, store.num_chunks * store.chunk_size, store.chunk_size, slots.numel(),
                     mode=mode, include_last_offset=include_last_offset,
                     dtype=torch.float32 if store.quantized else store.pool.dtype)
        packed.values.copy_(store.read(slots))
        packed.counts.copy_(store.counts)
        totals = packed.counts.view(-1, BLOCK).sum(1, dtype=torch.int64)
        packed.base.copy_(torch.cumsum(totals, 0) - totals)
        return packed

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable: ``dtype`` by name) that rebuild this module's shapes."""
        args = {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "chunk_size": self.chunk_size, "live_chunks": int(self.values.shape[0]),
                "dtype": str(self.values.dtype).removeprefix("torch.")}
        if self.bag:
            args.update(mode=self.mode, include_last_offset=self.include_last_offset)
        return args

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: ``values`` (payload), ``index`` (counts + block bases) and their ``total``; ``dense``: the
        bytes of the unpruned table it stands for."""
        values = self.values.numel() * self.values.element_size()
        index = self.counts.numel() * self.counts.element_size() + self.base.numel() * self.base.element_size()
        dense = self.num_embeddings * self.embedding_dim * self.values.element_size()
        return {"values": values, "index": index, "total": values + index, "dense": dense}

    def dense(self) -> torch.Tensor:
        """The full ``[num_embeddings, embedding_dim]`` table, pruned dims as zeros."""
        return self._rows(torch.arange(self.num_embeddings))

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``[len(ids), embedding_dim]``: each id's stored chunks, pruned dims as zeros. Ids outside the table
        raise IndexError (eagerly with compresskit's message; when traced, from the gather itself)."""
        if not _tracing():
            check_ids(ids, self.num_embeddings)
        n = ids.shape[0]
        if self.values.shape[0] == 0:                      # everything pruned: a static shape, fine to branch on
            return self.values.new_zeros(n, self.embedding_dim)
        inside = (ids >= 0) & (ids < self.num_embeddings)
        # an id outside the table is sent past the end of ``counts``: index_select raises IndexError there
        safe = torch.where(inside, ids, self.counts.shape[0])
        count = self.counts.index_select(0, safe).long()                                  # [n]
        block = safe >> 3
        in_block = torch.arange(BLOCK, device=ids.device)
        mine = self.counts.view(-1, BLOCK).index_select(0, block).long()                 # [n, 8]
        before = (mine * (in_block[None, :] < (safe & (BLOCK - 1))[:, None])).sum(1)
        first = self.base.index_select(0, block) + before                                 # [n]
        chunk = torch.arange(self.num_chunks, device=ids.device)
        kept = chunk[None, :] < count[:, None]                                            # [n, chunks]
        slots = torch.where(kept, first[:, None] + chunk[None, :], 0)
        vec = self.values.index_select(0, slots.reshape(-1)).view(n, self.num_chunks, self.chunk_size)
        return (vec * kept[:, :, None].to(vec.dtype)).reshape(n, self.embedding_dim)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``nn.EmbeddingBag.forward``: pooled ``[bags, embedding_dim]``."""
        if per_sample_weights is not None and self.mode != "sum":
            raise ValueError("per_sample_weights are only supported with mode='sum' (as in nn.EmbeddingBag)")
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when input is 2-D")
            bags, length = input.shape
            ids = input.reshape(-1).long()
            bag_of = torch.arange(bags, device=ids.device)[:, None].expand(bags, length).reshape(-1)
            weight = None if per_sample_weights is None else per_sample_weights.reshape(-1)
            if self.mode == "mean":
                weight = torch.ones(ids.shape[0], dtype=self.values.dtype, device=ids.device) / length
        elif input.dim() == 1:
            if offsets is None:
                raise ValueError("offsets are required when input is 1-D")
            ids = input.long()
            offsets = offsets.long()
            n = ids.shape[0]
            starts = offsets[:-1] if self.include_last_offset else offsets
            end = offsets[-1:] if self.include_last_offset else torch.full((1,), n, device=ids.device)
            bags = starts.shape[0]
            position = torch.arange(n, device=ids.device)
            bag_of = torch.searchsorted(starts, position, right=True) - 1
            inside = (bag_of >= 0) & (position < end)      # ids past the last offset belong to no bag
            bag_of = bag_of.clamp(min=0)
            weight = inside.to(self.values.dtype)
            if per_sample_weights is not None:
                weight = weight * per_sample_weights.to(self.values.dtype)
            if self.mode == "mean":
                lengths = torch.diff(torch.cat([starts, end]))
                weight = weight / lengths.clamp(min=1).to(self.values.dtype).index_select(0, bag_of)
        else:
            raise ValueError(f"input must be 1-D or 2-D, got {input.dim()}-D")
        vec = self._rows(ids)
        if weight is not None:
            vec = vec * weight.to(vec.dtype)[:, None]
        return vec.new_zeros(bags, self.embedding_dim).index_add(0, bag_of, vec)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, chunk_size={self.chunk_size}, mode={self.mode!r}, "
                f"live_chunks={self.values.shape[0]}")


class PackedEmbedding(PackedEmbeddingBag):
    """:class:`PackedEmbeddingBag` as an ``nn.Embedding``: ``forward(ids of any shape) -> ids.shape + (dim,)``."""

    bag = False

    def __init__(self, num_embeddings: int, embedding_dim: int, chunk_size: int, live_chunks: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(num_embeddings, embedding_dim, chunk_size, live_chunks, dtype=dtype)

    @classmethod
    def from_store(cls, store: Any, mode: str = "sum", include_last_offset: bool = False) -> "PackedEmbedding":
        """Copy a :class:`ChunkStore` (see :meth:`PackedEmbeddingBag.from_store`); ``mode`` and
        ``include_last_offset`` are ignored (an ``nn.Embedding`` has neither)."""
        packed = PackedEmbeddingBag.from_store(store)
        out = cls(packed.num_embeddings, packed.embedding_dim, packed.chunk_size, packed.values.shape[0],
                  dtype=packed.values.dtype)
        out.load_state_dict(packed.state_dict())
        return out

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``nn.Embedding.forward``."""
        return self._rows(input.reshape(-1).long()).view(*input.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, chunk_size={self.chunk_size}, "
                f"live_chunks={self.values.shape[0]}")


PACKED_CLASSES = {cls.__name__: cls for cls in (PackedEmbeddingBag, PackedEmbedding)}
