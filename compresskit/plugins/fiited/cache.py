"""The FP32 hot-row cache of a quantized chunk store.

The hottest rows by access are served and trained in full precision. The cache holds exactly their stored chunks
as FP32, packed: ``values`` (float32, flat) holds cached row ``p``'s chunks ``starts[p] .. starts[p + 1] - 1``
(``starts``: int64 ``[k + 1]``, in chunks: chunk ``j`` is ``values[j * chunk_size : (j + 1) * chunk_size]``), under
their row ids (``ids [k]``, ascending, so a lookup is a
binary search). Pruned chunks take no cache bytes, so a cache sized in bytes holds more of the rows that matter.
While a row is cached its quantized copy in the store is stale: the cache is the master, and a packed export drops
the stale codes (``packed.py``), so what is served holds each row once. :meth:`HotRowCache.refresh` re-ranks rows by
their decayed access counts, writes evicted rows back to the store (round to nearest: the cache holds the trained
value exactly) and loads admitted rows from it, hottest first, while they fit the row limit and the byte budget
(values, id and start: ``4 * count * chunk_size + 16`` bytes a row; the rank bitmap below counts too).

Lookups in the native kernel find a row's cache position in O(1) through a rank bitmap derived from ``ids`` (one bit
a row, and an int32 count of cached rows per 64 rows: 0.19 bytes a row).

Bytes: ``values``, ``ids``, ``starts`` and the bitmap are payload (inference reads them); the access counts (4 bytes
a row) are training state.
"""
from __future__ import annotations

import torch
from torch import nn

from ...state_loading import only_adopting_shapes
from ...table_types import TableBytes
from .kernels import expand_runs
from .packed_op import cache_index

ROW_OVERHEAD = 16   # bytes a cached row costs beside its values: its id and its start (int64 each)


def cache_ranges(starts: torch.Tensor, positions: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Flat indices into the cache's ``values`` of the rows at ``positions`` (``starts`` in chunks), concatenated in
    that order."""
    return expand_runs(starts[positions] * chunk_size, (starts[positions + 1] - starts[positions]) * chunk_size)[2]


def starts_error(starts: torch.Tensor, cached_rows: int, values: int, chunk_size: int, chunks_per_row: int
                 ) -> str | None:
    """What is wrong with ``starts`` (in chunks) as the cut of ``values`` cached values into ``cached_rows`` rows
    of at most ``chunks_per_row`` chunks, or None (a training cache's and a packed table's layout alike)."""
    steps = starts[1:] - starts[:-1]
    if starts.numel() != cached_rows + 1 or int(starts[0]) != 0 or bool((steps < 0).any()) or \
            bool((steps > chunks_per_row).any()):
        return "starts do not cut the cached values into rows of at most the row's chunks"
    if int(starts[-1]) * chunk_size != values:
        return "starts do not end at the cached values' chunks"
    return None


def flat_cache_values(ids: torch.Tensor, values: torch.Tensor, counts: torch.Tensor, chunk_size: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat values, starts) of a cache saved the older way, a full-dimension row ``values [k, dim]`` a cached row
    (chunks past the row's count zero): each row's first ``counts[id] * chunk_size`` values."""
    chunks = counts[ids].long()
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(chunks, 0)])
    at, within, _ = expand_runs(torch.zeros_like(chunks), chunks * chunk_size)
    return values[at, within].contiguous(), starts


