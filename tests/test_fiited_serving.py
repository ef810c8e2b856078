"""The serving op of packed FIITED tables (``torch.ops.compresskit.packed_bag``): the native kernel equals the
pure-torch fallback and the trained module it was packed from, for FP32, INT8 and INT4 chunks with and without the
FP32 hot-row cache, every ``nn.EmbeddingBag`` input form, register-accumulator dims and the generic path (dim > 128);
the packed table keeps the trained codes and scales exactly; bad input is an IndexError / ValueError naming it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compresskit.plugins.fiited import FiitedEmbedding, FiitedEmbeddingBag, kernels
from compresskit.plugins.fiited.packed import PackedEmbeddingBag
from compresskit.table_types import TableBytes, dense_bytes

HAVE_NATIVE = kernels.native.kernels() is not None


def _trained(storage: str, rows: int = 203, dim: int = 16, cs: int = 4, cache_rows: float = 0.0, mode: str = "sum",
             last: bool = False, seed: int = 0) -> FiitedEmbeddingBag:
    """A table pruned to random prefixes (some rows empty, some full), quantized with a filled cache if asked."""
    g = torch.Generator().manual_seed(seed)
    m = FiitedEmbeddingBag(rows, dim, cs, mode=mode, include_last_offset=last, optimizer="adagrad", lr=0.1,
                           weight=torch.randn(rows, dim, generator=g) * 0.1)
    counts = torch.randint(0, dim // cs + 1, (rows,), generator=g)
    counts[:3] = torch.tensor([0, dim // cs, 1])[:rows]
    m.shrink_rows(counts)
    if storage != "fp32":
        m.set_precision(storage, cache_rows)
        if m.cache is not None:
            m.cache.record(torch.randint(0, rows, (2000,), generator=g))
            m.refresh_cache()
            with torch.no_grad():
                m.cache.values.add_(0.0123)   # the cache is the master copy: served rows must come from it
    return m.eval()


def _cases(rows: int, mode: str, last: bool):
    """(input, offsets, per_sample_weights) in every form nn.EmbeddingBag takes, empty bags included."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, rows, (40,), generator=g)
    offsets = torch.tensor([0, 5, 5, 17, 17, 30])            # empty bags inside
    cases = [(ids, offsets, None), (ids[:0], torch.tensor([0, 0, 0]), None), (ids.view(8, 5), None, None),
             (ids.int(), offsets.int(), None), (ids[:6], torch.tensor([0, 2, 6, 6]), None)]   # empty bag at the end
    if mode == "sum":
        cases += [(ids, offsets, torch.rand(40, generator=g)), (ids.view(8, 5), None, torch.rand(8, 5, generator=g))]
    if last:
        cases = [(i, torch.cat([o, o.new_tensor([i.numel()])]) if o is not None else None, w) for i, o, w in cases]
    return cases


def _both(fn):
    """fn() with the native kernels (when built) and with the pure-torch fallback."""
    out = []
    for native in ([True, False] if HAVE_NATIVE else [False]):
        kernels.use_native(native)
        try:
            out.append(fn())
        finally:
            kernels.use_native(True)
    return out


@pytest.mark.parametrize("storage,cache", [("fp32", 0.0), ("int8", 0.0), ("int8", 0.1), ("int4", 0.0),
                                           ("int4", 0.1)])
@pytest.mark.parametrize("mode,last", [("sum", False), ("mean", False), ("sum", True), ("mean", True)])
def test_native_equals_fallback_equals_the_trained_module(storage, cache, mode, last):
    m = _trained(storage, cache_rows=cache, mode=mode, last=last)
    packed = m.to_packed()
    assert packed.storage == storage and not list(packed.parameters())
    if storage != "fp32":        # the codes training stored, not a re-quantization; a cached row's only in the cache
        rows, _, slots = m.store.entries()
        slots = slots[~torch.isin(rows, m.cache.ids)] if cache else slots
        assert torch.equal(packed.codes, m.store.codes[slots]) and torch.equal(packed.scales, m.store.scales[slots])
        assert packed.values.numel() == 0
        if cache:
            assert torch.equal(packed.cache_values, m.cache.values) and packed.cache_ids.numel() == 20
            assert torch.equal(packed.cache_starts, m.cache.starts)
            assert bool((packed.counts[m.cache.ids] == 0).all())            # no second copy of a cached row
    for ids, offsets, weights in _cases(m.num_embeddings, mode, last):
        expected = m(ids.long(), None if offsets is None else offsets.long(),
                     None if weights is None else weights)
        for got in _both(lambda: packed(ids, offsets, weights)):
            assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dim,cs", [(8, 2), (24, 4), (64, 4), (64, 2), (64, 16), (128, 8), (128, 4), (160, 4), (12, 3)])
