"""Lookup, pooling, backward and fused optimizer updates over the prefix-chunk store.

Two implementations with one contract: the C++ kernels (``native/prefix_bag.cpp``, compiled at first use) and the
pure-torch kernels below, used where no compiler is available and as the reference the native ones are tested
against. ``use_native(False)`` forces the torch path (tests, benchmarks).

Optimizer codes of :func:`bag_backward`: ``none`` returns the gradient (dense ``[slots, chunk]`` or sparse
``(slots, values)``); ``sgd``, ``adagrad`` and ``rowwise_adagrad`` update the pool in place, as FBGEMM's EXACT_SGD,
EXACT_ADAGRAD and EXACT_ROWWISE_ADAGRAD do: the gradients of a row's repeated ids are summed first, then
``w -= lr * g`` / ``s += g*g; w -= lr * g / (sqrt(s) + eps)`` / ``m += mean(g*g); w -= lr * g / (sqrt(m) + eps)``,
where row-wise Adagrad's mean runs over the row's stored values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native
from .chunk_codec import dequantize
from .row_index import BLOCK, block_counts

OPTIMIZERS = {"none": 0, "sgd": 1, "adagrad": 2, "rowwise_adagrad": 3}
_prefer_native = [True]


def use_native(on: bool) -> None:
    """Prefer the compiled kernels (default) or force the pure-torch ones."""
    _prefer_native[0] = on


def native_kernels():
    """The compiled kernel module in use, or ``None`` when the torch kernels run."""
    return native.kernels() if _prefer_native[0] else None


def check_ids(ids: torch.Tensor, num_rows: int) -> None:
    """Raise ``IndexError`` (as ``nn.Embedding`` does) unless every id is in ``[0, num_rows)``: one min/max pass.
    Skipped while ``torch.export`` / ``torch.compile`` trace: a module whose gathers do not check the ids themselves
    (a hashed table) keeps a check of its own in the graph."""
    if ids.numel() and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= num_rows:
            raise IndexError(f"index {lo if lo < 0 else hi} out of range for a table of {num_rows} rows "
                             f"(ids must be in [0, {num_rows}))")


def check_offsets(offsets: torch.Tensor, n: int) -> None:
    """ValueError (as the native kernels raise) unless ``offsets`` are non-decreasing and in ``[0, n]``."""
    bad = (offsets < 0) | (offsets > n)
    bad[1:] |= offsets[1:] < offsets[:-1]
    if bool(bad.any()):
        at = int(torch.nonzero(bad)[0])
        raise ValueError(f"offsets must be non-decreasing and in [0, {n}], got {int(offsets[at])} at position {at}")


def row_slots(counts: torch.Tensor, base: torch.Tensor, rows: torch.Tensor, num_rows: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot of the first chunk, number of stored chunks) of each row in ``rows`` (int64 each)."""
    rows = rows.reshape(-1).long()
    k = native_kernels()
    if k is not None:
        out = k.row_slots(counts, base, rows.contiguous(), num_rows)
        return out[:, 0], out[:, 1]
    check_ids(rows, num_rows)
    return _row_slots(counts, base, rows)