class HotRowCache(nn.Module):
    """FP32 copies of the stored chunks of the most accessed rows of a :class:`~.store.ChunkStore`, at most
    ``capacity`` rows and, with ``byte_budget`` > 0, at most that many bytes (see the module doc)."""

    def __init__(self, num_rows: int, dim: int, capacity: int, chunk_size: int, byte_budget: int = 0) -> None:
        super().__init__()
        if capacity < 0 or capacity > num_rows:
            raise ValueError(f"cache capacity must be in [0, {num_rows}], got {capacity}")
        if byte_budget < 0:
            raise ValueError(f"cache byte budget must be >= 0, got {byte_budget}")
        if chunk_size < 1 or dim % chunk_size:
            raise ValueError(f"chunk_size {chunk_size} must divide dim {dim}")
        self.num_rows, self.dim, self.chunk_size = num_rows, dim, chunk_size
        self.register_buffer("limit", torch.tensor(capacity))
        self.register_buffer("byte_limit", torch.tensor(byte_budget, dtype=torch.int64))
        self.register_buffer("ids", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("values", torch.zeros(0))
        self.register_buffer("starts", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("access", torch.zeros(num_rows))
        words = (num_rows + 63) // 64   # derived lookup structure (not saved): one bit a row, rank per 64 rows
        self.register_buffer("bits", torch.zeros(words, dtype=torch.int64), persistent=False)
        self.register_buffer("rank", torch.zeros(words, dtype=torch.int32), persistent=False)

    @property
    def capacity(self) -> int:
        """Rows the cache holds at most."""
        return int(self.limit)

    @property
    def byte_budget(self) -> int:
        """Bytes the cache holds at most at a refresh (values, ids, starts and the rank bitmap; 0: no byte
        limit)."""
        return int(self.byte_limit)

    def _index(self) -> None:
        """Rebuild the rank bitmap from ``ids``: a cached row's position is ``rank[r >> 6]`` plus the set bits
        below ``r`` in its word (O(1) per lookup in the native kernel)."""
        self.bits, self.rank = cache_index(self.ids, self.num_rows)

    def rebuild_derived(self) -> None:
        """Rebuild the rank bitmap after ``ids`` were written in place (a sharded checkpoint's load)."""
        self._index()

    def layout_error(self) -> str | None:
        """What is wrong with ``ids`` / ``starts`` / ``values`` as a cache layout, or None."""
        k = self.ids.numel()
        wrong = starts_error(self.starts, k, self.values.numel(), self.chunk_size, self.dim // self.chunk_size)
        if wrong is not None:
            return f"cache.{wrong}"
        if k and (bool((self.ids[1:] <= self.ids[:-1]).any()) or int(self.ids[0]) < 0 or
                  int(self.ids[-1]) >= self.num_rows):
            return "cache.ids are not ascending row ids of the table"
        return None

    def _set(self, ids: torch.Tensor, values: torch.Tensor, chunks: torch.Tensor) -> None:
        """Hold rows ``ids`` of ``chunks`` stored chunks each, their values concatenated in ``values``."""
        self.ids, self.values = ids, values.contiguous()
        self.starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(chunks, 0)])
        self._index()

    def _chunks(self, positions: torch.Tensor) -> torch.Tensor:
        return self.starts[positions + 1] - self.starts[positions]

    def record(self, ids: torch.Tensor) -> None:
        """Count one access of every id (a lookup in training)."""
        self.access.index_add_(0, ids, torch.ones(ids.numel()))

    def positions(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cached?, position in the cache) of every row in ``rows``."""
        if self.ids.numel() == 0:
            return torch.zeros(rows.shape, dtype=torch.bool), torch.zeros(rows.shape, dtype=torch.int64)
        pos = torch.searchsorted(self.ids, rows).clamp(max=self.ids.numel() - 1)
        return self.ids[pos] == rows, pos

    def dense_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """The cached rows at ``positions`` as full ``[n, dim]`` rows, chunks past their count as zeros."""
        cs = self.chunk_size
        at, within, flat = expand_runs(self.starts[positions] * cs, self._chunks(positions) * cs)
        out = torch.zeros(positions.numel(), self.dim)
        out[at, within] = self.values[flat]
        return out

    def chunk_index(self, positions: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """``[n, chunk_size]`` flat indices into ``values`` of chunk ``chunks[i]`` of the cached row at
        ``positions[i]``."""
        cs = self.chunk_size
        return ((self.starts[positions] + chunks) * cs)[:, None] + torch.arange(cs)

    def write_back(self, store, positions: torch.Tensor) -> None:
        """Store the cached rows at ``positions`` into ``store`` (round to nearest)."""
        rows = self.ids[positions]
        at, chunk, slots = expand_runs(*store.row_slots(rows))
        if slots.numel():
            store.write(slots, self.values[cache_ranges(self.starts, positions, self.chunk_size)].view(
                -1, self.chunk_size), rows=rows[at])

    def _load(self, store, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat FP32 stored values, their chunk counts) of ``rows`` read from the store."""
        at, _, slots = expand_runs(*store.row_slots(rows))
        values = store.read(slots, rows[at]).reshape(-1) if slots.numel() else torch.zeros(0)
        return values, store.row_counts()[rows]

    def refresh(self, store) -> dict[str, int]:
        """Cache the rows with the most (decayed) accesses among those storing chunks, hottest first, while they
        fit ``capacity`` rows and the byte budget; evicted rows go back to the store, admitted ones come from it;
        then halve the access counts (the decay). Returns counts of evicted and admitted rows."""
        counts = store.row_counts()
        stored = torch.nonzero(counts > 0).flatten()
        k = min(self.capacity, stored.numel())
        hot = stored[torch.topk(self.access[stored], k, sorted=True).indices] if k else self.ids[:0]
        if self.byte_budget and hot.numel():   # + the last start and the rank bitmap, whatever is cached
            fixed = 8 + sum(t.numel() * t.element_size() for t in (self.bits, self.rank))
            cost = torch.cumsum(counts[hot] * store.chunk_size * 4 + ROW_OVERHEAD, 0) + fixed
            hot = hot[cost <= self.byte_budget]
        hot = torch.sort(hot).values
        keep = torch.isin(self.ids, hot)
        evicted = torch.nonzero(~keep).flatten()
        self.write_back(store, evicted)
        new = hot[~torch.isin(hot, self.ids)]
        kept = torch.nonzero(keep).flatten()
        fresh, fresh_chunks = self._load(store, new)
        ids = torch.cat([self.ids[kept], new])
        chunks = torch.cat([self._chunks(kept), fresh_chunks])
        values = torch.cat([self.values[cache_ranges(self.starts, kept, self.chunk_size)], fresh])
        order = torch.argsort(ids)
        ends = torch.cumsum(chunks, 0)
        self._set(ids[order], values[cache_ranges(torch.cat([ends.new_zeros(1), ends]), order, self.chunk_size)],
                  chunks[order])
        self.access.mul_(0.5)
        return {"evicted": int(evicted.numel()), "admitted": int(new.numel())}

    def flush(self, store) -> None:
        """Write every cached row back to the store and empty the cache."""
        self.write_back(store, torch.arange(self.ids.numel()))
        self._set(self.ids[:0], self.values[:0], torch.zeros(0, dtype=torch.int64))

    def resized(self, store, old_counts: torch.Tensor, fresh_zeros: bool = False) -> None:
        """After the store changed row counts (pruning, regrowth): cached rows drop their lost chunks and take their
        fresh ones from the store (their initial values), or as exact zeros with ``fresh_zeros`` (zero-initialised
        chunks, which row-wise codes hold only to within a step); chunks they kept stay the master copy. (The byte
        budget is applied again at the next refresh.)"""
        if self.ids.numel() == 0:
            return
        cs = self.chunk_size
        old = old_counts[self.ids].long()
        new = store.row_counts()[self.ids]
        if torch.equal(old, new):
            return
        kept = torch.minimum(old, new) * cs
        lengths = new * cs
        at, within, _ = expand_runs(torch.zeros_like(lengths), lengths)
        values = torch.zeros(int(lengths.sum()))
        mine = within < kept[at]
        values[mine] = self.values[self.starts[at[mine]] * cs + within[mine]]
        grown = torch.nonzero(new > old).flatten()
        if grown.numel() and not fresh_zeros:
            fresh, _ = self._load(store, self.ids[grown])
            g_at, g_within, _ = expand_runs(torch.zeros_like(grown), lengths[grown])
            take = g_within >= kept[grown][g_at]
            row_start = torch.cumsum(lengths, 0) - lengths
            values[(row_start[grown][g_at] + g_within)[take]] = fresh[take]
        self._set(self.ids, values, new)

    def table_bytes(self) -> TableBytes:
        """Payload (values, ids, starts and the rank bitmap; all of it ``cache``) and training (access counts)
        bytes."""
        tensors = (self.values, self.ids, self.starts, self.bits, self.rank)
        payload = sum(t.numel() * t.element_size() for t in tensors) if self.ids.numel() else \
            sum(t.numel() * t.element_size() for t in (self.bits, self.rank))
        return TableBytes(payload, training=self.access.numel() * self.access.element_size(), cache=payload)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("ids", "values", "starts"):   # a saved cache may hold another number of rows: adopt its shapes
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty(incoming.shape, dtype=getattr(self, name).dtype))
        if prefix + "limit" in state_dict and prefix + "byte_limit" not in state_dict:   # saved before byte budgets
            state_dict[prefix + "byte_limit"] = torch.tensor(0, dtype=torch.int64)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if only_adopting_shapes():    # placeholder values: the real ones come after (then rebuild_derived)
            return
        wrong = self.layout_error()
        if wrong is not None:
            error_msgs.append(f"{prefix}: {wrong}")
            return
        self._index()