@pytest.mark.parametrize("storage,cache", [("fp32", 0.0), ("int8", 0.0), ("int8", 0.1), ("int4", 0.0), ("int4", 0.1)])
def test_every_dim_and_chunk_size(dim, cs, storage, cache):
    """Dims below, at and between multiples of 16 (partial registers), the largest register path (128) and the
    portable one (160); rows of more than 16 chunks (64/2, 128/4: quantized scales read a register at a time); a
    chunk size that does not divide 16 (3); quantized with and without the cache."""
    if storage == "int4" and cs % 2:
        pytest.skip("int4 needs an even chunk size")
    m = _trained(storage, rows=97, dim=dim, cs=cs, cache_rows=cache)
    packed = m.to_packed()
    ids, offsets = torch.randint(0, 97, (300,)), torch.arange(0, 300, 7)
    weights = torch.rand(300)
    ref = F.embedding_bag(ids, m.dense_weight(), offsets, per_sample_weights=weights, mode="sum")
    for got in _both(lambda: packed(ids, offsets, weights)):
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("storage,cache", [("int8", 0.05), ("fp32", 0.0), ("int4", 0.0)])
def test_large_batches_split_into_groups_and_threads_agree(storage, cache):
    m = _trained(storage, rows=5000, dim=32, cache_rows=cache)
    packed = m.to_packed()
    ids = torch.randint(0, 5000, (200_000,))
    offsets = torch.cat([torch.tensor([0, 0]), torch.arange(3, 200_000, 50), torch.tensor([199_990])])
    ref = F.embedding_bag(ids, m.dense_weight(), offsets, mode="sum")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.allclose(packed(ids, offsets), ref, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    one_bag = F.embedding_bag(ids, m.dense_weight(), torch.tensor([0]), mode="sum")   # larger than a group
    assert torch.allclose(packed(ids, torch.tensor([0])), one_bag, atol=1e-3, rtol=1e-4)


def test_packed_embedding_serves_any_shape():
    torch.manual_seed(0)
    m = FiitedEmbedding(50, 8, 4, optimizer="sgd", lr=0.1)
    m.shrink_rows(torch.randint(0, 3, (50,)))
    m.set_precision("int8", 0.2)
    packed = m.to_packed()
    ids = torch.randint(0, 50, (3, 4, 5))
    for got in _both(lambda: packed(ids)):
        assert got.shape == (3, 4, 5, 8) and torch.allclose(got, m(ids), atol=1e-6)


def test_bad_input_names_what_is_wrong():
    packed = _trained("int8", rows=30).to_packed()
    last = _trained("fp32", rows=30, last=True).to_packed()
    for native in ([True, False] if HAVE_NATIVE else [False]):
        kernels.use_native(native)
        try:
            with pytest.raises(IndexError, match="30 rows"):
                packed(torch.tensor([0, 30]), torch.tensor([0]))
            with pytest.raises(IndexError):
                packed(torch.tensor([-1, 2]), torch.tensor([0, 1]))
            with pytest.raises(IndexError):      # an id past the last offset is in no bag, and still checked
                last(torch.tensor([1, 99]), torch.tensor([0, 1]))
            with pytest.raises(ValueError, match="non-decreasing"):
                packed(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1]))
            with pytest.raises(ValueError, match="per_sample_weights"):
                packed(torch.tensor([1, 2]), torch.tensor([0]), torch.rand(3))
            with pytest.raises(ValueError, match="offsets are required"):
                packed(torch.tensor([1, 2]))
            with pytest.raises(ValueError, match="1-D or 2-D"):
                packed(torch.zeros(2, 2, 2, dtype=torch.long))
        finally:
            kernels.use_native(True)


def test_table_bytes_are_the_state_dict_bytes():
    for storage, cache in (("fp32", 0.0), ("int8", 0.1), ("int4", 0.0)):
        packed = _trained(storage, cache_rows=cache).to_packed()
        state = packed.state_dict()
        mem = packed.table_bytes()
        assert mem.total == mem.serving == sum(t.numel() * t.element_size() for t in state.values())
        assert (mem.cache > 0) == bool(cache)
        fresh = PackedEmbeddingBag(**{**packed.record_args(), "dtype": torch.float32})
        fresh.load_state_dict(state)
        ids, offsets = torch.randint(0, 203, (50,)), torch.arange(0, 50, 5)
        assert torch.equal(fresh(ids, offsets), packed(ids, offsets))


