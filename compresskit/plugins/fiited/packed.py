"""Inference-only FIITED tables: what a trained :class:`FiitedEmbeddingBag` needs to serve, and nothing else.

A :class:`PackedEmbeddingBag` holds the chunk store's layout (``store.py``) with the pool packed, in the precision
training stored it:

    values [live_chunks, chunk_size] float32          (storage 'fp32')
    codes  [live_chunks, chunk_size * bits / 8] uint8 (storage 'int8' / 'int4', ``chunk_codec.py``'s layout)
    scales [live_chunks] float16                      (one a chunk; or, with scales='row', [rows, 2]: one scale
                                                       and offset a row, FBGEMM's row-wise layout)
    counts [rows, rounded up to 8] uint8              one a row: its stored chunks
    base   [ceil(rows / 64)] int64                    per block of 64 rows: the slot of its first chunk

    slot(r) = base[r // 64] + count[64 * (r // 64)] + ... + count[r - 1]

(the store's index, 1.125 bytes a row: a lookup reads the row's block of counts, one cache line, and its base,
from an array an eighth of that size),

and, for a quantized table trained with an FP32 hot-row cache (``cache.py``), the cache as training left it:
``cache_ids`` (ascending), the rows' stored chunks ``cache_values`` (flat) and ``cache_starts`` (each row's first
chunk there), and the rank bitmap ``cache_bits`` / ``cache_rank`` through which a lookup finds a cached row in O(1).
A cached row is read from the cache, as in training, and only there: its stale codes are not kept (its count in
``counts`` is 0; the cache's starts give its chunks), so every row's values are held once.

No utilities, no optimizer state, no Parameters (nothing for autograd). Every tensor above is a saved buffer, so the
bytes :meth:`table_bytes` reports are the bytes of the state dict. The forward pass is one call of the custom op
``torch.ops.compresskit.packed_bag`` (``packed_op.py``: the native kernel, or its pure-torch fallback), which
``torch.export`` keeps in the exported graph. It mirrors ``nn.EmbeddingBag`` (modes 'sum' / 'mean', 1-D input with
offsets, with or without ``include_last_offset``, 2-D input, ``per_sample_weights``, empty bags) and
:class:`PackedEmbedding` mirrors ``nn.Embedding``; an id outside ``[0, num_embeddings)`` raises ``IndexError``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...table_types import TableBytes
from .cache import flat_cache_values, starts_error
from .row_index import index_shapes, older_layout, packed_bases, padded_counts
from .packed_op import MODES, PACKED_BAG, cache_index
from .chunk_codec import SCALES, STORAGE_BITS, code_bytes

STORAGES = ("fp32", *STORAGE_BITS)


def register_packed_buffers(module: nn.Module, num_rows: int, dim: int, chunk_size: int, live_chunks: int,
                            storage: str, cached_rows: int, scales: str = "chunk", cached_chunks: int = 0) -> None:
    """Check the packed layout's shape arguments (ValueError naming the one out of range) and register its buffers
    (module docstring) on ``module``, zero-filled. The tensors the other storage has are empty and not saved: the
    state dict holds what is served."""
    if chunk_size < 1 or dim % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} must divide embedding_dim {dim}")
    if not 0 <= live_chunks <= num_rows * (dim // chunk_size):
        raise ValueError(f"live_chunks must be in [0, {num_rows * (dim // chunk_size)}], got {live_chunks}")
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if scales not in SCALES or (scales == "row" and storage == "fp32"):
        raise ValueError(f"scales must be 'chunk', or 'row' with int8 / int4 storage, got {scales!r} with storage "
                         f"'{storage}'")
    if not 0 <= cached_rows <= (num_rows if storage != "fp32" else 0):
        raise ValueError(f"cached_rows must be in [0, {num_rows if storage != 'fp32' else 0}] with storage "
                         f"'{storage}', got {cached_rows}")
    rows, blocks = index_shapes(num_rows)
    quantized = storage != "fp32"
    width = code_bytes(STORAGE_BITS[storage], chunk_size) if quantized else 0
    module.register_buffer("values", torch.zeros(0 if quantized else live_chunks, chunk_size),
                           persistent=not quantized)
    module.register_buffer("codes", torch.zeros(live_chunks if quantized else 0, width, dtype=torch.uint8),
                           persistent=quantized)
    module.register_buffer("scales", torch.zeros(num_rows, 2, dtype=torch.float16) if scales == "row" else
                           torch.zeros(live_chunks if quantized else 0, dtype=torch.float16), persistent=quantized)
    module.register_buffer("counts", torch.zeros(rows, dtype=torch.uint8))
    module.register_buffer("base", torch.zeros(blocks, dtype=torch.int64))
    cached = cached_rows > 0
    words = (num_rows + 63) // 64 if cached else 0
    if not 0 <= cached_chunks <= cached_rows * (dim // chunk_size):
        raise ValueError(f"cached_chunks must be in [0, {cached_rows * (dim // chunk_size)}], got {cached_chunks}")
    module.register_buffer("cache_ids", torch.zeros(cached_rows, dtype=torch.int64), persistent=cached)
    module.register_buffer("cache_values", torch.zeros(cached_chunks * chunk_size), persistent=cached)
    module.register_buffer("cache_starts", torch.zeros(cached_rows + 1, dtype=torch.int64), persistent=cached)
    module.register_buffer("cache_bits", torch.zeros(words, dtype=torch.int64), persistent=cached)
    module.register_buffer("cache_rank", torch.zeros(words, dtype=torch.int32), persistent=cached)


def check_cache_index(module: nn.Module, num_rows: int, prefix: str, error_msgs: list[str]) -> None:
    """After a load: the rank bitmap must describe the cached ids loaded and the starts must cut the cached values
    into rows, whatever the file said (an error message for ``load_state_dict`` otherwise)."""
    if module.cache_ids.numel():
        bits, rank = cache_index(module.cache_ids, num_rows)
        if not (torch.equal(bits, module.cache_bits) and torch.equal(rank, module.cache_rank)):
            error_msgs.append(f"{prefix}cache_bits / cache_rank do not index {prefix}cache_ids")
        if starts_error(module.cache_starts, module.cache_ids.numel(), module.cache_values.numel(),
                        module.chunk_size, module.embedding_dim // module.chunk_size) is not None:
            error_msgs.append(f"{prefix}cache_starts do not cut {prefix}cache_values into the cached rows' chunks")


def flat_packed_cache(state_dict: dict, prefix: str, chunk_size: int) -> dict:
    """``state_dict`` of a packed table whose cache holds full-dimension rows (``cache_values [k, dim]``, packed
    format 3) with the cache's stored chunks flat and their starts (its ``counts`` still give the cached rows'
    chunks: such files kept their stale codes too)."""
    values = state_dict.get(prefix + "cache_values")
    if values is None or values.dim() != 2:
        return state_dict
    out = dict(state_dict)
    out[prefix + "cache_values"], out[prefix + "cache_starts"] = flat_cache_values(
        state_dict[prefix + "cache_ids"], values, state_dict[prefix + "counts"], chunk_size)
    return out


def adopt_cache_shapes(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Give the cache buffers the shapes ``state_dict`` has (a shell built from a record written before the cached
    chunks were recorded)."""
    for name in ("cache_values", "cache_starts"):
        incoming = state_dict.get(prefix + name)
        if incoming is not None and incoming.shape != getattr(module, name).shape:
            setattr(module, name, torch.zeros(incoming.shape, dtype=getattr(module, name).dtype))


