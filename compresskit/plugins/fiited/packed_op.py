"""``torch.ops.compresskit.packed_bag``: the one lookup of packed FIITED tables, as a ``torch.library`` custom op.

Eager calls and programs saved by ``torch.export`` both run it. Its CPU implementation is the native kernel
(``native/packed_bag.cpp``) or, without one, :func:`packed_bag_reference` (pure torch, the tested fallback); its fake
implementation gives ``torch.export`` the output shape, ``[bags, dim]`` float32. A process that loads a saved program
must have imported this module (``import compresskit.plugins.fiited``; ``compresskit.export.load_program`` does).

Arguments: ``values`` (float32 ``[slots, chunk_size]``, ``bits`` 32) or ``codes`` / ``scales`` (``bits`` 8 or 4,
``chunk_codec.py``'s layout: ``scales [slots]``, a scale a chunk, or ``[rows, 2]``, a scale and offset a row);
``counts`` (uint8, one a row) and ``base`` (int64, the slot of each block of 64 rows' first chunk): the store's
index (``row_index.py``); the FP32 hot-row cache (``cache_ids`` ascending, the rank bitmap ``cache_bits`` /
``cache_rank``, the cached rows' stored chunks ``cache_values`` (flat) and ``cache_starts`` (each cached row's first
chunk there, ``[k + 1]``) of ``cache.py``; a cached row's chunk count is the cache's; empty tensors and
``cache_starts = [0]`` when there is none); then
``nn.EmbeddingBag``'s ``input``, ``offsets``, ``per_sample_weights``, ``mode`` (0 sum, 1 mean) and
``include_last_offset``.
"""
from __future__ import annotations

import torch

from .kernels import _row_slots, check_ids, check_offsets, native_kernels
from .chunk_codec import dequantize

MODES = {"sum": 0, "mean": 1}
_LIB = torch.library.Library("compresskit", "FRAGMENT")
_LIB.define("packed_bag(Tensor values, Tensor codes, Tensor scales, Tensor counts, Tensor base, Tensor cache_ids, "
            "Tensor cache_bits, Tensor cache_rank, Tensor cache_values, Tensor cache_starts, Tensor input, "
            "Tensor? offsets, "
            "Tensor? per_sample_weights, int bits, int chunk_size, int mode, bool include_last_offset, "
            "int num_rows, int dim) -> Tensor")


def bag_count(input: torch.Tensor, offsets: torch.Tensor | None, include_last_offset: bool):
    """Number of bags of an ``nn.EmbeddingBag`` call (symbolic under ``torch.export``)."""
    if input.dim() == 2:
        return input.shape[0]
    if offsets is None:
        raise ValueError("offsets are required when input is 1-D")
    return offsets.shape[0] - 1 if include_last_offset else offsets.shape[0]