def test_index_is_the_stores_and_packed_files_of_the_8_row_index_still_load():
    m = _trained("fp32", rows=203)
    packed = m.to_packed()
    assert packed.counts.shape == (208,) and packed.base.shape == (4,)      # 1.125 bytes a row
    assert torch.equal(packed.counts, m.store.counts)
    totals = torch.cat([m.store.counts, m.store.counts.new_zeros(48)]).view(-1, 64).sum(1, dtype=torch.int64)
    assert torch.equal(packed.base, torch.cumsum(totals, 0) - totals)
    # packed files written with 8-row blocks: format 1 held counts and base apart, format 2 interleaved them
    counts8 = torch.zeros(208, dtype=torch.uint8)
    counts8[:203] = m.store.counts[:203]
    totals8 = counts8.view(-1, 8).sum(1, dtype=torch.int64)
    base8 = torch.cumsum(totals8, 0) - totals8
    rest = {k: v for k, v in packed.state_dict().items() if k not in ("counts", "base")}
    version_1 = dict(rest, counts=counts8, base=base8)
    version_2 = dict(rest, index=torch.stack([base8, counts8.view(-1, 8).contiguous().view(torch.int64).flatten()], 1))
    ids, offsets = torch.randint(0, 203, (60,)), torch.arange(0, 60, 6)
    for old in (version_1, version_2):
        fresh = PackedEmbeddingBag(**packed.record_args())
        result = fresh.load_state_dict(old, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert torch.equal(fresh.counts, packed.counts) and torch.equal(fresh.base, packed.base)
        assert torch.equal(fresh(ids, offsets), packed(ids, offsets))


def test_a_store_saved_with_8_row_blocks_loads_repacked():
    """A model.pt of the older layout (8-row blocks, extents out of row order after lazy growth) loads into
    today's store: same rows, same per-slot state, index rebuilt."""
    m = _trained("fp32", rows=203)
    rows = torch.nonzero(m.store.row_counts()).flatten()
    first, cnt = m.store.row_slots(rows)
    # the same chunks in an 8-row layout whose blocks sit in reverse order in a larger pool
    counts8 = torch.zeros(208, dtype=torch.uint8)
    counts8[:203] = m.store.counts[:203]
    totals8 = counts8.view(-1, 8).sum(1, dtype=torch.int64)
    order = torch.arange(26).flip(0)
    base8 = torch.zeros(26, dtype=torch.int64)
    base8[order] = torch.cumsum(totals8[order], 0) - totals8[order] + 5
    capacity = int(totals8.sum()) + 9
    state = m.store.state_dict()
    from compresskit.plugins.fiited.kernels import expand_runs
    block = counts8.view(-1, 8)[rows // 8]
    old_first = base8[rows // 8] + torch.where(torch.arange(8)[None, :] < (rows % 8)[:, None], block, 0).sum(1)
    new_slots, old_slots = expand_runs(first, cnt)[2], expand_runs(old_first, cnt)[2]
    for name in ("pool", "utility", "adagrad_state"):
        if name in state:
            old = torch.full((capacity, *state[name].shape[1:]), 7.0, dtype=state[name].dtype)
            old[old_slots] = state[name][new_slots]
            state[name] = old
    state.update(counts=counts8, base=base8, top=torch.tensor(capacity))
    fresh = FiitedEmbeddingBag(203, 16, 4, optimizer="adagrad", lr=0.1)
    fresh.load_state_dict({f"store.{k}": v for k, v in state.items()} |
                          {k: v for k, v in m.state_dict().items() if not k.startswith("store.")})
    assert torch.equal(fresh.store.dense(), m.store.dense())
    assert fresh.store.capacity == capacity and int(fresh.store.top) == m.store.live
    for name in fresh.store._slot_buffers:
        assert torch.equal(getattr(fresh.store, name)[:m.store.live], getattr(m.store, name)[new_slots]), name
    ids, offsets = torch.randint(0, 203, (60,)), torch.arange(0, 60, 6)
    assert torch.equal(fresh.eval()(ids, offsets), m(ids, offsets))


# ------------------------------------------------------------------------------------------ table-batched
@pytest.mark.parametrize("storage,cache", [("fp32", 0.0), ("int8", 0.1), ("int4", 0.0)])
def test_one_op_call_serves_every_table_of_a_collection(storage, cache):
    from compresskit.models.tables import EmbeddingTables
    from compresskit.plugins.fiited.packed_tables import PackedTables

    rows = [5, 8, 203, 17, 2]                   # one-block tables, a row space that is not a multiple of 8
    trained = EmbeddingTables([_trained(storage, r, cache_rows=cache, seed=i, mode="mean" if i % 2 else "sum")
                               for i, r in enumerate(rows)])
    packed = EmbeddingTables([t.to_packed() for t in trained])
    batched = packed.to_batched()
    assert isinstance(batched, PackedTables)
    mine, theirs = batched.table_bytes(), sum((t.table_bytes() for t in packed), TableBytes(0))
    assert mine.payload - mine.cache == theirs.payload - theirs.cache
    # one index over the 235 rows (counts padded to 240, 4 blocks) against five, each padded to words and blocks
    assert (mine.index, theirs.index) == (240 + 4 * 8, 8 + 8 + 208 + 24 + 8 + 8 * 8)
    assert dense_bytes(batched) == sum(dense_bytes(t) for t in packed)
    # the cache's rank bitmap covers the one row space: an int64 and an int32 a 64 rows
    cached = batched.cache_ids.numel()
    words = (batched.num_rows + 63) // 64 if cached else 0
    # and the cache holds the cached rows' stored chunks, an int64 id and an int64 start a row (and one more start)
    chunks = sum(int(t.store.row_counts()[t.cache.ids].sum()) for t in trained if t.cache is not None)
    assert mine.cache == (chunks * 4 * 4 + cached * 16 + 8 + words * 12 if cached else 0)
    if cached:          # a file whose bitmap does not index its cached rows, or whose starts do not cut its
        state = batched.state_dict()                          # values into rows, is refused
        state["cache_bits"] = state["cache_bits"].clone().fill_(0)
        fresh = PackedTables(**batched.record_args())
        with pytest.raises(RuntimeError, match="do not index"):
            fresh.load_state_dict(state)
        state = batched.state_dict()
        state["cache_starts"] = state["cache_starts"].flip(0).clone()
        with pytest.raises(RuntimeError, match="do not cut"):
            PackedTables(**batched.record_args()).load_state_dict(state)
    g = torch.Generator().manual_seed(5)
    sparse = torch.stack([torch.randint(0, r, (300,), generator=g) for r in rows], 1)
    sparse[:4] = torch.tensor(rows) - 1                        # every table's last row
    with torch.no_grad():
        expected = trained(sparse)
        for got in _both(lambda: batched(sparse)):
            assert len(got) == len(rows)
            for e, o in zip(expected, got):
                assert torch.allclose(o, e, atol=1e-6, rtol=0)      # fp32: the trained module; int: the same codes
    # one op call a batch (TBE-style), where the collection made one call per table
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        batched(sparse)
    assert sum(e.count for e in prof.key_averages() if e.key == "compresskit::packed_bag") == 1
    # ids out of their own table's range never read the next table's rows
    bad = sparse.clone()
    bad[7, 1] = 8
    with pytest.raises(IndexError, match="table 1 of 8 rows"):
        batched(bad)
    with pytest.raises(ValueError, match=r"shape \[batch, 5\]"):
        batched(sparse[:, :3])


def test_a_collection_that_cannot_share_one_store_stays_per_table():
    from compresskit.models.tables import EmbeddingTables

    mixed = EmbeddingTables([_trained("fp32", 20).to_packed(), _trained("int8", 20).to_packed()])
    assert mixed.to_batched() is None
    wide = EmbeddingTables([_trained("fp32", 20).to_packed(), _trained("fp32", 20, dim=32).to_packed()])
    assert wide.to_batched() is None
    assert EmbeddingTables([torch.nn.EmbeddingBag(4, 8)]).to_batched() is None


def test_a_packed_table_stays_packed_on_export_and_has_a_dense_equivalent():
    from compresskit.export import pack

    packed = _trained("int8", cache_rows=0.1).to_packed()
    holder = torch.nn.Module()
    holder.table = packed
    pack(holder)                                    # exporting a loaded packed model keeps the packed table
    assert holder.table is packed
    ids, offsets = torch.randint(0, 203, (50,)), torch.arange(0, 50, 5)
    dense = packed.to_dense()
    assert isinstance(dense, torch.nn.EmbeddingBag) and dense.mode == packed.mode
    assert torch.allclose(dense(ids, offsets), packed(ids, offsets), atol=1e-6)
