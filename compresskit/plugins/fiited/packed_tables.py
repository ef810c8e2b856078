"""Table-batched serving: every packed table of a model's table collection in one store, one op call a batch.

A DLRM looks up one id per feature in each of its tables (``EmbeddingTables``: Criteo has 26). Served table by
table, that is 26 module calls, 26 op calls and 26 output tensors a batch; FBGEMM's TBE serves them all in one
kernel call. :class:`PackedTables` does the same with FIITED's packed layout (``packed.py``): the tables' stores
are laid end to end in one global row space,

    global row = row_offsets[t] + id        (row_offsets: the rows of the tables before t)

with the tables' chunks in that row order, so one index (``row_index.py``) over the whole row space finds every
table's rows, and one cache bitmap its cached rows (ids shifted the same way). A batch ``sparse [B, F]`` becomes
one call of ``compresskit::packed_bag`` over ``F * B`` single-id bags in feature-major order, whose
``[F * B, dim]`` output is viewed as ``F`` tensors ``[B, dim]``: what ``EmbeddingTables`` returns. An id outside its own table's rows raises
``IndexError`` (it never reads the next table's rows): in eager mode with the feature named; in an exported
program such an id becomes -1, which the op refuses.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...models.tables import check_sparse, feature_major_bags
from ...table_types import TableBytes
from .packed import (PackedEmbeddingBag, adopt_cache_shapes, check_cache_index, flat_packed_cache, packed_bytes,
                     register_packed_buffers)
from .packed_op import MODES, PACKED_BAG, cache_index
from .row_index import packed_bases
from .chunk_codec import STORAGE_BITS

__all__ = ["PackedTables"]


class PackedTables(nn.Module):
    """The packed tables of one table collection (``EmbeddingTables``) served by one op call.

    Args:
        rows: each table's ``num_embeddings`` (table ``t`` answers feature ``t``).
        embedding_dim, chunk_size, storage, scales: shared by every table (``'fp32'``, ``'int8'`` or ``'int4'``;
            ``'chunk'`` or ``'row'``: ``PackedEmbeddingBag``'s).
        live_chunks: chunks stored over all tables.
        cached_rows: FP32 hot rows over all tables (quantized storage only).
        cached_chunks: chunks those rows store (in the cache).

    Build one with :meth:`batched` from the tables' :class:`PackedEmbeddingBag` forms; the constructor alone gives
    an empty shell for ``load_state_dict``. Every tensor is a saved buffer, so :meth:`table_bytes` is the bytes of
    the state dict: the tables' values and index, and one cache bitmap over the whole row space.
    """

    def __init__(self, rows: list[int], embedding_dim: int, chunk_size: int, live_chunks: int,
                 storage: str = "fp32", cached_rows: int = 0, scales: str = "chunk", cached_chunks: int = 0) -> None:
        super().__init__()
        if not rows or any(int(r) < 1 for r in rows):
            raise ValueError(f"rows must list at least one table of at least one row, got {rows}")
        self.rows = [int(r) for r in rows]
        self.num_rows = sum(self.rows)
        register_packed_buffers(self, self.num_rows, embedding_dim, chunk_size, live_chunks, storage, cached_rows,
                                scales, cached_chunks)
        self.embedding_dim, self.chunk_size, self.storage = embedding_dim, chunk_size, storage
        self.bits = STORAGE_BITS.get(storage, 32)
        starts = [0]
        for r in self.rows[:-1]:
            starts.append(starts[-1] + r)
        self.register_buffer("row_offsets", torch.tensor(starts, dtype=torch.int64), persistent=False)
        self.register_buffer("row_limits", torch.tensor(self.rows, dtype=torch.int64), persistent=False)

    @classmethod
    def batched(cls, tables: list[nn.Module]) -> "PackedTables | None":
        """One module serving ``tables`` (the packed forms of a collection's tables, in feature order), or None
        when they cannot share one store: not all :class:`PackedEmbeddingBag` (bag form) without
        ``include_last_offset``, or different dims, chunk sizes, storage or scale layouts. Mode does not matter: a
        bag of one id has the same sum and mean."""
        first = tables[0] if tables else None
        if first is None or any(type(t) is not PackedEmbeddingBag or t.include_last_offset or
                                (t.embedding_dim, t.chunk_size, t.storage, t.scale_layout) !=
                                (first.embedding_dim, first.chunk_size, first.storage, first.scale_layout)
                                for t in tables):
            return None
        out = cls([t.num_embeddings for t in tables], first.embedding_dim, first.chunk_size,
                  sum(t.live_chunks for t in tables), first.storage, sum(int(t.cache_ids.numel()) for t in tables),
                  first.scale_layout, sum(int(t.cache_values.numel()) for t in tables) // first.chunk_size)
        values, codes, scales, cache_ids, cache_values, cache_starts = [], [], [], [], [], []
        before = 0      # cached chunks of the tables before this one
        for t, start in zip(tables, out.row_offsets.tolist()):
            out.counts[start:start + t.num_embeddings] = t.counts[:t.num_embeddings]
            values.append(t.values)
            codes.append(t.codes)
            scales.append(t.scales[:t.num_embeddings] if t.scale_layout == "row" else t.scales)
            cache_ids.append(t.cache_ids + start)
            cache_values.append(t.cache_values)
            if t.cache_ids.numel():
                cache_starts.append(t.cache_starts[1:] + before)
                before += int(t.cache_starts[-1])
        out.base.copy_(packed_bases(out.counts))
        out.values.copy_(torch.cat(values))
        out.codes.copy_(torch.cat(codes))
        out.scales.copy_(torch.cat(scales))
        if out.cache_ids.numel():
            out.cache_ids.copy_(torch.cat(cache_ids))
            out.cache_values.copy_(torch.cat(cache_values))
            out.cache_starts.copy_(torch.cat([torch.zeros(1, dtype=torch.int64), *cache_starts]))
            bits, rank = cache_index(out.cache_ids, out.num_rows)
            out.cache_bits.copy_(bits)
            out.cache_rank.copy_(rank)
        return out

    def to_packed(self) -> "PackedTables":
        """This module (already the packed form)."""
        return self

    def record_args(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable) that rebuild this module's shapes (the packed spec)."""
        return {"rows": list(self.rows), "embedding_dim": self.embedding_dim, "chunk_size": self.chunk_size,
                "live_chunks": int((self.values if self.storage == "fp32" else self.codes).shape[0]),
                "storage": self.storage, "cached_rows": int(self.cache_ids.shape[0]),
                **({"cached_chunks": int(self.cache_values.numel()) // self.chunk_size}
                   if self.cache_ids.numel() else {}),
                **({"scales": "row"} if self.scales.dim() == 2 else {})}

    @classmethod
    def from_record(cls, model: nn.Module, name: str, args: dict[str, Any]) -> "PackedTables":
        """An empty module of the recorded shapes in place of the collection at ``name`` of ``model``; ValueError
        naming the first table whose shape differs."""
        collection = model.get_submodule(name) if name else model
        tables = list(collection.children())
        rows, dim = list(args.get("rows") or []), args.get("embedding_dim")
        if len(tables) != len(rows):
            raise ValueError(f"the collection has {len(tables)} tables in the model but {len(rows)} in the file")
        for t, (table, r) in enumerate(zip(tables, rows)):
            shape = (getattr(table, "num_embeddings", None), getattr(table, "embedding_dim", None))
            if shape != (r, dim):
                where = f"{name}.{t}" if name else str(t)
                raise ValueError(f"table '{where}' is {shape[0]} x {shape[1]} in the model but {r} x {dim} in the "
                                 f"file: load into the model the run's recipe builds")
        return cls(**args)

    def table_bytes(self) -> TableBytes:
        """As :meth:`PackedEmbeddingBag.table_bytes` (the bytes of the state dict), over all the tables."""
        return packed_bytes(self)

    def dense_bytes(self) -> int:
        """Bytes of the FP32 dense tables it stands for."""
        return sum(self.rows) * self.embedding_dim * 4

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict = flat_packed_cache(state_dict, prefix, self.chunk_size)
        adopt_cache_shapes(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        check_cache_index(self, self.num_rows, prefix, error_msgs)

    def forward(self, sparse: torch.Tensor, weights: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``EmbeddingTables.forward``: ``sparse [B, F]`` (one id per sample and feature) or ``[B, F, L]`` (bags
        padded with -1), optional per-id ``weights`` -> ``F`` tensors ``[B, embedding_dim]``."""
        check_sparse(sparse, weights, len(self.rows))
        b = self._buffers
        if sparse.dim() == 2:
            inside = (sparse >= 0) & (sparse < b["row_limits"])
        else:                                  # padding (negative ids) is not out of range
            inside = ((sparse >= 0) & (sparse < b["row_limits"][:, None])) | (sparse < 0)
        if not torch.compiler.is_compiling() and not bool(inside.all()):
            bad = (~inside).nonzero()[0]
            feature, value = int(bad[1]), int(sparse[tuple(bad)])
            raise IndexError(f"index {value} out of range for table {feature} of {self.rows[feature]} rows "
                             f"(ids must be in [0, {self.rows[feature]}))")
        batch, features = sparse.shape[:2]
        if sparse.dim() == 2:
            ids = torch.where(inside, sparse + b["row_offsets"], -1).t().reshape(-1, 1)     # feature-major bags
            bag_offsets, w = None, None if weights is None else weights.t().reshape(-1, 1)
        else:                  # an id outside its table becomes -1 (the op refuses it), padding drops out
            shifted = torch.where(inside, sparse + b["row_offsets"].view(1, -1, 1), -1)
            ids, counts, w = feature_major_bags(sparse, weights, values=shifted)
            bag_offsets = torch.cumsum(counts, 0) - counts
        out = PACKED_BAG(b["values"], b["codes"], b["scales"], b["counts"], b["base"], b["cache_ids"],
                         b["cache_bits"], b["cache_rank"], b["cache_values"], b["cache_starts"], ids, bag_offsets, w,
                         self.bits,
                         self.chunk_size, MODES["sum"], False, self.num_rows, self.embedding_dim)
        return list(out.view(features, batch, self.embedding_dim).unbind(0))

    def dims(self) -> list[int]:
        """Output width of every table (as ``EmbeddingTables.dims``)."""
        return [self.embedding_dim] * len(self.rows)

    def extra_repr(self) -> str:
        cache = f", cached_rows={self.cache_ids.shape[0]}" if self.cache_ids.numel() else ""
        return (f"tables={len(self.rows)}, rows={sum(self.rows)}, {self.embedding_dim}, chunk_size={self.chunk_size}, "
                f"storage={self.storage!r}{cache}")

