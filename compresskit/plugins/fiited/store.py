"""The FIITED chunk store: per-row prefixes of dimension chunks in one physical pool, addressed by row blocks.

Each embedding row of ``num_chunks * chunk_size`` values keeps a *prefix* of ``count[r]`` chunks (FIITED prunes
tail chunks first). The virtual address of a row is translated to a physical slot of the chunk pool through its
block of 64 rows:

    slot(r) = base[r // 64] + count[64 * (r // 64)] + ... + count[r - 1]
    chunks of r = pool[slot(r) : slot(r) + count[r]]

* ``pool``: Parameter ``[capacity, chunk_size]`` (the payload); a row's stored values are one contiguous run.
* ``counts``: uint8 per row (padded to whole 8-byte words; a block's counts are 64 contiguous bytes), ``base``:
  int64 per block (``row_index.py``). That is the whole index: 1.125 bytes a row, where a per-chunk hash index
  costs 8 bytes a stored chunk (so at ``chunk_size: 4`` and a 10% budget the index is 4.4% of the payload instead
  of 50%).
* A block's chunks form one extent ``[base, base + sum of its counts)``; extents never overlap. ``top``: slots in
  use from the front of the pool (live chunks plus holes left by relocated blocks).

Memory really follows the chunks: :meth:`shrink_rows` (pruning) packs the pool, and a store without a fixed
capacity replaces its pool, per-slot buffers and the optimizer's per-slot state by tensors of exactly the live size.
A fixed-capacity store (lazy tables, whose pool is the budget) packs in place and reuses the freed slots:
:meth:`grow_rows` relocates a growing block to the top of the pool, packing first when the top is reached.
Every move of chunks moves the per-slot buffers (utilities, fused-optimizer state) and, when an optimizer is
attached, its per-slot state with them, so no chunk and no statistic is lost.

Quantized storage (:meth:`set_storage`): the payload becomes the per-slot buffer ``codes`` (INT8 / packed INT4)
and ``scales``: FP16, one a chunk (a per-slot buffer too), or with ``scales='row'`` one (scale, offset) pair a row
(``[num_rows, 2]``, FBGEMM's row-wise layout; ``chunk_codec.py``). ``pool`` keeps its slots but no values (width
0), so every move, prune and regrowth above applies to the quantized chunks unchanged. :meth:`read` / :meth:`write`
convert; a row-wise write re-quantizes the whole rows it touches (their range may move), and chunks a row gains are
written as zeros or their initial values, never left as code 0 (which reads as the row's offset).
"""
from __future__ import annotations

import weakref
from typing import Callable, Iterator

import torch
from torch import nn

from ...params import swap_parameter
from ...table_types import TableBytes
from .kernels import expand_runs, row_slots
from .row_index import (BLOCK, block_counts, block_totals, index_shapes, older_layout, packed_bases,
                        padded_counts, set_block_counts)
from .chunk_codec import SCALES, STORAGE_BITS, code_bytes, dequantize, quantize, quantize_rows

_MOVE_BATCH = 1 << 20  # chunks moved per batch when packing in place (bounds the temporary memory)
_ROW_BATCH = 1 << 18   # rows a batch when listing kept chunks (bounds the temporary memory of a pruning round)