def packed_bytes(module: nn.Module) -> TableBytes:
    """The :class:`TableBytes` of a module holding the packed buffers (:func:`register_packed_buffers`)."""
    def size(*names: str) -> int:
        return sum(getattr(module, n).numel() * getattr(module, n).element_size() for n in names)

    cache = size("cache_ids", "cache_values", "cache_starts", "cache_bits", "cache_rank") \
        if module.cache_ids.numel() else 0
    return TableBytes(size("values", "codes", "scales") + cache, size("counts", "base"), cache=cache)


def index_of_64_row_blocks(state_dict: dict, prefix: str, num_rows: int) -> dict:
    """``state_dict`` of a packed table written with the older index of 8-row blocks (packed format 1: ``counts``
    and ``base`` apart; 2: both interleaved in ``index [blocks, 2]``) in today's layout. A packed table's chunks
    are in row order, so its counts say everything: the bases are recomputed from them."""
    old = state_dict.get(prefix + "index")
    counts = None
    if old is not None and old.dim() == 2 and old.shape[1] == 2:
        counts = old[:, 1].clone(memory_format=torch.contiguous_format).view(torch.uint8)
    elif state_dict.get(prefix + "base") is not None and state_dict.get(prefix + "counts") is not None and \
            older_layout(state_dict[prefix + "counts"].numel(), state_dict[prefix + "base"].numel()):
        counts = state_dict[prefix + "counts"]
    if counts is None:
        return state_dict
    out = {k: v for k, v in state_dict.items() if k != prefix + "index"}
    padded = padded_counts(counts, num_rows)
    out[prefix + "counts"], out[prefix + "base"] = padded, packed_bases(padded)
    return out


