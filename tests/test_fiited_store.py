"""Prefix-chunk store: behaviour against a plain per-row reference (hypothesis), slot reuse in a fixed pool, and
real memory release."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compresskit.plugins.fiited.store import ChunkStore

ROWS, CHUNKS, CS = 29, 4, 3

op = st.one_of(
    st.tuples(st.just("grow"), st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=12, unique=True),
              st.integers(1, CHUNKS)),
    st.tuples(st.just("shrink"), st.lists(st.integers(0, CHUNKS), min_size=ROWS, max_size=ROWS), st.none()),
    st.tuples(st.just("update"), st.integers(0, 10_000), st.none()),
    st.tuples(st.just("pack"), st.none(), st.none()),
)


def _check(store: ChunkStore, ref: torch.Tensor, counts: torch.Tensor) -> None:
    # every kept chunk holds its exact values and nothing else is stored
    assert torch.equal(store.row_counts(), counts)
    assert torch.equal(store.dense(), ref)
    # extents are disjoint and inside the used part of the pool; the utility slot buffer moved with the pool
    rows, chunks, slots = store.entries()
    assert len(set(slots.tolist())) == slots.numel() == store.live <= int(store.top) <= store.capacity
    assert torch.equal(store.utility[slots], store.pool.detach()[slots, 0])


@settings(max_examples=60, deadline=None)
@given(st.lists(op, min_size=1, max_size=12), st.integers(0, 2**16), st.booleans())
def test_store_matches_reference(ops, seed, fixed):
    gen = torch.Generator().manual_seed(seed)
    store = ChunkStore(ROWS, CHUNKS, CS, capacity=40 if fixed else 0, fixed_capacity=fixed)
    store.register_slot_buffer("utility")   # mirrors each chunk's first value: checks buffers move with the pool
    ref = torch.zeros(ROWS, CHUNKS * CS)
    counts = torch.zeros(ROWS, dtype=torch.int64)

    def init(n, cs):
        return torch.randn(n, cs, generator=gen)

    for kind, arg, count in ops:
        if kind == "grow":
            rows = torch.tensor(arg)
            grown = store.grow_rows(rows, count, init)
            assert set(grown.tolist()) <= set(arg)
            if not fixed:   # an unbounded store takes every row that held fewer chunks
                assert set(grown.tolist()) == {r for r in arg if counts[r] < count}
            for r in grown.tolist():
                first, _ = store.row_slots(torch.tensor([r]))
                values = store.pool.detach()[int(first):int(first) + count].reshape(-1)
                old = int(counts[r]) * CS
                assert torch.equal(values[:old], ref[r, :old])      # the kept prefix moved intact
                ref[r, :count * CS] = values
                counts[r] = count
        elif kind == "shrink":
            new = torch.minimum(torch.tensor(arg), counts)
            store.shrink_rows(new)
            for r in range(ROWS):
                ref[r, int(new[r]) * CS:] = 0
            counts = new
            if not fixed:   # memory follows the chunks
                assert store.capacity == store.live == int(counts.sum())
        elif kind == "update" and store.live:
            _, _, slots = store.entries()
            with torch.no_grad():
                store.pool[slots] += 1.0
            rows, chunks, _ = store.entries()
            for r, c in zip(rows.tolist(), chunks.tolist()):
                ref[r, c * CS:(c + 1) * CS] += 1.0
        elif kind == "pack":
            store.pack()
            assert int(store.top) == store.live
        _, _, slots = store.entries()
        store.utility[slots] = store.pool.detach()[slots, 0]
        _check(store, ref, counts)


def test_fixed_pool_reuses_freed_slots_and_refuses_what_does_not_fit():
    store = ChunkStore(1000, 2, 4, capacity=20, fixed_capacity=True)
    rows = torch.arange(10) * 64                                        # one row in each of 10 blocks
    assert store.grow_rows(rows, 2).numel() == 10                       # 20 slots: full
    assert store.grow_rows(torch.tensor([650]), 2).numel() == 0         # no room: refused, nothing changed
    counts = store.row_counts()
    counts[rows[:5]] = 0
    store.shrink_rows(counts)                                           # 10 slots freed in place
    assert store.capacity == 20 and store.live == 10
    grown = store.grow_rows(torch.tensor([650, 714, 778, 842, 906, 970]), 2)
    assert grown.tolist() == [650, 714, 778, 842, 906]                  # 5 rows fit into the freed slots
    assert store.capacity == 20 and store.live == 20


def test_shrinking_really_releases_memory():
    rows, c = 20_000, 8
    store = ChunkStore(rows, c, 8)
    store.load_dense(torch.randn(rows, c * 8))
    before = store.table_bytes()
    keep_rows = torch.arange(0, rows, 10)
    reference = store.dense()[keep_rows]
    counts = torch.zeros(rows, dtype=torch.int64)
    counts[keep_rows] = c
    store.shrink_rows(counts)
    after = store.table_bytes()
    assert after.payload == store.pool.numel() * 4 == len(keep_rows) * c * 8 * 4
    assert after.payload <= before.payload / 9.9
    assert store.pool.untyped_storage().nbytes() == after.payload   # the pool tensor itself is small now
    assert torch.equal(store.dense()[keep_rows], reference)
    # the index is 1.125 bytes a row whatever is stored: a count byte a row, an 8-byte base a block of 64 rows
    assert after.index == before.index == rows + (rows + 63) // 64 * 8


def test_moves_carry_the_attached_optimizer_state():
    store = ChunkStore(64, 4, 2)
    store.load_dense(torch.randn(64, 8))
    opt = torch.optim.Adagrad([store.pool], lr=0.1)
    store.pool.grad = torch.randn_like(store.pool)
    opt.step()
    store.attach_optimizer(opt)
    _, _, slots = store.entries()
    state_by_chunk = opt.state[store.pool]["sum"][slots].clone()
    counts = store.row_counts()
    counts[::2] = 1
    store.shrink_rows(counts)
    assert opt.param_groups[0]["params"][0] is store.pool            # the optimizer follows the new pool
    rows, chunks, new_slots = store.entries()
    assert torch.equal(opt.state[store.pool]["sum"][new_slots], state_by_chunk.view(64, 4, 2)[rows, chunks])


def test_a_small_fixed_store_loads_as_saved():
    """Up to 8 rows the old and new index have the same shapes: a saved store of today loads as it was saved (its
    holes and bases kept), so a torch optimizer's per-slot state saved beside it still matches its chunks."""
    store = ChunkStore(5, 2, 1, capacity=10, fixed_capacity=True)
    store.grow_rows(torch.tensor([0]), 2, lambda n, cs: torch.randn(n, cs))
    store.grow_rows(torch.tensor([3]), 2, lambda n, cs: torch.randn(n, cs))
    assert int(store.base[0]) > 0                                       # block 0 moved up: a hole below it
    fresh = ChunkStore(5, 2, 1, capacity=10, fixed_capacity=True)
    fresh.load_state_dict(store.state_dict())
    assert torch.equal(fresh.base, store.base) and int(fresh.top) == int(store.top)
    assert torch.equal(fresh.pool, store.pool)
