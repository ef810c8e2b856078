"""The FP32 hot-row cache holds only each cached row's stored chunks, sized by rows and/or bytes, and a packed export
holds every row once.

A byte budget admits the hottest rows while their chunks fit (pruned rows cost less, so more of them fit); the
packed form drops a cached row's stale codes and serves it from the cache; caches saved the older way (a
full-dimension row each, in training states and packed format 3) load converted and serve the same values.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import compresskit
from compresskit.plugins.fiited.cache import ROW_OVERHEAD
from compresskit.plugins.fiited.embedding import FiitedEmbeddingBag, fiited_modules
from compresskit.plugins.fiited.packed import PackedEmbeddingBag
from compresskit.plugins.fiited.row_index import packed_bases


def _table(cache_rows: float = 0.0, cache_bytes: float = 0.0, rows: int = 400, scales: str = "chunk"
           ) -> FiitedEmbeddingBag:
    torch.manual_seed(0)
    m = FiitedEmbeddingBag(rows, 16, 4, optimizer="adagrad", lr=0.1, weight=torch.randn(rows, 16) * 0.1)
    m.set_precision("int8", cache_rows, "nearest", scales=scales, cache_bytes=cache_bytes)
    return m


def _zipf_ids(rows: int = 400, n: int = 4000, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, rows + 1).float()
    return torch.multinomial(weights, n, replacement=True, generator=g)


def _cache_bytes(m: FiitedEmbeddingBag) -> int:
    return m.cache.table_bytes().cache          # values, ids, starts and the rank bitmap


def test_a_byte_budget_admits_the_hottest_rows_that_fit_and_pruned_rows_cost_less():
    budget = 0.05                                        # 5% of 400 x 16 x 4 bytes = 1280 bytes
    m = _table(cache_bytes=budget)
    ids = _zipf_ids()
    m.cache.record(ids)
    m.refresh_cache()
    limit = int(budget * 400 * 16 * 4)
    full_rows = m.cache.ids.numel()
    fixed = 8 + 7 * (8 + 4)                              # the last start, and the bitmap: 7 words of 64 rows
    assert full_rows == (limit - fixed) // (16 * 4 + ROW_OVERHEAD) and _cache_bytes(m) <= limit
    hits = torch.bincount(ids, minlength=400)
    outside = torch.ones(400, dtype=torch.bool)
    outside[m.cache.ids] = False
    assert int(hits[m.cache.ids].min()) >= int(hits[outside].max())      # the hottest rows (ties either way)
    m.shrink_rows(torch.ones(400, dtype=torch.long))     # every row keeps one chunk: a cached row now costs 32 bytes
    assert m.cache.values.numel() == full_rows * 4
    m.cache.record(ids)
    m.refresh_cache()
    assert m.cache.ids.numel() == (limit - fixed) // (4 * 4 + ROW_OVERHEAD) > 2 * full_rows
    assert _cache_bytes(m) <= limit
    capped = _table(cache_rows=0.01, cache_bytes=budget)   # both limits: the tighter one holds
    capped.cache.record(ids)
    capped.refresh_cache()
    assert capped.cache.ids.numel() == 4


def test_cached_rows_train_and_serve_from_their_stored_chunks(native):
    m = _table(cache_bytes=0.1)
    ids = _zipf_ids()
    m.cache.record(ids)
    m.refresh_cache()
    m.shrink_rows(torch.randint(0, 5, (400,), generator=torch.Generator().manual_seed(2)))
    m.cache.record(ids)
    m.refresh_cache()
    offsets = torch.arange(0, ids.numel(), 4)
    target = torch.randn(offsets.numel(), 16)
    for _ in range(3):
        F.mse_loss(m(ids, offsets), target).backward()
    weight = m.dense_weight()
    assert torch.allclose(m(ids, offsets), F.embedding_bag(ids, weight, offsets, mode="sum"), atol=1e-6)
    packed = m.to_packed()
    assert bool((packed.counts[m.cache.ids] == 0).all())      # a cached row is held once: in the cache
    stored = int(m.store.row_counts().sum()) - int(m.store.row_counts()[m.cache.ids].sum())
    assert packed.codes.shape[0] == stored and packed.cache_values.numel() == m.cache.values.numel()
    assert torch.allclose(packed(ids, offsets), F.embedding_bag(ids, weight, offsets, mode="sum"), atol=1e-6)
    assert packed.table_bytes().total == sum(t.numel() * t.element_size() for t in packed.state_dict().values())


def _older_cache_state(m: FiitedEmbeddingBag) -> dict:
    """``m``'s state as compresskit wrote it before the cache held stored chunks only: full-dimension rows."""
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["cache.values"] = m.cache.dense_rows(torch.arange(m.cache.ids.numel()))
    del state["cache.starts"], state["cache.byte_limit"]
    return state


