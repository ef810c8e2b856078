"""VHPI chunk store: virtually-hashed, physically-indexed storage of embedding dimension chunks.

Each embedding row of ``num_chunks * chunk_size`` values is split into fixed-size chunks. A chunk is addressed by
its *virtual key* ``row * num_chunks + chunk``. An open-addressing hash table (linear probing, vectorised over all
queries at once) maps the virtual key to a *physical slot*: a row of the chunk pool ``pool[slot]``, an
``nn.Parameter`` of shape ``[capacity, chunk_size]``. Memory is spent only on stored chunks:

* payload: ``capacity * chunk_size`` values of the pool;
* index: the hash table, ``ceil(live / load_factor)`` (key, slot) pairs;
* per-slot statistics registered with :meth:`register_slot_buffer` (e.g. FIITED's chunk utilities).

Removing chunks returns their slots to the free list; :meth:`compact` moves live chunks to the front and shrinks
the pool, the index and every slot buffer, so process memory really drops.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

EMPTY = -1
_HASH_MUL = 0x9E3779B1
_MASK32 = 0xFFFFFFFF


class StoreFullError(RuntimeError):
    """Raised when an insert needs more slots than ``max_capacity`` allows."""


class VHPIStore(nn.Module):
    """Hash-indexed pool of embedding chunks; see the module docstring for the layout."""

    def __init__(self, num_rows: int, num_chunks: int, chunk_size: int, capacity: int = 0,
                 max_capacity: int | None = None, load_factor: float = 0.75, dtype: torch.dtype = torch.float32
                 ) -> None:
        super().__init__()
        if not 0.1 <= load_factor <= 0.95:
            raise ValueError(f"load_factor must be in [0.1, 0.95], got {load_factor}")
        self.num_rows, self.num_chunks, self.chunk_size = num_rows, num_chunks, chunk_size
        self.load_factor = load_factor
        self.max_capacity = max_capacity
        self.key_dtype = torch.int32 if num_rows * num_chunks < 2**31 - 1 else torch.int64
        self.pool = nn.Parameter(torch.zeros(capacity, chunk_size, dtype=dtype))
        size = self._table_size(capacity)
        self.register_buffer("keys", torch.full((size,), EMPTY, dtype=self.key_dtype))
        self.register_buffer("slots", torch.full((size,), EMPTY, dtype=torch.int32))
        self._slot_buffers: list[str] = []
        self._free: torch.Tensor | None = None  # cached free-slot stack, rebuilt from the index when needed
        self._live: int | None = None           # cached number of stored chunks

    # ----------------------------------------------------------------------------------------------- layout
    def _table_size(self, live: int) -> int:
        return max(8, math.ceil(live / self.load_factor) + 1)

    def _hash(self, q: torch.Tensor) -> torch.Tensor:
        return ((q * _HASH_MUL) & _MASK32) % self.keys.numel()

    def register_slot_buffer(self, name: str, fill: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        """A per-slot buffer (one value per pool row) kept aligned with the pool through compaction."""
        self.register_buffer(name, torch.full((self.capacity,), fill, dtype=dtype))
        self._slot_buffers.append(name)

    @property
    def capacity(self) -> int:
        """Number of physical chunk slots in the pool."""
        return self.pool.shape[0]

    @property
    def live(self) -> int:
        """Number of stored chunks."""
        if self._live is None:
            self._live = int((self.keys != EMPTY).sum())
        return self._live

    def virtual_keys(self, rows: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """(row, chunk) -> virtual key (int64)."""
        return rows.long() * self.num_chunks + chunks.long()

    # ----------------------------------------------------------------------------------------------- index
    def _find(self, q: torch.Tensor) -> torch.Tensor:
        """Hash positions of keys ``q`` (int64), -1 where absent. Vectorised over probe rounds."""
        result = torch.full_like(q, -1)
        if q.numel() == 0 or self.keys.numel() == 0:
            return result
        pos = self._hash(q)
        active = torch.arange(q.numel(), device=q.device)
        size = self.keys.numel()
        for _ in range(size):
            p = pos[active]
            k = self.keys[p].long()
            hit = k == q[active]
            result[active[hit]] = p[hit]
            more = ~(hit | (k == EMPTY))
            active = active[more]
            if active.numel() == 0:
                break
            pos[active] = (p[more] + 1) % size
        return result

    def _place(self, q: torch.Tensor, s: torch.Tensor) -> None:
        """Insert distinct absent keys ``q`` with slots ``s`` into the index (which has room)."""
        size = self.keys.numel()
        pos = self._hash(q)
        pending = torch.arange(q.numel(), device=q.device)
        for _ in range(size + 1):
            if pending.numel() == 0:
                return
            p = pos[pending]
            free = self.keys[p] == EMPTY
            cand, pc = pending[free], p[free]
            self.keys[pc] = q[cand].to(self.key_dtype)          # among duplicates of a position one write wins
            won = self.keys[pc].long() == q[cand]
            self.slots[pc[won]] = s[cand[won]].to(torch.int32)
            pending = torch.cat([pending[~free], cand[~won]])
            pos[pending] = (pos[pending] + 1) % size
        raise RuntimeError("hash table full")  # unreachable: the table is sized above the live count

    def _rebuild(self, size: int | None = None) -> None:
        """Re-insert every live entry into a fresh table of ``size`` positions (default: sized for capacity)."""
        occupied = self.keys != EMPTY
        q, s = self.keys[occupied].long(), self.slots[occupied].long()
        size = size or self._table_size(max(self.capacity, q.numel()))
        self.keys = torch.full((size,), EMPTY, dtype=self.key_dtype)
        self.slots = torch.full((size,), EMPTY, dtype=torch.int32)
        self._place(q, s)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All stored chunks as (rows, chunks, slots), ordered by virtual key."""
        occupied = self.keys != EMPTY
        q, s = self.keys[occupied].long(), self.slots[occupied].long()
        order = torch.argsort(q)
        q, s = q[order], s[order]
        return q // self.num_chunks, q % self.num_chunks, s

    # ----------------------------------------------------------------------------------------------- slots
    def _free_stack(self) -> torch.Tensor:
        if self._free is None:
            used = torch.zeros(self.capacity, dtype=torch.bool)
            used[self.slots[self.slots != EMPTY].long()] = True
            self._free = torch.arange(self.capacity, dtype=torch.int32)[~used]  # ascending: lowest slots first
        return self._free

    @property
    def free_slots(self) -> int:
        """Slots available without growing the pool."""
        return int(self._free_stack().numel())

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity, 16)
        if self.max_capacity is not None:
            new_cap = min(new_cap, self.max_capacity)
        if new_cap < needed:
            raise StoreFullError(f"store needs {needed} chunk slots but max_capacity is {self.max_capacity}")
        extra = new_cap - self.capacity
        self.pool = nn.Parameter(torch.cat([self.pool.detach(), self.pool.new_zeros(extra, self.chunk_size)]),
                                 requires_grad=self.pool.requires_grad)
        for name in self._slot_buffers:
            buf = getattr(self, name)
            setattr(self, name, torch.cat([buf, buf.new_zeros(extra)]))
        self._free = None
        if self.keys.numel() < self._table_size(new_cap):
            self._rebuild(self._table_size(new_cap))

    def allocate(self, n: int) -> torch.Tensor:
        """Take ``n`` free slots (growing the pool up to ``max_capacity`` if needed)."""
        if n > self.free_slots:
            self._grow(self.capacity - self.free_slots + n)
        stack = self._free_stack()
        self._free = stack[n:]
        return stack[:n].long()

    # ----------------------------------------------------------------------------------------------- API
    def lookup(self, rows: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """Physical slot of each (row, chunk), -1 where the chunk is not stored."""
        pos = self._find(self.virtual_keys(rows, chunks))
        out = torch.full_like(pos, -1)
        hit = pos >= 0
        out[hit] = self.slots[pos[hit]].long()
        return out

    def lookup_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Slots of every chunk of each row: int64 [len(rows), num_chunks], -1 for chunks not stored."""
        c = self.num_chunks
        r = rows.long().repeat_interleave(c)
        ch = torch.arange(c).repeat(rows.numel())
        return self.lookup(r, ch).view(-1, c)

    def insert(self, rows: torch.Tensor, chunks: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """Store chunks (upsert): new keys get free slots, existing keys keep theirs; values written if given.

        ``(rows, chunks)`` pairs must be distinct. Returns the slots.
        """
        q = self.virtual_keys(rows, chunks)
        if q.numel() and torch.unique(q).numel() != q.numel():
            raise ValueError("insert: (row, chunk) pairs must be distinct")
        pos = self._find(q)
        slots = torch.full_like(q, -1)
        slots[pos >= 0] = self.slots[pos[pos >= 0]].long()
        new = pos < 0
        n_new = int(new.sum())
        if n_new:
            fresh = self.allocate(n_new)
            for name in self._slot_buffers:
                getattr(self, name)[fresh] = 0
            if (self.live + n_new) > self.load_factor * self.keys.numel():
                self._rebuild(self._table_size(self.live + n_new))
            self._place(q[new], fresh)
            self._live = self.live + n_new
            slots[new] = fresh
        if values is not None:
            with torch.no_grad():
                self.pool.data[slots] = values.to(self.pool.dtype)
        return slots

    def remove(self, rows: torch.Tensor, chunks: torch.Tensor) -> int:
        """Drop the given chunks (absent ones are ignored); their slots become free. Returns how many."""
        pos = self._find(self.virtual_keys(rows, chunks))
        pos = torch.unique(pos[pos >= 0])
        if pos.numel() == 0:
            return 0
        freed = self.slots[pos].long()
        self.keys[pos] = EMPTY
        self.slots[pos] = EMPTY
        with torch.no_grad():
            self.pool.data[freed] = 0
        self._rebuild(self.keys.numel())  # linear probing needs chains without holes
        self._free = None
        self._live = None
        return int(pos.numel())

    def compact(self, shrink: Callable[[nn.Module, str, torch.Tensor], object] | None = None) -> torch.Tensor:
        """Move live chunks to slots ``0..live-1`` and shrink pool, index and slot buffers to fit.

        ``shrink(module, "pool", keep)`` replaces the pool by a Parameter of rows ``keep`` (the trainer's
        ``shrink_parameter_rows`` also remaps optimizer state). Returns ``keep``: old slot of each new slot.
        """
        occupied = self.keys != EMPTY
        pos = torch.nonzero(occupied).flatten()
        old = self.slots[pos].long()
        order = torch.argsort(old)                  # keep relative order: deterministic layout
        keep = old[order]
        new_slot = torch.empty_like(old)
        new_slot[order] = torch.arange(old.numel())
        self.slots[pos] = new_slot.to(torch.int32)
        if shrink is not None:
            shrink(self, "pool", keep)
        else:
            self.pool = nn.Parameter(self.pool.detach()[keep].clone(), requires_grad=self.pool.requires_grad)
        for name in self._slot_buffers:
            setattr(self, name, getattr(self, name)[keep].clone())
        self._rebuild(self._table_size(keep.numel()))
        self._free = None
        self._live = None
        return keep

    def dense(self) -> torch.Tensor:
        """The full [num_rows, num_chunks * chunk_size] table with missing chunks as zeros (for tests/export)."""
        out = torch.zeros(self.num_rows * self.num_chunks, self.chunk_size, dtype=self.pool.dtype)
        rows, chunks, slots = self.entries()
        out[rows * self.num_chunks + chunks] = self.pool.data[slots]
        return out.view(self.num_rows, self.num_chunks * self.chunk_size)

    # ----------------------------------------------------------------------------------------------- memory
    def memory_bytes(self) -> dict[str, int]:
        """Bytes measured from the tensors held: payload (pool), index (hash table), per-slot stats."""
        payload = self.pool.numel() * self.pool.element_size()
        index = self.keys.numel() * self.keys.element_size() + self.slots.numel() * self.slots.element_size()
        if self._free is not None:
            index += self._free.numel() * self._free.element_size()
        stats = sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._slot_buffers)
        return {"payload": payload, "index": index, "stats": stats, "metadata": index + stats,
                "total": payload + index + stats}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A saved store may hold a different number of slots / index positions: take its shapes first.
        for name in ["pool", "keys", "slots", *self._slot_buffers]:
            key = prefix + name
            if key in state_dict:
                tensor = getattr(self, name)
                incoming = state_dict[key]
                if tensor.shape != incoming.shape:
                    if name == "pool":
                        self.pool = nn.Parameter(torch.empty_like(incoming, dtype=self.pool.dtype),
                                                 requires_grad=self.pool.requires_grad)
                    else:
                        setattr(self, name, torch.empty_like(incoming, dtype=tensor.dtype))
        self._free = None
        self._live = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