def expand_runs(first: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every element of the runs ``first[i] .. first[i] + lengths[i] - 1`` as (run i, offset in the run, value), in
    run order: e.g. the (row, chunk, slot) of every stored chunk of rows whose first slots and counts are given."""
    run = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    offset = torch.arange(run.numel()) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    return run, offset, first[run] + offset


def _row_slots(counts: torch.Tensor, base: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`row_slots` of int64 ``rows`` already checked to be in range (torch path)."""
    blk, within = rows // BLOCK, rows % BLOCK
    before = torch.arange(BLOCK, device=rows.device)[None, :] < within[:, None]
    return (base[blk] + torch.where(before, block_counts(counts, blk), 0).sum(1, dtype=torch.int64),
            counts[rows].long())


def positions(ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, mean: bool,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Bag of each id and its weight (per-sample weight times 1/bag length for mode 'mean')."""
    n, bags = ids.numel(), offsets.numel()
    check_offsets(offsets, n)
    lengths = torch.diff(offsets, append=offsets.new_tensor([n]))
    bag_of = torch.repeat_interleave(torch.arange(bags, device=ids.device), lengths)
    w = weights.to(dtype) if weights is not None else torch.ones(n, dtype=dtype, device=ids.device)
    if mean:
        w = w / lengths.clamp(min=1).to(dtype)[bag_of]
    return bag_of, w


def bag_forward(pool: torch.Tensor, counts: torch.Tensor, base: torch.Tensor, ids: torch.Tensor,
                offsets: torch.Tensor, weights: torch.Tensor | None, mean: bool, dim: int, num_rows: int
                ) -> torch.Tensor:
    """Pooled bags ``[len(offsets), dim]``: the sum (or mean) of each bag's rows, pruned dims as zeros."""
    k = native_kernels()
    if k is not None:
        w = weights.contiguous().float() if weights is not None else torch.empty(0)
        return k.forward(pool, counts, base, ids, offsets, w, mean, dim, num_rows)
    check_ids(ids, num_rows)
    n, bags, cs = ids.numel(), offsets.numel(), pool.shape[1]
    c = dim // cs
    if n == 0 or pool.shape[0] == 0:
        return pool.new_zeros(bags, dim)
    slot, cnt = _row_slots(counts, base, ids)
    j = torch.arange(c, device=ids.device)
    valid = j[None, :] < cnt[:, None]                                   # [n, c]
    slots = torch.where(valid, slot[:, None] + j, 0)
    _, w = positions(ids, offsets, weights, mean, pool.dtype)
    weight = valid.to(pool.dtype) * w[:, None]
    # chunk-major: bag (chunk j, bag b) holds chunk j of every id of bag b
    flat_offsets = (offsets[None, :] + j[:, None] * n).reshape(-1)
    out = F.embedding_bag(slots.t().reshape(-1), pool.detach(), flat_offsets, mode="sum",
                          per_sample_weights=weight.t().reshape(-1))
    return out.view(c, bags, cs).permute(1, 0, 2).reshape(bags, dim)


def native_cache(cache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The native kernels' view of a :class:`~.cache.HotRowCache` (rank bitmap words, ranks, flat FP32 values, each
    cached row's start in them); empty tensors when there is no cache or it holds no rows."""
    if cache is None or cache.ids.numel() == 0:
        return (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), torch.zeros(0),
                torch.zeros(1, dtype=torch.int64))
    return cache.bits, cache.rank, cache.values, cache.starts   # updated in place by the fused update: never a copy


def qbag_forward(codes: torch.Tensor, scales: torch.Tensor, bits: int, chunk_size: int, counts: torch.Tensor,
                 base: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None,
                 mean: bool, dim: int, num_rows: int, cache=None) -> torch.Tensor:
    """:func:`bag_forward` over quantized chunks (``chunk_codec.py``'s codes and FP16 scales, one a chunk or a
    ``[rows, 2]`` (scale, offset) a row), dequantized as they are
    pooled; rows of ``cache`` (a :class:`~.cache.HotRowCache`) are read from its FP32 values instead."""
    cached = cache is not None and cache.ids.numel() > 0
    k = native_kernels()
    if k is not None:
        w = weights.contiguous().float() if weights is not None else torch.empty(0)
        return k.forward_q(codes, scales, bits, chunk_size, counts, base, ids, offsets, w, mean, dim, num_rows,
                           *native_cache(cache))
    check_ids(ids, num_rows)
    n, bags, cs = ids.numel(), offsets.numel(), chunk_size
    c = dim // cs
    if n == 0:
        return torch.zeros(bags, dim)
    slot, cnt = _row_slots(counts, base, ids)
    j = torch.arange(c)
    valid = j[None, :] < cnt[:, None]
    slots = torch.where(valid, slot[:, None] + j, 0).reshape(-1)
    if codes.shape[0] == 0:
        vec = torch.zeros(n, c, cs)
    else:
        per_chunk = scales[ids].repeat_interleave(c, 0) if scales.dim() == 2 else scales[slots]   # row-wise: by row
        vec = dequantize(codes[slots], per_chunk, bits).view(n, c, cs)
    vec = (vec * valid[:, :, None]).reshape(n, dim)
    if cached:
        hit, pos = cache.positions(ids)
        vec = torch.where(hit[:, None], cache.dense_rows(pos), vec)
    bag_of, w = positions(ids, offsets, weights, mean, torch.float32)
    return torch.zeros(bags, dim).index_add_(0, bag_of, vec * w[:, None])


def bag_backward(grad_out: torch.Tensor, pool: torch.Tensor, counts: torch.Tensor, base: torch.Tensor,
                 ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, mean: bool, num_rows: int,
                 optimizer: str = "none", lr: float = 0.0, eps: float = 0.0, state: torch.Tensor | None = None,
                 utility: torch.Tensor | None = None, utility_gain: float = 1.0, sparse: bool = False):
    """Backward of :func:`bag_forward` (see the module docstring for what each ``optimizer`` does).

    ``utility`` (float32 per slot), if given, gains ``utility_gain * ||g||`` per stored chunk, ``g`` being the
    chunk's gradient summed over the batch. Returns the dense gradient, ``(slots, values)`` when ``sparse``, or
    ``None`` for fused updates (``pool`` and ``state`` are updated in place).
    """
    code = OPTIMIZERS[optimizer]
    grad_out = grad_out.contiguous().float()
    k = native_kernels()
    if k is not None:
        w = weights.contiguous().float() if weights is not None else torch.empty(0)
        out = k.backward(grad_out, pool, counts, base, ids, offsets, w, mean, num_rows, code, lr, eps,
                         state if state is not None else torch.empty(0),
                         utility if utility is not None else torch.empty(0), utility_gain, int(sparse))
        return (out[0], out[1]) if code == 0 and sparse else (out[0] if code == 0 else None)
    dim, cs = grad_out.shape[1], pool.shape[1]
    bag_of, w = positions(ids, offsets, weights, mean, grad_out.dtype)
    rows, inverse = torch.unique(ids, return_inverse=True)
    g_rows = grad_out.new_zeros(rows.numel(), dim).index_add_(0, inverse, grad_out[bag_of] * w[:, None])
    slot, cnt = row_slots(counts, base, rows, num_rows)
    c = dim // cs
    j = torch.arange(c, device=ids.device)
    valid = j[None, :] < cnt[:, None]
    which = torch.nonzero(valid.reshape(-1)).flatten()
    slots = (slot[:, None] + j).reshape(-1)[which]
    values = g_rows.view(-1, c, cs).reshape(-1, cs)[which]
    if utility is not None:
        utility.index_add_(0, slots, (utility_gain * values.norm(dim=1)).to(utility.dtype))
    if code == 0:
        if sparse:
            return slots, values
        return pool.new_zeros(pool.shape).index_copy_(0, slots, values)
    data = pool.detach()
    if code == 1:
        data.index_add_(0, slots, values, alpha=-lr)
    elif code == 2:
        state.index_add_(0, slots, values * values)
        data.index_add_(0, slots, -lr * values / (state[slots].sqrt() + eps))
    else:
        row_of = torch.arange(rows.numel(), device=ids.device).repeat_interleave(cnt)
        sq = torch.zeros(rows.numel(), dtype=values.dtype).index_add_(0, row_of, (values * values).sum(1))
        has = cnt > 0
        state[rows[has]] += sq[has] / (cnt[has] * cs).to(sq.dtype)
        step = lr / (state[rows].sqrt() + eps)
        data.index_add_(0, slots, -step[row_of][:, None] * values)
    return None