def _bag_bounds(input: torch.Tensor, offsets: torch.Tensor | None, per_sample_weights: torch.Tensor | None,
                mode: int, include_last_offset: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(ids, first position of every bag, end of every bag, bags) of a call, checked as the native kernel checks."""
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("offsets must be None when input is 2-D")
        bags, length = input.shape
        starts = torch.arange(bags, dtype=torch.int64) * length
        ends = starts + length
        ids = input.reshape(-1).long()
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets are required when input is 1-D")
        if offsets.dim() != 1:
            raise ValueError(f"offsets must be 1-D, got {offsets.dim()}-D")
        ids, offsets = input.long(), offsets.long()
        n = ids.numel()
        check_offsets(offsets, n)
        bags = max(offsets.numel() - 1, 0) if include_last_offset else offsets.numel()
        starts = offsets[:bags]
        ends = torch.cat([offsets[1:], offsets.new_tensor([n])])[:bags]
    else:
        raise ValueError(f"input must be 1-D or 2-D, got {input.dim()}-D")
    if per_sample_weights is not None:
        if mode != 0:
            raise ValueError("per_sample_weights are only supported with mode='sum' (as in nn.EmbeddingBag)")
        if per_sample_weights.numel() != ids.numel():
            raise ValueError(f"per_sample_weights must have one weight per id ({ids.numel()}), got "
                             f"{per_sample_weights.numel()}")
    return ids, starts, ends, bags


def packed_bag_reference(values: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor,
                         base: torch.Tensor, cache_ids: torch.Tensor, cache_bits: torch.Tensor,
                         cache_rank: torch.Tensor, cache_values: torch.Tensor, cache_starts: torch.Tensor,
                         input: torch.Tensor,
                         offsets: torch.Tensor | None, per_sample_weights: torch.Tensor | None, bits: int,
                         chunk_size: int, mode: int, include_last_offset: bool, num_rows: int, dim: int
                         ) -> torch.Tensor:
    """The op in torch ops (the fallback without a compiler, and the reference the native kernel is tested against).
    ``cache_bits`` / ``cache_rank`` are the native kernel's view of the cache; this path searches ``cache_ids``."""
    del cache_bits, cache_rank
    ids, starts, ends, bags = _bag_bounds(input, offsets, per_sample_weights, mode, include_last_offset)
    n, cs = ids.numel(), chunk_size
    c = dim // cs
    position = torch.arange(n)
    bag_of = torch.searchsorted(starts, position, right=True) - 1
    inside = (bag_of >= 0) & (position < ends[bag_of.clamp(min=0)]) if bags else torch.zeros(n, dtype=torch.bool)
    check_ids(ids, num_rows)
    ids = ids[inside]
    bag_of = bag_of[inside]
    slot, cnt = _row_slots(counts, base, ids)
    hit = torch.zeros(ids.numel(), dtype=torch.bool)
    if cache_ids.numel():
        pos = torch.searchsorted(cache_ids, ids).clamp(max=cache_ids.numel() - 1)
        hit = cache_ids[pos] == ids
        cnt = torch.where(hit, cache_starts[pos + 1] - cache_starts[pos], cnt)   # a cached row's count: the cache's
    j = torch.arange(c)
    kept = j[None, :] < cnt[:, None]                                                  # [n, chunks]
    slots = torch.where(kept & ~hit[:, None], slot[:, None] + j, 0).reshape(-1)
    stored = values.shape[0] if bits == 32 else codes.shape[0]
    if stored == 0:
        vec = torch.zeros(ids.numel(), c, cs)
    elif bits == 32:
        vec = values.index_select(0, slots).view(-1, c, cs)
    else:
        per_chunk = scales.index_select(0, ids).repeat_interleave(c, 0) if scales.dim() == 2 else \
            scales.index_select(0, slots)      # row-wise (scale, offset) pairs are indexed by row
        vec = dequantize(codes.index_select(0, slots), per_chunk, bits).view(-1, c, cs)
    vec = (vec * kept[:, :, None]).reshape(-1, dim)
    if cache_ids.numel():
        where = (cache_starts[pos] * cs)[:, None] + torch.arange(dim)
        in_cache = hit[:, None] & (torch.arange(dim)[None, :] < (cnt * cs)[:, None])
        cached = cache_values[torch.where(in_cache, where, 0)] if cache_values.numel() else \
            torch.zeros(in_cache.shape)
        vec = torch.where(in_cache, cached, vec * ~hit[:, None])
    weight = torch.ones(ids.numel())
    if per_sample_weights is not None:
        weight = per_sample_weights.reshape(-1)[inside].float()
    if mode == 1:
        lengths = (ends - starts).clamp(min=1).float()
        weight = weight / lengths[bag_of]
    return torch.zeros(bags, dim).index_add_(0, bag_of, vec * weight[:, None])


def _packed_bag_cpu(values, codes, scales, counts, base, cache_ids, cache_bits, cache_rank, cache_values,
                    cache_starts, input, offsets, per_sample_weights, bits, chunk_size, mode, include_last_offset,
                    num_rows, dim):
    k = native_kernels()
    if k is None:
        return packed_bag_reference(values, codes, scales, counts, base, cache_ids, cache_bits, cache_rank,
                                    cache_values, cache_starts, input, offsets, per_sample_weights, bits, chunk_size,
                                    mode, include_last_offset, num_rows, dim)
    return k.packed_bag(values, codes, scales, counts, base, cache_bits, cache_rank, cache_values, cache_starts,
                        input, offsets, per_sample_weights, bits, chunk_size, mode, include_last_offset, num_rows,
                        dim)


def _packed_bag_fake(values, codes, scales, counts, base, cache_ids, cache_bits, cache_rank, cache_values,
                     cache_starts, input, offsets, per_sample_weights, bits, chunk_size, mode, include_last_offset,
                     num_rows, dim):
    return input.new_empty((bag_count(input, offsets, include_last_offset), dim), dtype=torch.float32)


_LIB.impl("packed_bag", _packed_bag_cpu, "CPU")
torch.library.register_fake("compresskit::packed_bag", _packed_bag_fake, lib=_LIB)
PACKED_BAG = torch.ops.compresskit.packed_bag.default


def cache_index(ids: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank bitmap of the cached rows ``ids`` (one bit a row in int64 words, and int32 cached rows before each
    word), as ``cache.py`` builds it: the native kernel's O(1) lookup."""
    words = (num_rows + 63) // 64
    hit = torch.zeros(words * 64, dtype=torch.bool)
    hit[ids] = True
    weights = torch.ones(64, dtype=torch.int64) << torch.arange(64)   # bit 63 wraps to the sign: same bits
    bits = (hit.view(words, 64).long() * weights).sum(1)
    per_word = hit.view(words, 64).sum(1)
    return bits, (torch.cumsum(per_word, 0) - per_word).to(torch.int32)