def index_from_blocks_of_8(state_dict: dict, prefix: str, num_rows: int) -> dict:
    """``state_dict`` with a store saved in the layout of 8-row blocks (compresskit before the 64-row index) moved
    to this layout: its stored chunks repacked in row order (every per-slot tensor permuted alike, the capacity
    kept) and ``counts`` / ``base`` rebuilt. Other state dicts are returned as they are. A torch optimizer's
    per-slot state saved beside such a store is not permuted: resume it with a fused optimizer, or export it."""
    counts, base = state_dict.get(prefix + "counts"), state_dict.get(prefix + "base")
    pool = state_dict.get(prefix + "pool")
    if counts is None or base is None or pool is None or not older_layout(counts.numel(), base.numel()):
        return state_dict
    rows = torch.nonzero(counts[:num_rows]).flatten()
    block = counts.view(-1, 8)[rows // 8]
    before = torch.arange(8)[None, :] < (rows % 8)[:, None]
    first = base[rows // 8] + torch.where(before, block, 0).sum(1, dtype=torch.int64)
    src = expand_runs(first, counts[rows].long())[2]
    out = dict(state_dict)
    for key, value in state_dict.items():
        name = key[len(prefix):]
        if key.startswith(prefix) and "." not in name and torch.is_tensor(value) and value.dim() >= 1 \
                and value.shape[0] == pool.shape[0]:
            fresh = torch.zeros_like(value)
            fresh[:src.numel()] = value[src]
            out[key] = fresh
    new_counts = padded_counts(counts, num_rows)
    out[prefix + "counts"], out[prefix + "base"] = new_counts, packed_bases(new_counts)
    out[prefix + "top"] = torch.tensor(src.numel(), dtype=torch.int64)
    return out


class StoreFullError(RuntimeError):
    """Raised when chunks must be stored beyond a fixed capacity."""


class ChunkStore(nn.Module):
    """Prefix-chunk store; see the module docstring for the layout and its guarantees."""

    def __init__(self, num_rows: int, num_chunks: int, chunk_size: int, capacity: int = 0,
                 fixed_capacity: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if num_chunks > 255:
            raise ValueError(f"at most 255 chunks per row are supported, got {num_chunks}")
        self.num_rows, self.num_chunks, self.chunk_size = num_rows, num_chunks, chunk_size
        self.fixed_capacity = fixed_capacity
        rows, blocks = index_shapes(num_rows)
        self.pool = nn.Parameter(torch.zeros(capacity, chunk_size, dtype=dtype))
        self.register_buffer("counts", torch.zeros(rows, dtype=torch.uint8))
        self.register_buffer("base", torch.zeros(blocks, dtype=torch.int64))
        self.register_buffer("top", torch.zeros((), dtype=torch.int64))
        self._slot_buffers: list[str] = []
        self._optimizer: weakref.ref | None = None
        self.bits = 32          # 8 / 4 once set_storage quantizes the payload

    # ----------------------------------------------------------------------------------------------- storage
    @property
    def quantized(self) -> bool:
        """Whether the payload is stored as INT8 / INT4 codes with FP16 scales."""
        return self.bits < 32

    @property
    def row_scales(self) -> bool:
        """Whether a quantized payload has one (scale, offset) pair a row instead of a scale a chunk."""
        return self.quantized and self.scales.dim() == 2

    def set_storage(self, storage: str, scales: str = "chunk") -> None:
        """Store the payload as ``'int8'`` or ``'int4'`` codes with one FP16 scale a chunk (``scales='chunk'``) or
        one FP16 scale and offset a row (``'row'``), round to nearest, from now on; the FP32 values are freed.
        Irreversible; the pool then trains only through a fused update."""
        if storage not in STORAGE_BITS:
            raise ValueError(f"storage must be one of {', '.join(STORAGE_BITS)}, got {storage!r}")
        if scales not in SCALES:
            raise ValueError(f"scales must be one of {', '.join(SCALES)}, got {scales!r}")
        if self.quantized:
            if STORAGE_BITS[storage] != self.bits or (scales == "row") != self.row_scales:
                raise ValueError(f"the store is already {self.bits}-bit with scales "
                                 f"'{'row' if self.row_scales else 'chunk'}'")
            return
        bits = STORAGE_BITS[storage]
        width = code_bytes(bits, self.chunk_size)
        values = self.pool.detach()
        self.register_slot_buffer("codes", (width,), torch.uint8)
        if scales == "row":
            self.register_buffer("scales", torch.zeros(self.num_rows, 2, dtype=torch.float16))
        else:
            self.register_slot_buffer("scales", (), torch.float16)
        self.register_buffer("storage_bits", torch.tensor(bits))
        self.bits = bits
        rows, _, slots = self.entries()
        self.write(slots, values[slots], rows=rows)
        self.pool = nn.Parameter(torch.zeros(self.capacity, 0), requires_grad=False)

    def slot_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """The row storing each of ``slots`` (live slots)."""
        rows, _, live = self.entries()
        owner = torch.full((self.capacity,), -1, dtype=torch.int64)
        owner[live] = rows
        out = owner[slots]
        if bool((out < 0).any()):
            raise ValueError("slot_rows: a slot holds no stored chunk")
        return out

    def read(self, slots: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 values ``[len(slots), chunk_size]`` of the chunks in ``slots`` (``rows``: the row of each, which
        row-wise scales need; found from the index when not given)."""
        if not self.quantized:
            return self.pool.detach()[slots].float()
        if self.row_scales:
            rows = self.slot_rows(slots) if rows is None else rows
            return dequantize(self.codes[slots], self.scales[rows], self.bits)
        return dequantize(self.codes[slots], self.scales[slots], self.bits)

    def write(self, slots: torch.Tensor, values: torch.Tensor, rounding: str = "nearest",
              generator: torch.Generator | None = None, rows: torch.Tensor | None = None) -> None:
        """Store ``values [len(slots), chunk_size]`` in ``slots`` (quantized with ``rounding`` when the payload is).
        Row-wise scales: ``rows`` (the row of each slot; found from the index when not given) are re-quantized
        whole, their other chunks kept."""
        with torch.no_grad():
            if not self.quantized:
                self.pool.data[slots] = values.to(self.pool.dtype)
            elif not self.row_scales:
                codes, scales = quantize(values, self.bits, rounding, generator)
                self.codes[slots] = codes
                self.scales[slots] = scales
            elif slots.numel():
                rows = self.slot_rows(slots) if rows is None else rows
                touched = torch.unique(rows)
                run, _, every = expand_runs(*self.row_slots(touched))
                full = values.new_empty(every.numel(), self.chunk_size, dtype=torch.float32)
                order = torch.argsort(every)
                where = order[torch.searchsorted(every[order], slots)]   # each written slot's place in `every`
                given = torch.zeros(every.numel(), dtype=torch.bool)
                given[where] = True
                full[where] = values.float()
                rest = torch.nonzero(~given).flatten()
                if rest.numel():
                    full[rest] = dequantize(self.codes[every[rest]], self.scales[touched[run[rest]]], self.bits)
                codes, qparams = quantize_rows(full, run, touched.numel(), self.bits, rounding, generator)
                self.codes[every] = codes
                self.scales[touched] = qparams

    # ----------------------------------------------------------------------------------------------- layout
    @property
    def capacity(self) -> int:
        """Physical chunk slots in the pool."""
        return self.pool.shape[0]

    @property
    def live(self) -> int:
        """Stored chunks."""
        return int(self.counts.sum(dtype=torch.int64))

    def register_slot_buffer(self, name: str, tail: tuple[int, ...] = (), dtype: torch.dtype = torch.float32
                             ) -> None:
        """A per-slot buffer ``[capacity, *tail]`` kept aligned with the pool through every move (zeros). One that a
        loaded state dict brought along (the fused optimizer's state in a saved ``model.pt``) is kept as loaded."""
        if name in self._slot_buffers:
            return
        self.register_buffer(name, torch.zeros(self.capacity, *tail, dtype=dtype))
        self._slot_buffers.append(name)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_optimizer"] = None  # a weak reference does not pickle; the trainer attaches its optimizer again
        return state

    def attach_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Keep ``optimizer``'s per-slot state of the pool aligned through moves (and swap it a new pool)."""
        self._optimizer = weakref.ref(optimizer) if optimizer is not None else None

    def row_counts(self) -> torch.Tensor:
        """Stored chunks of every row (int64 ``[num_rows]``)."""
        return self.counts[:self.num_rows].long()

    def row_slots(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first slot, stored chunks) of each row (int64 each)."""
        return row_slots(self.counts, self.base, rows, self.num_rows)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every stored chunk as (row, chunk, slot), ordered by row then chunk."""
        cnt = self.row_counts()
        rows = torch.nonzero(cnt).flatten()
        run, chunk, slots = expand_runs(*self.row_slots(rows))
        return rows[run], chunk, slots

    def dense(self) -> torch.Tensor:
        """The full ``[num_rows, num_chunks * chunk_size]`` table, missing chunks as zeros (tests, export)."""
        out = torch.zeros(self.num_rows * self.num_chunks, self.chunk_size,
                          dtype=torch.float32 if self.quantized else self.pool.dtype)
        rows, chunks, slots = self.entries()
        out[rows * self.num_chunks + chunks] = self.read(slots, rows).to(out.dtype)
        return out.view(self.num_rows, self.num_chunks * self.chunk_size)

    # ----------------------------------------------------------------------------------------------- filling
    def load_dense(self, weight: torch.Tensor) -> None:
        """Store every row whole, copied from ``weight [num_rows, num_chunks * chunk_size]``."""
        if tuple(weight.shape) != (self.num_rows, self.num_chunks * self.chunk_size):
            raise ValueError(f"weight shape {tuple(weight.shape)} != "
                             f"({self.num_rows}, {self.num_chunks * self.chunk_size})")
        total = self.num_rows * self.num_chunks
        if self.fixed_capacity and total > self.capacity:
            raise StoreFullError(f"a dense table needs {total} chunk slots, capacity is {self.capacity}")
        self.counts.zero_()
        self.counts[:self.num_rows] = self.num_chunks
        self._set_bases_packed()
        self._replace_tensors(max(total, self.capacity) if self.fixed_capacity else total,
                              torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
        values = weight.detach().reshape(total, self.chunk_size)
        if self.quantized:
            self.write(torch.arange(total), values,
                       rows=torch.arange(self.num_rows).repeat_interleave(self.num_chunks))
        else:                                 # a straight copy: no slot list as large as the table
            with torch.no_grad():
                self.pool.data[:total].copy_(values)
        self.top.fill_(total)

    def _set_bases_packed(self) -> None:
        self.base.copy_(packed_bases(self.counts))

    # ----------------------------------------------------------------------------------------------- moves
    def _optimizer_state(self) -> dict | None:
        opt = self._optimizer() if self._optimizer is not None else None
        return opt.state.get(self.pool) if opt is not None else None

    def _slot_tensors(self) -> list[torch.Tensor]:
        """Every tensor indexed by slot: pool, slot buffers, the attached optimizer's per-slot state."""
        out = [self.pool] + [getattr(self, name) for name in self._slot_buffers]
        state = self._optimizer_state() or {}
        return out + [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == self.capacity]

    def _replace_tensors(self, capacity: int, src: torch.Tensor | Callable[[], Iterator[torch.Tensor]],
                         dst: torch.Tensor | None) -> None:
        """New slot tensors of ``capacity`` slots holding old slots ``src`` at ``dst`` (None: at ``0 ..
        len(src) - 1``, gathered straight into place; then ``src`` may also be a callable yielding the old slots in
        batches, called once a tensor), zeros elsewhere. One tensor at a time, so a replacement holds at most one
        new tensor beside the old ones."""
        def remap(tensor: torch.Tensor) -> torch.Tensor:
            if dst is None:
                fresh = tensor.new_empty(capacity, *tensor.shape[1:])
                at = 0
                for part in src() if callable(src) else (src,):
                    torch.index_select(tensor.detach(), 0, part, out=fresh[at:at + part.numel()])
                    at += part.numel()
                fresh[at:] = 0
                return fresh
            fresh = tensor.new_zeros(capacity, *tensor.shape[1:])
            if src.numel():
                fresh[dst] = tensor.detach()[src]
            return fresh

        for name in self._slot_buffers:
            setattr(self, name, remap(getattr(self, name)))
        swap_parameter(self, "pool", remap(self.pool), self._optimizer() if self._optimizer else None, remap)

    def _move_in_place(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots ``src`` to ``dst`` in every slot tensor; batches in ascending order, valid when packing
        (``dst <= src``, both ascending) or when ``dst`` lies beyond every ``src`` (relocation to the top)."""
        tensors = self._slot_tensors()
        with torch.no_grad():
            for start in range(0, src.numel(), _MOVE_BATCH):
                s, d = src[start:start + _MOVE_BATCH], dst[start:start + _MOVE_BATCH]
                for t in tensors:
                    t.data[d] = t.data[s]

    def _zero_slots(self, slots: torch.Tensor) -> None:
        with torch.no_grad():
            for t in self._slot_tensors():
                t.data[slots] = 0

    def _block_chunk_slots(self, blocks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Slots of every chunk of ``blocks`` (in block then row order) given their rows' ``counts [k, BLOCK]``."""
        totals = counts.sum(1, dtype=torch.int64)
        start = torch.repeat_interleave(self.base[blocks] - (torch.cumsum(totals, 0) - totals), totals)
        return start + torch.arange(int(totals.sum()))

    def _pack_blocks(self, blocks: torch.Tensor, src: torch.Tensor) -> None:
        """Move ``blocks`` (in pool order), whose live chunks sit at ascending slots ``src``, to the front of the
        pool in place (destinations never pass sources) and rebase them on their current counts."""
        totals = block_totals(self.counts)[blocks]
        self.base[blocks] = torch.cumsum(totals, 0) - totals
        dst = torch.arange(src.numel())
        moved = src != dst
        self._move_in_place(src[moved], dst[moved])
        self.top.fill_(src.numel())

    def pack(self) -> None:
        """Close the holes: move every block's extent down to the front, in pool order (in place)."""
        blocks = torch.nonzero(block_totals(self.counts)).flatten()
        blocks = blocks[torch.argsort(self.base[blocks], stable=True)]
        self._pack_blocks(blocks, self._block_chunk_slots(blocks, block_counts(self.counts, blocks)))

    # ----------------------------------------------------------------------------------------------- pruning
    def shrink_rows(self, new_counts: torch.Tensor) -> None:
        """Keep only the first ``new_counts[r] <= counts[r]`` chunks of every row and free the rest.

        A store without a fixed capacity then holds exactly the live chunks (new, smaller tensors: the memory is
        returned; the kept chunks' old slots are found a batch of rows at a time as each tensor is rebuilt, never
        all at once); a fixed-capacity store packs in place.
        """
        new_counts = new_counts.reshape(-1).long()
        old = self.row_counts()
        if new_counts.numel() != self.num_rows or bool((new_counts > old).any()) or bool((new_counts < 0).any()):
            raise ValueError("shrink_rows: new counts must be given for every row and lie in 0..current count")
        rows = torch.nonzero(new_counts).flatten()
        lengths = new_counts[rows]
        if self.fixed_capacity:  # freed slots are reused in place (grow_rows zeroes them when it takes them)
            kept_slots = self._prefix_slots(rows, lengths)
            self.counts[:self.num_rows] = new_counts.to(torch.uint8)
            blocks = torch.unique(rows // BLOCK)
            self._pack_blocks(blocks[torch.argsort(self.base[blocks], stable=True)], torch.sort(kept_slots).values)
            return
        old_counts, old_base = self.counts.clone(), self.base.clone()   # the old layout, to find the kept slots

        def kept_slots() -> Iterator[torch.Tensor]:
            """The kept chunks' old slots in new order, a batch of rows at a time."""
            for start in range(0, rows.numel(), _ROW_BATCH):
                first, _ = row_slots(old_counts, old_base, rows[start:start + _ROW_BATCH], self.num_rows)
                yield expand_runs(first, lengths[start:start + _ROW_BATCH])[2]

        total = int(lengths.sum())
        self.counts[:self.num_rows] = new_counts.to(torch.uint8)
        self._set_bases_packed()
        self._replace_tensors(total, kept_slots, None)
        self.top.fill_(total)

    def _prefix_slots(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Slots of the first ``lengths[i]`` stored chunks of every row ``rows[i]`` (ascending rows), in row then
        chunk order: built a batch of rows at a time into one tensor, so a pruning round over a large table never
        holds a (row, chunk, slot) triple for every stored chunk."""
        out = torch.empty(int(lengths.sum()), dtype=torch.int64)
        at = 0
        for start in range(0, rows.numel(), _ROW_BATCH):
            length = lengths[start:start + _ROW_BATCH]
            first, _ = self.row_slots(rows[start:start + _ROW_BATCH])
            slots = expand_runs(first, length)[2]
            out[at:at + slots.numel()] = slots
            at += slots.numel()
        return out

    # ----------------------------------------------------------------------------------------------- growth
    def grow_rows(self, rows: torch.Tensor, count: int, init=None) -> torch.Tensor:
        """Give distinct ``rows`` (those holding fewer) ``count`` chunks each; returns the rows that were grown.

        New chunks get ``init(n, chunk_size)`` values (zeros if ``init`` is None) and zeroed per-slot state. A
        growing block moves to the top of the pool. A store without a fixed capacity grows when the top is reached
        (packing first if the holes left by earlier moves are at least 1/16 of it). A fixed-capacity store grows
        whole blocks, in the order their first row appears in ``rows``, while their new chunks fit in its free
        slots, and leaves the other rows as they were; when they do not fit above the top, the other blocks are
        packed below them first (once the holes are at least 1/64 of the pool; before that only blocks that fit
        above the top grow).
        """
        rows = rows.reshape(-1).long()
        rows = rows[self.row_counts()[rows] < count]
        if rows.numel() == 0:
            return rows
        blocks, inverse = torch.unique(rows // BLOCK, return_inverse=True)
        cur = block_counts(self.counts, blocks).long()
        new = cur.clone()
        new.view(-1)[inverse * BLOCK + rows % BLOCK] = count
        size = new.sum(1)
        first = torch.full((blocks.numel(),), rows.numel(), dtype=torch.int64).scatter_reduce(
            0, inverse, torch.arange(rows.numel()), "amin")
        priority = torch.argsort(first, stable=True)
        if self.fixed_capacity:   # a block's old chunks leave holes when it moves: only its new ones need room
            fits = priority[torch.cumsum((size - cur.sum(1))[priority], 0) <= self.capacity - self.live]
            if int(self.top) + int(size[fits].sum()) > self.capacity and \
                    int(self.top) - self.live < max(self.capacity // 64, 1):   # too few holes to be worth a pack
                fits = priority[torch.cumsum(size[priority], 0) <= self.capacity - int(self.top)]
        else:
            needed = int(size.sum())
            holes = int(self.top) - self.live
            if int(self.top) + needed > self.capacity and holes >= needed and holes >= self.capacity // 16:
                self.pack()  # only when the holes are worth a pass over the pool (pruning rounds pack anyway)
            if needed > self.capacity - int(self.top):
                top = int(self.top)
                self._replace_tensors(max(top + needed, 2 * self.capacity, 16), torch.arange(top),
                                      torch.arange(top))
            fits = priority
        if fits.numel() < blocks.numel():
            fits = torch.sort(fits).values
            admitted = torch.zeros(blocks.numel(), dtype=torch.bool)
            admitted[fits] = True
            rows = rows[admitted[inverse]]
            blocks, cur, new, size = blocks[fits], cur[fits], new[fits], size[fits]
        if blocks.numel() == 0:
            return rows
        src = self._block_chunk_slots(blocks, cur)
        saved = None
        if int(self.top) + int(size.sum()) > self.capacity:   # fixed capacity: pack the other blocks below them
            saved = [t.data[src].clone() for t in self._slot_tensors()]
            set_block_counts(self.counts, blocks, torch.zeros_like(cur))
            self.pack()
        top = int(self.top)
        self.base[blocks] = top + torch.cumsum(size, 0) - size
        set_block_counts(self.counts, blocks, new)
        dst = self._block_chunk_slots(blocks, new)
        per_row = new.reshape(-1)
        chunk = torch.arange(dst.numel()) - torch.repeat_interleave(torch.cumsum(per_row, 0) - per_row, per_row)
        is_old = chunk < torch.repeat_interleave(cur.reshape(-1), per_row)
        if saved is None:
            self._move_in_place(src, dst[is_old])      # every destination lies above the old top: no overlap
        else:
            with torch.no_grad():
                for t, values in zip(self._slot_tensors(), saved):
                    t.data[dst[is_old]] = values
        fresh = dst[~is_old]
        self._zero_slots(fresh)
        if (init is not None or self.row_scales) and fresh.numel():
            owner = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)
            self.write(fresh, self._initial(fresh.numel(), init),
                       rows=torch.repeat_interleave(owner, per_row)[~is_old])
        self.top.fill_(top + int(size.sum()))
        return rows

    # ----------------------------------------------------------------------------------------------- both
    def resize_rows(self, new_counts: torch.Tensor, init=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Give every row ``new_counts[r]`` chunks (fewer: its tail goes; more: fresh chunks are appended), in one
        pass; returns the (row, slot) of every fresh chunk.

        Fresh chunks get ``init(n, chunk_size)`` values (zeros if ``init`` is None) and zeroed per-slot state (the
        optimizer's too). A store without a fixed capacity then holds exactly the live chunks, like
        :meth:`shrink_rows`; a fixed-capacity store shrinks in place, then grows the rows that fit
        (:meth:`grow_rows`), leaving the others at their shrunk count."""
        new_counts = new_counts.reshape(-1).long()
        if new_counts.numel() != self.num_rows or bool((new_counts < 0).any()) or \
                bool((new_counts > self.num_chunks).any()):
            raise ValueError(f"resize_rows: counts must be given for every row and lie in 0..{self.num_chunks}")
        old = self.row_counts()
        if self.fixed_capacity:
            self.shrink_rows(torch.minimum(old, new_counts))
            fresh_rows, fresh_chunks = [], []
            for count in torch.unique(new_counts[new_counts > old]).tolist():
                rows = torch.nonzero((new_counts == count) & (old < count)).flatten()
                before = self.row_counts()[rows]
                grown = self.grow_rows(rows, count, init)
                n = count - before[torch.isin(rows, grown)]
                fresh_rows.append(torch.repeat_interleave(grown, n))
                fresh_chunks.append(count - n.repeat_interleave(n) + torch.arange(int(n.sum()))
                                    - torch.repeat_interleave(torch.cumsum(n, 0) - n, n))
            if not fresh_rows:
                return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
            rows, chunks = torch.cat(fresh_rows), torch.cat(fresh_chunks)
            return rows, self.row_slots(rows)[0] + chunks      # slots in the final layout (later growth moves)
        rows, chunks, slots = self.entries()
        keep = chunks < new_counts[rows]
        self.counts[:self.num_rows] = new_counts.to(torch.uint8)
        self._set_bases_packed()
        new_rows, new_chunks, new_slots = self.entries()
        kept = new_chunks < old[new_rows]
        # the kept old chunks, in row-then-chunk order in both layouts
        self._replace_tensors(new_slots.numel(), slots[keep], new_slots[kept])
        self.top.fill_(new_slots.numel())
        fresh_rows, fresh_slots = new_rows[~kept], new_slots[~kept]
        if (init is not None or self.row_scales) and fresh_slots.numel():
            self.write(fresh_slots, self._initial(fresh_slots.numel(), init), rows=fresh_rows)
        return fresh_rows, fresh_slots

    def _initial(self, n: int, init) -> torch.Tensor:
        """Values of ``n`` fresh chunks: ``init(n, chunk_size)``, or zeros."""
        return init(n, self.chunk_size) if init is not None else torch.zeros(n, self.chunk_size)

    # ----------------------------------------------------------------------------------------------- memory
    def table_bytes(self) -> TableBytes:
        """Bytes of the tensors held: payload (pool, or codes + scales), index (counts + block bases), training (the
        other per-slot buffers: utilities, optimizer state)."""
        def size(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        values = {"codes", "scales"} if self.quantized else set()
        payload = size(self.pool) + sum(size(getattr(self, n)) for n in values)
        index = size(self.counts) + size(self.base)
        training = sum(size(getattr(self, n)) for n in self._slot_buffers if n not in values)
        return TableBytes(payload, index, training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A saved store may hold a different number of slots: adopt its shapes before copying. Per-slot state it
        # holds and this store does not yet (a trained model's fused-optimizer state) becomes a slot buffer too.
        state_dict = index_from_blocks_of_8(state_dict, prefix, self.num_rows)
        saved_pool = state_dict.get(prefix + "pool")
        saved_bits = state_dict.get(prefix + "storage_bits")
        saved_scales = state_dict.get(prefix + "scales")
        if self.quantized and saved_scales is not None and (saved_scales.dim() == 2) != self.row_scales:
            layout = {True: "row", False: "chunk"}
            raise ValueError(f"{prefix}scales: the state has {layout[saved_scales.dim() == 2]} scales, this store "
                             f"{layout[self.row_scales]} scales: load it into a table of the same precision.scales")
        if saved_bits is not None and not self.quantized:   # a quantized store's state: quantize first
            self.set_storage({b: name for name, b in STORAGE_BITS.items()}[int(saved_bits)],
                             "row" if saved_scales is not None and saved_scales.dim() == 2 else "chunk")
        for key, value in state_dict.items():
            name = key[len(prefix):]
            if (key.startswith(prefix) and name.isidentifier() and not hasattr(self, name) and saved_pool is not None
                    and torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == saved_pool.shape[0]):
                self.register_slot_buffer(name, tuple(value.shape[1:]), value.dtype)
        for name in ["pool", *self._slot_buffers]:
            incoming = state_dict.get(prefix + name)
            tensor = getattr(self, name)
            if incoming is not None and tensor.shape != incoming.shape:
                fresh = torch.empty(incoming.shape, dtype=tensor.dtype)
                if name == "pool":
                    self.pool = nn.Parameter(fresh, requires_grad=self.pool.requires_grad)
                else:
                    setattr(self, name, fresh)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
