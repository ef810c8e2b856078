"""Mixed-precision chunks: INT8 / INT4 codes with FP16 scales, an FP32 hot-row cache, and their training.

Lookups equal a dense table of the dequantized values (native and torch kernels, cache included); bytes fall to
the codes + scales + cache actually held and follow pruning; a training step equals the FP32 step up to one
rounding (exactly, for cached rows); stochastic rounding keeps updates that round-to-nearest loses; state round-trips.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import compresskit
from compresskit.plugins.fiited import kernels
from compresskit.plugins.fiited.embedding import FiitedEmbeddingBag, fiited_modules
from compresskit.plugins.fiited.chunk_codec import dequantize, qmax, quantize

NATIVE = [True, False] if kernels.native.kernels() is not None else [False]


def _table(bits: str, cache_rows: float = 0.0, rows: int = 300, dim: int = 16, cs: int = 4, lr: float = 0.1,
           optimizer: str = "adagrad", rounding: str = "stochastic", mode: str = "sum") -> FiitedEmbeddingBag:
    torch.manual_seed(0)
    m = FiitedEmbeddingBag(rows, dim, cs, mode=mode, optimizer=optimizer, lr=lr, weight=torch.randn(rows, dim) * 0.1)
    m.set_precision(bits, cache_rows, rounding)
    return m


def _bags(rows: int = 300, n: int = 600, per_bag: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, rows, (n,), generator=g), torch.arange(0, n, per_bag)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_round_trip_is_within_half_a_step_and_zero_stays_zero(bits):
    values = torch.randn(200, 8) * torch.logspace(-4, 1, 200)[:, None]
    values[7] = 0
    codes, scales = quantize(values, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (200, 8 * bits // 8) and scales.dtype == torch.float16
    back = dequantize(codes, scales, bits)
    step = scales.float()[:, None]
    assert bool(((back - values).abs() <= step * 0.5 + 1e-6 * values.abs() + 1e-12).all())
    assert bool((back[7] == 0).all())
    assert int(dequantize(codes, scales, bits).abs().div(step.clamp(min=1e-30)).round().max()) <= qmax(bits)


def test_stochastic_rounding_is_unbiased():
    target = 38.4 / 127
    values = torch.full((20000, 4), target)
    values[:, 0] = 1.0             # sets the scale to about 1/127: the others lie 0.4 of a step above code 38
    gen = torch.Generator().manual_seed(0)
    mean = dequantize(*quantize(values, 8, "stochastic", gen), 8)[:, 1:].mean()
    step = 1.0 / 127
    assert abs(float(mean) - target) < 0.02 * step
    nearest = dequantize(*quantize(values, 8, "nearest"), 8)[:, 1:].mean()
    assert abs(float(nearest) - target) > 0.3 * step   # round-to-nearest is biased here, the test can tell


@pytest.mark.parametrize("bits", ["int8", "int4"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_quantized_lookup_equals_the_dequantized_dense_table(native, bits, mode):
    m = _table(bits, cache_rows=0.1, mode=mode)
    ids, offsets = _bags()
    m.cache.record(ids)
    m.refresh_cache()
    assert m.cache.ids.numel() == 30
    with torch.no_grad():
        m.cache.values.add_(0.0123)  # the cache is the master: its rows must be read from it, not the codes
    m.shrink_rows(torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(2)))
    weight = m.dense_weight()
    ref = F.embedding_bag(ids, weight, offsets, mode=mode)
    assert torch.allclose(m(ids, offsets), ref, atol=1e-6)
    psw = torch.rand(ids.numel())
    if mode == "sum":
        assert torch.allclose(m(ids, offsets, psw), F.embedding_bag(ids, weight, offsets, per_sample_weights=psw,
                                                                   mode="sum"), atol=1e-6)
    two_d = ids[:300].view(100, 3)
    assert torch.allclose(m(two_d), F.embedding_bag(two_d, weight, mode=mode), atol=1e-6)
    assert torch.allclose(m.to_packed()(ids, offsets), ref, atol=1e-6)
    assert torch.allclose(m.to_dense()(ids, offsets), ref, atol=1e-6)


def test_native_and_torch_quantized_lookups_agree():
    if len(NATIVE) < 2:
        pytest.skip("native kernels unavailable (no compiler)")
    for bits in ("int8", "int4"):
        m = _table(bits, cache_rows=0.05)
        ids, offsets = _bags()
        m.cache.record(ids)
        m.refresh_cache()
        out = [None, None]
        for i, on in enumerate((True, False)):
            kernels.use_native(on)
            out[i] = m(ids, offsets)
        kernels.use_native(True)
        assert torch.allclose(out[0], out[1], atol=1e-6)


@pytest.mark.parametrize("bits,code_bytes", [("int8", 4), ("int4", 2)])
def test_bytes_are_codes_scales_and_cache_and_follow_pruning(bits, code_bytes):
    m = _table(bits, cache_rows=0.1)
    assert m.store.pool.numel() == 0            # no FP32 values are held
    live = m.store.live
    mem = m.table_bytes()
    bitmap = 5 * (8 + 4)                       # the rank bitmap: 5 words of 64 rows, an int64 and an int32 each
    assert mem.payload == live * (code_bytes + 2) + bitmap and mem.cache == bitmap
    ids, offsets = _bags()
    m.cache.record(ids)
    m.refresh_cache()
    mem = m.table_bytes()
    assert mem.cache == 30 * (16 * 4 + 8) + 31 * 8 + bitmap   # 30 rows of 16 FP32 values, int64 ids and starts
    assert mem.payload == live * (code_bytes + 2) + mem.cache
    m.shrink_rows(torch.ones(300, dtype=torch.long))
    assert m.store.codes.shape[0] == 300 and m.store.scales.shape[0] == 300   # the freed chunks' bytes are gone
    cache = 30 * (4 * 4 + 8) + 31 * 8 + bitmap                                # and the cache holds one chunk a row
    assert m.table_bytes().cache == cache and m.table_bytes().payload == 300 * (code_bytes + 2) + cache


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_a_training_step_is_the_fp32_step_then_one_rounding(native, optimizer):
    q = _table("int8", cache_rows=0.1, optimizer=optimizer, rounding="nearest")
    ids, offsets = _bags()
    q.cache.record(ids)
    q.refresh_cache()
    ref = FiitedEmbeddingBag(300, 16, 4, optimizer=optimizer, lr=0.1, weight=q.dense_weight())
    target = torch.randn(200, 16)
    for m in (q, ref):
        F.mse_loss(m(ids, offsets), target).backward()
    after, expected = q.dense_weight(), ref.dense_weight()
    cached = torch.zeros(300, dtype=torch.bool)
    cached[q.cache.ids] = True
    assert torch.allclose(after[cached], expected[cached], atol=1e-6)       # FP32 master copies: exact
    step = q.store.scales.float().view(300, 4).repeat_interleave(4, 1)       # one rounding of the new value
    err = (after - expected).abs()[~cached]
    assert bool((err <= step[~cached] * 0.5 + 1e-6).all())
    assert bool((err > 0).any())                                            # and the codes really are quantized


def test_stochastic_rounding_keeps_updates_smaller_than_a_step():
    ids, offsets = torch.arange(50), torch.arange(50)
    weight = torch.full((50, 16), 0.3)
    weight[:, ::4] = 1.0                   # each chunk's largest value, untrained: it holds the scale at ~1/127
    train = torch.ones(16)
    train[::4] = 0
    moved = {}
    for rounding in ("nearest", "stochastic"):
        m = FiitedEmbeddingBag(50, 16, 4, optimizer="sgd", lr=1e-5, weight=weight)
        m.set_precision("int8", rounding=rounding)
        before = m.dense_weight()
        for _ in range(200):
            (m(ids, offsets) * train).sum().backward()   # each step moves the trained values by -1e-5
        moved[rounding] = float((m.dense_weight() - before)[:, train.bool()].mean())
    assert moved["nearest"] == 0.0                        # 1e-5 is far below half a step (~4e-3): always lost
    assert moved["stochastic"] == pytest.approx(-200 * 1e-5, rel=0.3)


def test_cache_serves_the_most_accessed_rows_and_writes_evicted_rows_back():
    m = _table("int8", cache_rows=0.02, rows=300)       # 6 rows
    m.cache.record(torch.arange(6).repeat(10))
    m.refresh_cache()
    assert m.cache.ids.tolist() == list(range(6))
    for _ in range(5):                                   # the cached rows train in FP32, off the INT8 grid
        m(torch.arange(6), torch.arange(6)).sum().backward()
    trained = m.cache.dense_rows(torch.tensor([0]))[0, :int(m.store.row_counts()[0]) * 4].clone()
    m.cache.record(torch.arange(100, 106).repeat(50))
    stats = m.refresh_cache()
    assert stats == {"evicted": 6, "admitted": 6} and m.cache.ids.tolist() == list(range(100, 106))
    first, cnt = m.store.row_slots(torch.tensor([0]))
    stored = m.store.read(first + torch.arange(int(cnt))).reshape(-1)
    codes, scales = quantize(trained.view(-1, 4), 8, "nearest")
    assert torch.equal(stored, dequantize(codes, scales, 8).reshape(-1))   # written back, rounded to nearest


def test_resize_keeps_cached_chunks_and_takes_fresh_ones_from_the_store(native):
    m = _table("int8", cache_rows=0.1)
    ids, offsets = _bags()
    m.cache.record(ids)
    m.refresh_cache()
    cached = m.cache.ids[:4]
    with torch.no_grad():
        m.cache.values.add_(0.5)
    first = torch.arange(4)
    kept = m.cache.dense_rows(first)[:, :4].clone()
    new = m.store.row_counts().clone()
    new[cached] = 1
    m.resize_rows(new)
    assert m.cache.values.numel() == int(m.store.row_counts()[m.cache.ids].sum()) * 4   # only stored chunks
    assert torch.equal(m.cache.dense_rows(first)[:, :4], kept)
    assert bool((m.cache.dense_rows(first)[:, 4:] == 0).all())
    new[cached] = 4
    m.resize_rows(new, "random", torch.Generator().manual_seed(0))
    assert torch.equal(m.cache.dense_rows(first)[:, :4], kept)
    assert bool((m.cache.dense_rows(first)[:, 4:] != 0).all())
    assert torch.allclose(m(ids, offsets), F.embedding_bag(ids, m.dense_weight(), offsets, mode="sum"), atol=1e-6)


def test_quantized_state_loads_into_a_fresh_table():
    m = _table("int4", cache_rows=0.05)
    ids, offsets = _bags()
    m.cache.record(ids)
    m.refresh_cache()
    m.shrink_rows(torch.randint(1, 5, (300,), generator=torch.Generator().manual_seed(3)))
    fresh = FiitedEmbeddingBag(300, 16, 4, optimizer="adagrad", lr=0.1)
    fresh.load_state_dict(m.state_dict())
    assert fresh.store.quantized and fresh.cache is not None and fresh.table_bytes() == m.table_bytes()
    assert torch.equal(fresh(ids, offsets), m(ids, offsets))


def test_a_quantized_table_needs_a_fused_optimizer():
    m = FiitedEmbeddingBag(10, 8, 4)
    with pytest.raises(ValueError, match="fused optimizer"):
        m.set_precision("int8")


def _recipe(precision: dict, optimizer: str = "adagrad", method: str = "fiited") -> dict:
    return {
        "model": {"name": "dlrm", "args": {"embedding_dim": 16, "bottom_mlp": [16], "top_mlp": [16]}},
        "data": {"name": "synthetic-ctr", "args": {"num_samples": 6000, "cardinality_scale": 0.0005}},
        "train": {"epochs": 2, "batch_size": 128, "progress": False, "optimizer": {"name": optimizer, "lr": 0.05}},
        "stages": [{"plugin": "fiited", "method": method, "target_memory_ratio": 0.2, "chunk_size": 4,
                    "interval": 10, "precision": precision}],
    }


def _run(recipe: dict):
    return compresskit.run(compresskit.validate_recipe(recipe, require_model=True))


def test_recipe_trains_int8_chunks_with_a_cache_at_the_fp32_chunk_budget():
    fp32 = _run(_recipe({"storage": "fp32"}))
    int8 = _run(_recipe({"storage": "int8", "cache_rows": 0.05}))
    a, b = fp32.report["stages"][0], int8.report["stages"][0]
    assert b["storage"] == "int8" and b["stored_chunks"] == a["stored_chunks"]   # the same chunk budget
    tables = list(fiited_modules(int8.model))
    assert all(m.store.quantized for _, m in tables)
    assert all(m.cache.ids.numel() == round(0.05 * m.num_embeddings) for _, m in tables if m.cache is not None)
    assert any(m.cache is not None for _, m in tables)
    codes = sum(m.store.live * (4 + 2) for _, m in tables)
    assert b["payload_bytes"] == codes + b["cache_bytes"] and b["cache_bytes"] > 0
    assert b["memory_ratio"] < a["memory_ratio"]
    assert abs(int8.report["training"]["test"]["auc"] - fp32.report["training"]["test"]["auc"]) < 0.02


def test_precision_errors_name_the_field():
    with pytest.raises(compresskit.ConfigError, match=r"precision.storage.*fused optimizer"):
        _run(_recipe({"storage": "int8"}, optimizer="adam"))
    with pytest.raises(compresskit.ConfigError, match=r"stages\[0\].precision.storage.*chunk store"):
        compresskit.validate_recipe(_recipe({"storage": "int8"}, method="uniform"))
    with pytest.raises(compresskit.ConfigError, match=r"precision.storage"):
        compresskit.validate_recipe(_recipe({"storage": "int2"}))
    with pytest.raises(compresskit.ConfigError, match=r"precision.cache_rows"):
        compresskit.validate_recipe(_recipe({"storage": "int8", "cache_rows": 1.5}))


def test_adaembed_readmits_rows_into_a_quantized_store():
    result = _run(_recipe({"storage": "int8", "cache_rows": 0.05}, method="adaembed"))
    stage = result.report["stages"][0]
    assert stage["storage"] == "int8" and stage["pruning_rounds"] > 0
    for _, m in fiited_modules(result.model):
        counts = m.row_chunk_counts()
        assert bool(((counts == 0) | (counts == m.num_chunks)).all())     # whole rows, as AdaEmbed keeps them
        assert m.store.codes.shape[0] == m.store.live                     # only the kept rows' codes are held


def test_lazy_tables_admit_rows_as_quantized_chunks(native):
    m = FiitedEmbeddingBag(1000, 16, 4, lazy=True, capacity=400, optimizer="adagrad", lr=0.1, init_std=0.1)
    m.set_precision("int8", 0.0)
    ids, offsets = torch.arange(0, 200, 2), torch.arange(100)
    before = m(ids, offsets)                     # admits 100 rows of 4 chunks: the whole pool
    assert m.store.live == 400 and m.store.codes.shape == (400, 4)
    assert torch.allclose(before, F.embedding_bag(ids, m.dense_weight(), offsets, mode="sum"), atol=1e-6)
    assert float(before.detach().std()) == pytest.approx(0.1, rel=0.2)   # the fresh N(0, 0.1) values, quantized


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_native_and_torch_quantized_updates_agree(optimizer):
    if len(NATIVE) < 2:
        pytest.skip("native kernels unavailable (no compiler)")
    ids, offsets = _bags()
    target = torch.randn(200, 16)
    after = {}
    for on in (True, False):
        kernels.use_native(on)
        m = _table("int8", cache_rows=0.1, optimizer=optimizer, rounding="nearest")
        m.track_utility(0.9)
        m.cache.record(ids)
        m.refresh_cache()
        for _ in range(3):
            F.mse_loss(m(ids, offsets), target).backward()
        after[on] = (m.dense_weight(), m.utilities(torch.arange(m.store.live)), m.store.scales.float())
    kernels.use_native(True)
    (w1, u1, s1), (w0, u0, s0) = after[True], after[False]
    assert torch.allclose(u1, u0, rtol=1e-5, atol=1e-7)
    step = torch.maximum(s1, s0).view(300, 4).repeat_interleave(4, 1)
    assert bool(((w1 - w0).abs() <= step * 1.01 + 1e-7).all())     # at most one rounding apart
    assert float((w1 == w0).float().mean()) > 0.95                  # and almost always the same code


def test_native_stochastic_rounding_does_not_depend_on_the_thread_count():
    if len(NATIVE) < 2:
        pytest.skip("native kernels unavailable (no compiler)")
    ids, offsets = _bags(n=3000)
    out = []
    threads = torch.get_num_threads()
    for t in (1, 2):
        torch.set_num_threads(t)
        m = _table("int4", optimizer="adagrad")
        for _ in range(3):
            m(ids, offsets).pow(2).sum().backward()
        out.append(m.dense_weight())
    torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])


def test_a_resumed_stochastic_rounding_stream_continues(native):
    """Saving and loading the state mid-training gives bit-identical codes afterwards: the rounding generator's state
    is part of the state dict (it used to restart from its seed)."""
    ids, offsets = _bags()
    grad = torch.randn(offsets.numel(), 16)

    def steps(m, n):
        for _ in range(n):
            m(ids, offsets).backward(grad)

    a = _table("int8", rounding="stochastic")
    steps(a, 2)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    steps(a, 3)
    b = _table("int8", rounding="stochastic")
    b.load_state_dict(state)
    steps(b, 3)
    assert torch.equal(a.store.codes, b.store.codes) and torch.equal(a.store.scales, b.store.scales)