def test_a_training_state_with_full_dimension_cache_rows_loads_converted():
    m = _table(cache_rows=0.05)
    ids = _zipf_ids()
    m.cache.record(ids)
    m.refresh_cache()
    m.shrink_rows(torch.randint(1, 5, (400,), generator=torch.Generator().manual_seed(3)))
    fresh = FiitedEmbeddingBag(400, 16, 4, optimizer="adagrad", lr=0.1)
    fresh.load_state_dict(_older_cache_state(m))
    assert torch.equal(fresh.cache.values, m.cache.values) and torch.equal(fresh.cache.starts, m.cache.starts)
    offsets = torch.arange(0, ids.numel(), 4)
    assert torch.equal(fresh(ids, offsets), m(ids, offsets))


def test_a_format_3_packed_table_loads_converted():
    m = _table(cache_rows=0.05)
    ids = _zipf_ids()
    m.cache.record(ids)
    m.refresh_cache()
    m.shrink_rows(torch.randint(1, 5, (400,), generator=torch.Generator().manual_seed(4)))
    packed = m.to_packed()
    # format 3: every row's codes (a cached row's stale ones too) and full-dimension cache rows, no starts
    rows, _, slots = m.store.entries()
    older = {k: v.clone() for k, v in packed.state_dict().items() if k != "cache_starts"}
    older["codes"], older["scales"], older["counts"] = m.store.codes[slots], m.store.scales[slots], m.store.counts
    older["base"] = packed_bases(m.store.counts)
    older["cache_values"] = m.cache.dense_rows(torch.arange(m.cache.ids.numel()))
    shell = PackedEmbeddingBag(400, 16, 4, slots.numel(), storage="int8", cached_rows=m.cache.ids.numel())
    shell.load_state_dict(older)
    offsets = torch.arange(0, ids.numel(), 4)
    assert torch.allclose(shell(ids, offsets), packed(ids, offsets), atol=1e-6)


def _recipe(precision: dict) -> dict:
    return {
        "model": {"name": "dlrm", "args": {"embedding_dim": 16, "bottom_mlp": [16], "top_mlp": [16]}},
        "data": {"name": "synthetic-ctr", "args": {"num_samples": 6000, "cardinality_scale": 0.0005}},
        "train": {"epochs": 2, "batch_size": 128, "progress": False, "optimizer": {"name": "adagrad", "lr": 0.05}},
        "stages": [{"plugin": "fiited", "target_memory_ratio": 0.3, "chunk_size": 4, "interval": 10,
                    "precision": precision}],
    }


def test_a_recipe_sizes_the_cache_in_bytes():
    result = compresskit.run(compresskit.validate_recipe(_recipe({"storage": "int8", "cache_bytes": 0.02}),
                                                         require_model=True))
    tables = [m for _, m in fiited_modules(result.model)]
    cached = [m for m in tables if m.cache is not None and m.cache.ids.numel()]
    assert cached
    for m in cached:
        assert _cache_bytes(m) <= int(0.02 * m.num_embeddings * m.embedding_dim * 4)
        assert m.cache.values.numel() == int(m.store.row_counts()[m.cache.ids].sum()) * m.chunk_size
    with pytest.raises(compresskit.ConfigError, match=r"precision.cache_bytes"):
        compresskit.validate_recipe(_recipe({"storage": "int8", "cache_bytes": 2}))


def test_a_state_whose_cache_does_not_fit_its_store_is_refused():
    m = _table(cache_rows=0.05)
    m.cache.record(_zipf_ids())
    m.refresh_cache()
    state = m.state_dict()
    bad = dict(state, **{"cache.starts": state["cache.starts"].flip(0).clone()})
    with pytest.raises(RuntimeError, match="cache.starts do not cut"):
        FiitedEmbeddingBag(400, 16, 4, optimizer="adagrad", lr=0.1).load_state_dict(bad)
    shifted = state["cache.starts"].clone()
    shifted[1:] += 1                                   # every cached row one chunk more than its store row holds
    bad = dict(state, **{"cache.starts": shifted, "cache.values": torch.zeros(int(shifted[-1]) * 4)})
    with pytest.raises(ValueError, match="disagree with store.counts"):
        FiitedEmbeddingBag(400, 16, 4, optimizer="adagrad", lr=0.1).load_state_dict(bad)
    rowwise = _table(cache_rows=0.05, scales="row").state_dict()
    with pytest.raises(ValueError, match="row scales, this store chunk scales"):
        _table(cache_rows=0.05).load_state_dict(rowwise)
