"""VHPI store: behaviour against a plain dict reference (hypothesis), slot reuse and real memory release."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compresskit.plugins.fiited.store import EMPTY, StoreFullError, VHPIStore

ROWS, CHUNKS, CS = 40, 4, 3

op = st.one_of(
    st.tuples(st.just("insert"), st.lists(st.tuples(st.integers(0, ROWS - 1), st.integers(0, CHUNKS - 1)),
                                          min_size=1, max_size=30, unique=True)),
    st.tuples(st.just("remove"), st.lists(st.tuples(st.integers(0, ROWS - 1), st.integers(0, CHUNKS - 1)),
                                          min_size=1, max_size=30)),
    st.tuples(st.just("update"), st.integers(0, 10_000)),
    st.tuples(st.just("compact"), st.just(None)),
    st.tuples(st.just("lookup"), st.lists(st.tuples(st.integers(0, ROWS - 1), st.integers(0, CHUNKS - 1)),
                                          min_size=1, max_size=30)),
)


def _check(store: VHPIStore, ref: dict[tuple[int, int], torch.Tensor]) -> None:
    # every kept chunk is found with its exact values, nothing else is found
    rows, chunks, slots = store.entries()
    assert {(int(r), int(c)) for r, c in zip(rows, chunks)} == set(ref)
    for (r, c), value in ref.items():
        slot = int(store.lookup(torch.tensor([r]), torch.tensor([c]))[0])
        assert slot >= 0
        assert torch.equal(store.pool.detach()[slot], value)
    # no slot leaks: live slots are distinct, and live + free == capacity
    assert len(set(slots.tolist())) == len(slots)
    assert store.live + store.free_slots == store.capacity
    assert int((store.keys != EMPTY).sum()) <= store.load_factor * store.keys.numel() + 1


@settings(max_examples=60, deadline=None)
@given(st.lists(op, min_size=1, max_size=12), st.integers(0, 2**16))
def test_store_matches_dict_reference(ops, seed):
    gen = torch.Generator().manual_seed(seed)
    store = VHPIStore(ROWS, CHUNKS, CS, capacity=8)
    ref: dict[tuple[int, int], torch.Tensor] = {}
    for kind, arg in ops:
        if kind == "insert":
            r = torch.tensor([a for a, _ in arg])
            c = torch.tensor([b for _, b in arg])
            values = torch.randn(len(arg), CS, generator=gen)
            store.insert(r, c, values)
            for i, key in enumerate(arg):
                ref[key] = values[i].clone()
        elif kind == "remove":
            r = torch.tensor([a for a, _ in arg])
            c = torch.tensor([b for _, b in arg])
            removed = store.remove(r, c)
            assert removed == len({k for k in arg if k in ref})
            for key in arg:
                ref.pop(key, None)
        elif kind == "update" and ref:
            keys = sorted(ref)
            r = torch.tensor([a for a, _ in keys])
            c = torch.tensor([b for _, b in keys])
            slots = store.lookup(r, c)
            with torch.no_grad():
                store.pool[slots] += 1.0
            for key in keys:
                ref[key] = ref[key] + 1.0
        elif kind == "compact":
            store.compact()
            assert store.capacity == len(ref)
        elif kind == "lookup":
            r = torch.tensor([a for a, _ in arg])
            c = torch.tensor([b for _, b in arg])
            slots = store.lookup(r, c)
            for i, key in enumerate(arg):
                assert (int(slots[i]) >= 0) == (key in ref)
        _check(store, ref)


def test_removed_slots_are_reused_before_growing():
    store = VHPIStore(100, 2, 4, capacity=10)
    rows = torch.arange(5).repeat_interleave(2)
    chunks = torch.arange(2).repeat(5)
    store.insert(rows, chunks, torch.randn(10, 4))
    assert store.capacity == 10 and store.free_slots == 0
    freed = store.lookup(torch.tensor([0, 1]), torch.tensor([1, 1]))
    store.remove(torch.tensor([0, 1]), torch.tensor([1, 1]))
    new = store.insert(torch.tensor([50, 51]), torch.tensor([0, 0]), torch.ones(2, 4))
    assert store.capacity == 10                      # no growth: the freed slots were taken
    assert set(new.tolist()) == set(freed.tolist())


def test_max_capacity_is_enforced():
    store = VHPIStore(10, 1, 2, capacity=2, max_capacity=3)
    store.insert(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]))
    try:
        store.insert(torch.tensor([3]), torch.tensor([0]))
    except StoreFullError as e:
        assert "max_capacity is 3" in str(e)
    else:
        raise AssertionError("expected StoreFullError")


def test_compaction_really_releases_memory():
    rows, c = 20_000, 8
    store = VHPIStore(rows, c, 8, capacity=rows * c)
    r = torch.arange(rows).repeat_interleave(c)
    ch = torch.arange(c).repeat(rows)
    store.insert(r, ch, torch.randn(rows * c, 8))
    before = store.memory_bytes()
    keep_rows = torch.arange(0, rows, 10)
    drop = ~torch.isin(r, keep_rows)
    reference = store.dense()[keep_rows]
    store.remove(r[drop], ch[drop])
    store.compact()
    after = store.memory_bytes()
    assert after["payload"] == store.pool.numel() * 4 == len(keep_rows) * c * 8 * 4
    assert after["payload"] <= before["payload"] / 9.9
    assert after["index"] < before["index"] / 9
    assert store.pool.untyped_storage().nbytes() == after["payload"]   # the pool tensor itself is small now
    assert torch.equal(store.dense()[keep_rows], reference)
