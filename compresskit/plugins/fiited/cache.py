"""The FP32 hot-row cache of a quantized chunk store.

The hottest rows by access are served and trained in full precision: the cache holds their stored chunks as
FP32 (``values [k, dim]``, a row's chunks beyond its count are zeros) under their row ids (``ids [k]``, ascending, so
a lookup is a binary search). While a row is cached its quantized copy in the store is stale; the cache is the
master. :meth:`HotRowCache.refresh` re-ranks rows by their decayed access counts, writes evicted rows back to the
store (round to nearest: the cache holds the trained value exactly) and loads admitted rows from it.

Lookups in the native kernel find a row's cache position in O(1) through a rank bitmap derived from ``ids`` (one bit
a row, and an int32 count of cached rows per 64 rows: 0.19 bytes a row).

Bytes: ``values``, ``ids`` and the bitmap are payload (inference reads them); the access counts (4 bytes a row) are
training state.
"""
from __future__ import annotations

import torch
from torch import nn

from ...table_types import TableBytes
from .kernels import expand_runs
from .packed_op import cache_index


class HotRowCache(nn.Module):
    """FP32 copies of the ``capacity`` most accessed rows of a :class:`~.store.ChunkStore` (see the module doc)."""

    def __init__(self, num_rows: int, dim: int, capacity: int) -> None:
        super().__init__()
        if capacity < 0 or capacity > num_rows:
            raise ValueError(f"cache capacity must be in [0, {num_rows}], got {capacity}")
        self.num_rows, self.dim = num_rows, dim
        self.register_buffer("limit", torch.tensor(capacity))
        self.register_buffer("ids", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("values", torch.zeros(0, dim))
        self.register_buffer("access", torch.zeros(num_rows))
        words = (num_rows + 63) // 64   # derived lookup structure (not saved): one bit a row, rank per 64 rows
        self.register_buffer("bits", torch.zeros(words, dtype=torch.int64), persistent=False)
        self.register_buffer("rank", torch.zeros(words, dtype=torch.int32), persistent=False)

    @property
    def capacity(self) -> int:
        """Rows the cache holds at most."""
        return int(self.limit)

    def _index(self) -> None:
        """Rebuild the rank bitmap from ``ids``: a cached row's position is ``rank[r >> 6]`` plus the set bits
        below ``r`` in its word (O(1) per lookup in the native kernel)."""
        self.bits, self.rank = cache_index(self.ids, self.num_rows)

    def record(self, ids: torch.Tensor) -> None:
        """Count one access of every id (a lookup in training)."""
        self.access.index_add_(0, ids, torch.ones(ids.numel()))

    def positions(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cached?, position in the cache) of every row in ``rows``."""
        if self.ids.numel() == 0:
            return torch.zeros(rows.shape, dtype=torch.bool), torch.zeros(rows.shape, dtype=torch.int64)
        pos = torch.searchsorted(self.ids, rows).clamp(max=self.ids.numel() - 1)
        return self.ids[pos] == rows, pos

    def write_back(self, store, positions: torch.Tensor) -> None:
        """Store the cached rows at ``positions`` into ``store`` (round to nearest)."""
        rows = self.ids[positions]
        at, chunk, slots = expand_runs(*store.row_slots(rows))
        if slots.numel():
            store.write(slots, self.values[positions].view(positions.numel(), -1, store.chunk_size)[at, chunk],
                        rows=rows[at])

    def _load(self, store, rows: torch.Tensor) -> torch.Tensor:
        """FP32 rows ``[len(rows), dim]`` read from the store (missing chunks as zeros)."""
        out = torch.zeros(rows.numel(), self.dim // store.chunk_size, store.chunk_size)
        at, chunk, slots = expand_runs(*store.row_slots(rows))
        if slots.numel():
            out[at, chunk] = store.read(slots, rows[at])
        return out.view(rows.numel(), self.dim)

    def refresh(self, store) -> dict[str, int]:
        """Cache the ``capacity`` rows with the most (decayed) accesses among those storing chunks; evicted rows go
        back to the store, admitted ones come from it; then halve the access counts (the decay). Returns counts of
        evicted and admitted rows."""
        stored = store.row_counts() > 0
        score = torch.where(stored, self.access, torch.full_like(self.access, -1.0))
        k = min(self.capacity, int(stored.sum()))
        hot = torch.sort(torch.topk(score, k, sorted=False).indices).values if k else self.ids[:0]
        keep = torch.isin(self.ids, hot)
        evicted = torch.nonzero(~keep).flatten()
        self.write_back(store, evicted)
        new = hot[~torch.isin(hot, self.ids)]
        ids = torch.cat([self.ids[keep], new])
        values = torch.cat([self.values[keep], self._load(store, new)])
        order = torch.argsort(ids)
        self.ids, self.values = ids[order], values[order].contiguous()
        self._index()
        self.access.mul_(0.5)
        return {"evicted": int(evicted.numel()), "admitted": int(new.numel())}

    def flush(self, store) -> None:
        """Write every cached row back to the store and empty the cache."""
        self.write_back(store, torch.arange(self.ids.numel()))
        self.ids, self.values = self.ids[:0], self.values[:0]
        self._index()

    def resized(self, store, old_counts: torch.Tensor) -> None:
        """After the store changed row counts (pruning, regrowth): cached rows drop their lost chunks and take their
        fresh ones (zeros or the new initial values) from the store; chunks they kept stay the master copy."""
        if self.ids.numel() == 0:
            return
        old = old_counts[self.ids]
        new = store.row_counts()[self.ids]
        changed = torch.nonzero(old != new).flatten()
        if changed.numel() == 0:
            return
        cs = store.chunk_size
        fresh = self._load(store, self.ids[changed]).view(changed.numel(), -1, cs)
        mine = self.values[changed].view(changed.numel(), -1, cs)
        kept = torch.arange(mine.shape[1])[None, :] < torch.minimum(old, new)[changed][:, None]
        self.values[changed] = torch.where(kept[:, :, None], mine, fresh).view(changed.numel(), self.dim)

    def table_bytes(self) -> TableBytes:
        """Payload (values, ids and the rank bitmap; all of it ``cache``) and training (access counts) bytes."""
        payload = sum(t.numel() * t.element_size() for t in (self.values, self.ids, self.bits, self.rank))
        return TableBytes(payload, training=self.access.numel() * self.access.element_size(), cache=payload)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("ids", "values"):   # a saved cache may hold another number of rows: adopt its shapes
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty(incoming.shape, dtype=getattr(self, name).dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._index()