class PackedEmbeddingBag(nn.Module):
    """Trained FIITED table for inference (module docstring).

    Args:
        num_embeddings, embedding_dim, mode, include_last_offset: as ``nn.EmbeddingBag`` (modes 'sum', 'mean').
        chunk_size: values per chunk (divides ``embedding_dim``).
        live_chunks: chunks stored as values or codes (a cached row's are in the cache instead).
        storage: ``'fp32'``, ``'int8'`` or ``'int4'``.
        cached_rows: rows of the FP32 hot-row cache (quantized storage only).
        cached_chunks: chunks those rows store (in the cache, not in ``codes``).
        scales: ``'chunk'`` (an FP16 scale a chunk) or ``'row'`` (an FP16 scale and offset a row), quantized
            storage only.
        dtype: of ``values``; float32 (kept for specs written before ``storage`` existed).

    Build one from a trained table with :meth:`FiitedEmbeddingBag.to_packed`; the constructor alone gives an
    empty shell of the right shapes for ``load_state_dict`` (``compresskit.export.load_packed`` does that).
    """

    bag = True

    def __init__(self, num_embeddings: int, embedding_dim: int, chunk_size: int, live_chunks: int,
                 mode: str = "sum", include_last_offset: bool = False, dtype: torch.dtype = torch.float32,
                 storage: str = "fp32", cached_rows: int = 0, scales: str = "chunk", cached_chunks: int = 0) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be 'sum' or 'mean', got '{mode}'")
        if dtype != torch.float32:
            raise ValueError(f"dtype must be float32, got {dtype}")
        register_packed_buffers(self, num_embeddings, embedding_dim, chunk_size, live_chunks, storage, cached_rows,
                                scales, cached_chunks)
        self.num_embeddings, self.embedding_dim, self.chunk_size = num_embeddings, embedding_dim, chunk_size
        self.num_chunks = embedding_dim // chunk_size
        self.mode, self.include_last_offset = mode, include_last_offset
        self.storage, self.bits = storage, STORAGE_BITS.get(storage, 32)

    @property
    def scale_layout(self) -> str:
        """``'row'`` (an FP16 scale and offset a row) or ``'chunk'`` (a scale a chunk, or no scales: FP32)."""
        return "row" if self.scales.dim() == 2 else "chunk"

    @property
    def live_chunks(self) -> int:
        """Chunks stored."""
        return int((self.values if self.storage == "fp32" else self.codes).shape[0])

    @classmethod
    def from_store(cls, store: Any, mode: str = "sum", include_last_offset: bool = False,
                   cache: Any = None) -> "PackedEmbeddingBag":
        """Copy a :class:`ChunkStore`'s stored chunks, packed (holes left by moves are dropped), in the store's
        precision, its counts, and a quantized store's :class:`~.cache.HotRowCache` ``cache`` if given: the cached
        rows' chunks from the cache only (their stale codes are dropped)."""
        rows, _, slots = store.entries()            # ordered by row, then chunk: the packed order
        storage = {bits: name for name, bits in STORAGE_BITS.items()}.get(store.bits, "fp32")
        cached = cache.ids.numel() if cache is not None and storage != "fp32" else 0
        counts = store.counts.clone()
        if cached:
            slots = slots[~torch.isin(rows, cache.ids)]
            counts[cache.ids] = 0
        packed = cls(store.num_rows, store.num_chunks * store.chunk_size, store.chunk_size, slots.numel(),
                     mode=mode, include_last_offset=include_last_offset, storage=storage, cached_rows=cached,
                     scales="row" if store.row_scales else "chunk",
                     cached_chunks=int(cache.starts[-1]) if cached else 0)
        if storage == "fp32":
            packed.values.copy_(store.read(slots))
        else:
            packed.codes.copy_(store.codes[slots])
            packed.scales.copy_(store.scales if store.row_scales else store.scales[slots])
        packed.counts.copy_(counts)
        packed.base.copy_(packed_bases(counts))
        if cached:
            packed.cache_ids.copy_(cache.ids)
            packed.cache_values.copy_(cache.values)
            packed.cache_starts.copy_(cache.starts)
            packed.cache_bits.copy_(cache.bits)
            packed.cache_rank.copy_(cache.rank)
        return packed

    def record_args(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable) that rebuild this module's shapes (the packed spec's
        ``args``; a layout record's, ``compresskit.layout``)."""
        args = {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "chunk_size": self.chunk_size, "live_chunks": self.live_chunks, "storage": self.storage,
                "cached_rows": int(self.cache_ids.shape[0])}
        if self.cache_ids.numel():
            args["cached_chunks"] = int(self.cache_values.numel()) // self.chunk_size
        if self.scale_layout == "row":      # only then: specs written before row-wise scales stay as they were
            args["scales"] = "row"
        if self.bag:
            args.update(mode=self.mode, include_last_offset=self.include_last_offset)
        return args

    @classmethod
    def batched(cls, tables: list["PackedEmbeddingBag"]) -> nn.Module | None:
        """The tables of one collection served by one op call (:class:`~.packed_tables.PackedTables`), or None
        where they cannot share one store."""
        from .packed_tables import PackedTables

        return PackedTables.batched(tables)

    @classmethod
    def from_record(cls, model: nn.Module, name: str, args: dict[str, Any]) -> "PackedEmbeddingBag":
        """An empty table of the recorded shapes, for ``load_state_dict`` (``compresskit.export.load_packed``)."""
        return cls(**args)

    def table_bytes(self) -> TableBytes:
        """Bytes held, which are the bytes of the state dict (no training state): ``payload`` (the chunks: FP32
        values, or codes and scales; and the cache), ``cache`` (the FP32 hot rows, their ids and rank bitmap),
        ``index`` (counts and block bases)."""
        return packed_bytes(self)

    def to_packed(self) -> "PackedEmbeddingBag":
        """This module (already the packed form: exporting a loaded packed model keeps it)."""
        return self

    def to_dense(self) -> nn.EmbeddingBag:
        """The equivalent ``nn.EmbeddingBag`` (same mode and ``include_last_offset``), pruned dims as zeros."""
        return nn.EmbeddingBag(self.num_embeddings, self.embedding_dim, mode=self.mode,
                               include_last_offset=self.include_last_offset, _weight=self.dense())

    def dense(self) -> torch.Tensor:
        """The full ``[num_embeddings, embedding_dim]`` table as served (cached rows from the cache), pruned dims
        as zeros."""
        return self._lookup(torch.arange(self.num_embeddings)[:, None], None, None, "sum")

    def _lookup(self, input: torch.Tensor, offsets: torch.Tensor | None, per_sample_weights: torch.Tensor | None,
                mode: str) -> torch.Tensor:
        b = self._buffers   # one dict, not nine nn.Module attribute lookups: a lookup of 4096 ids takes ~50 us
        return PACKED_BAG(b["values"], b["codes"], b["scales"], b["counts"], b["base"], b["cache_ids"],
                          b["cache_bits"], b["cache_rank"], b["cache_values"], b["cache_starts"], input, offsets,
                          per_sample_weights,
                          self.bits, self.chunk_size, MODES[mode], self.include_last_offset, self.num_embeddings,
                          self.embedding_dim)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``nn.EmbeddingBag.forward``: pooled ``[bags, embedding_dim]``."""
        return self._lookup(input, offsets, per_sample_weights, self.mode)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict = flat_packed_cache(index_of_64_row_blocks(state_dict, prefix, self.num_embeddings), prefix,
                                       self.chunk_size)
        adopt_cache_shapes(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        check_cache_index(self, self.num_embeddings, prefix, error_msgs)

    def extra_repr(self) -> str:
        mode = f", mode={self.mode!r}" if self.bag else ""
        cache = f", cached_rows={self.cache_ids.shape[0]}" if self.cache_ids.numel() else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}, chunk_size={self.chunk_size}{mode}, "
                f"storage={self.storage!r}, live_chunks={self.live_chunks}{cache}")


class PackedEmbedding(PackedEmbeddingBag):
    """:class:`PackedEmbeddingBag` as an ``nn.Embedding``: ``forward(ids of any shape) -> ids.shape + (dim,)``."""

    bag = False

    def __init__(self, num_embeddings: int, embedding_dim: int, chunk_size: int, live_chunks: int,
                 dtype: torch.dtype = torch.float32, storage: str = "fp32", cached_rows: int = 0,
                 scales: str = "chunk", cached_chunks: int = 0) -> None:
        super().__init__(num_embeddings, embedding_dim, chunk_size, live_chunks, dtype=dtype, storage=storage,
                         cached_rows=cached_rows, scales=scales, cached_chunks=cached_chunks)

    @classmethod
    def from_store(cls, store: Any, mode: str = "sum", include_last_offset: bool = False,
                   cache: Any = None) -> "PackedEmbedding":
        """Copy a :class:`ChunkStore` (see :meth:`PackedEmbeddingBag.from_store`); ``mode`` and
        ``include_last_offset`` are ignored (an ``nn.Embedding`` has neither)."""
        packed = PackedEmbeddingBag.from_store(store, cache=cache)
        out = cls(packed.num_embeddings, packed.embedding_dim, packed.chunk_size, packed.live_chunks,
                  storage=packed.storage, cached_rows=int(packed.cache_ids.shape[0]), scales=packed.scale_layout,
                  cached_chunks=int(packed.cache_values.numel()) // packed.chunk_size)
        out.load_state_dict(packed.state_dict())
        return out

    def to_dense(self) -> nn.Embedding:  # type: ignore[override]
        """The equivalent ``nn.Embedding``, pruned dims as zeros."""
        return nn.Embedding(self.num_embeddings, self.embedding_dim, _weight=self.dense())

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``nn.Embedding.forward``."""
        return self._lookup(input.reshape(-1, 1), None, None, "sum").view(*input.shape, self.embedding_dim)


PACKED_CLASSES = {cls.__name__: cls for cls in (PackedEmbeddingBag, PackedEmbedding)}
