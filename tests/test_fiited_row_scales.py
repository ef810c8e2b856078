"""Row-wise INT8 / INT4 scales (``precision.scales: row``): one FP16 scale and offset a row, FBGEMM's layout.

Codes round-trip within half a step and use the full code range; lookups (training forward, native and torch, and
the packed serving op, single and table-batched) equal a dense table of the dequantized values; bytes are the codes
plus 4 bytes a row; a training step equals the FP32 step then one rounding of the whole row; chunks a row gains
read as zeros (not as the row's offset); state and packed files round-trip; a recipe trains with them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import compresskit
from compresskit.plugins.fiited import kernels
from compresskit.plugins.fiited.chunk_codec import dequantize, quantize_rows
from compresskit.plugins.fiited.embedding import FiitedEmbeddingBag, fiited_modules
from compresskit.plugins.fiited.packed import PackedEmbeddingBag
from compresskit.plugins.fiited.packed_op import packed_bag_reference
from compresskit.plugins.fiited.packed_tables import PackedTables

NATIVE = [True, False] if kernels.native.kernels() is not None else [False]


def _table(bits: str = "int8", cache_rows: float = 0.0, rows: int = 300, dim: int = 16, cs: int = 4,
           optimizer: str = "adagrad", rounding: str = "stochastic", mode: str = "sum", seed: int = 0,
           lazy: bool = False) -> FiitedEmbeddingBag:
    torch.manual_seed(seed)
    weight = torch.randn(rows, dim) * 0.1 + torch.randn(rows, 1) * 0.05     # rows off-centre: the offset matters
    m = FiitedEmbeddingBag(rows, dim, cs, mode=mode, optimizer=optimizer, lr=0.1, weight=weight)
    m.set_precision(bits, cache_rows, rounding, scales="row")
    return m


def _bags(rows: int = 300, n: int = 600, per_bag: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, rows, (n,), generator=g), torch.arange(0, n, per_bag)


def _step(m: FiitedEmbeddingBag) -> torch.Tensor:
    """Each value's quantization step bound: half the row's scale plus the FP16 rounding of its offset."""
    qp = m.store.scales.float()
    return (qp[:, :1] * 0.5 + qp[:, 1:].abs() * 2.0 ** -10 + 1e-6).expand(-1, m.embedding_dim)


@pytest.mark.parametrize("bits", [8, 4])
def test_row_codes_round_trip_within_half_a_step_over_the_full_range(bits):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(60, 4, generator=g) * 0.3 + 1.5
    group = torch.arange(60) // 7                          # 9 groups of 7 chunks, the last of 4; group 9 is empty
    codes, qp = quantize_rows(values, group, 10, bits)
    assert codes.shape == (60, 4 * bits // 8) and qp.shape == (10, 2) and qp.dtype == torch.float16
    back = dequantize(codes, qp[group], bits)
    bound = qp[group, :1].float() * 0.5 + qp[group, 1:].float().abs() * 2.0 ** -10
    assert bool(((back - values).abs() <= bound).all())
    q = ((back - qp[group, 1:].float()) / qp[group, :1].float()).round()
    half = 1 << (bits - 1)
    assert int(q.min()) == -half and int(q.max()) == half - 1          # every level is used: no symmetric waste
    assert qp[9].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("bits", ["int8", "int4"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_lookup_equals_the_dequantized_dense_table(native, bits, mode):
    m = _table(bits, cache_rows=0.1, mode=mode)
    ids, offsets = _bags()
    m.cache.record(ids)
    m.refresh_cache()
    with torch.no_grad():
        m.cache.values.add_(0.0123)
    m.shrink_rows(torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(2)))
    assert m.store.scales.shape == (300, 2)
    weight = m.dense_weight()
    assert bool((weight.view(300, 4, 4)[m.row_chunk_counts() < 4] == 0).any())   # pruned chunks read zero
    ref = F.embedding_bag(ids, weight, offsets, mode=mode)
    assert torch.allclose(m(ids, offsets), ref, atol=1e-6)
    if mode == "sum":
        psw = torch.rand(ids.numel())
        assert torch.allclose(m(ids, offsets, psw),
                              F.embedding_bag(ids, weight, offsets, per_sample_weights=psw, mode="sum"), atol=1e-6)
    two_d = ids[:300].view(100, 3)
    assert torch.allclose(m(two_d), F.embedding_bag(two_d, weight, mode=mode), atol=1e-6)
    packed = m.to_packed()
    assert packed.scale_layout == "row" and packed.scales.shape == (300, 2)
    assert torch.allclose(packed(ids, offsets), ref, atol=1e-6)


@pytest.mark.parametrize("bits", ["int8", "int4"])
@pytest.mark.parametrize("dim,cs", [(16, 4), (64, 8), (128, 16), (200, 8)])
def test_native_serving_equals_the_reference(bits, dim, cs):
    if len(NATIVE) < 2:
        pytest.skip("native kernels unavailable (no compiler)")
    m = _table(bits, cache_rows=0.05, dim=dim, cs=cs)
    ids, offsets = _bags(n=3000, per_bag=5)
    m.cache.record(ids)
    m.refresh_cache()
    m.shrink_rows(torch.randint(0, dim // cs + 1, (300,), generator=torch.Generator().manual_seed(4)))
    p = m.to_packed()
    b = p._buffers
    psw = torch.rand(ids.numel())
    ref = packed_bag_reference(b["values"], b["codes"], b["scales"], b["counts"], b["base"], b["cache_ids"],
                               b["cache_bits"], b["cache_rank"], b["cache_values"], b["cache_starts"], ids, offsets,
                               psw, p.bits, cs, 0, False, 300, dim)
    assert torch.allclose(p(ids, offsets, psw), ref, atol=1e-5)
    assert torch.allclose(m(ids, offsets, psw), ref, atol=1e-5)


def test_bytes_are_the_codes_and_four_bytes_a_row():
    m = _table("int8")
    assert m.table_bytes().payload == m.store.live * 4 + 300 * 4
    m.shrink_rows(torch.ones(300, dtype=torch.long))
    assert m.store.codes.shape == (300, 4) and m.table_bytes().payload == 300 * 4 + 300 * 4
    p = m.to_packed()
    assert p.table_bytes().payload == 300 * 4 + 300 * 4
    assert p.table_bytes().total == sum(t.numel() * t.element_size() for t in p.state_dict().values())


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_a_training_step_is_the_fp32_step_then_one_rounding_of_the_row(native, optimizer):
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
    assert torch.allclose(after[cached], expected[cached], atol=1e-6)
    err = (after - expected).abs()[~cached]
    assert bool((err <= _step(q)[~cached]).all())
    assert bool((err > 0).any())


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_native_and_torch_updates_agree(optimizer):
    if len(NATIVE) < 2:
        pytest.skip("native kernels unavailable (no compiler)")
    ids, offsets = _bags()
    target = torch.randn(200, 16)
    after = {}
    for on in (True, False):
        kernels.use_native(on)
        m = _table("int4", cache_rows=0.1, optimizer=optimizer, rounding="nearest")
        m.track_utility(0.9)
        m.cache.record(ids)
        m.refresh_cache()
        for _ in range(3):
            F.mse_loss(m(ids, offsets), target).backward()
        after[on] = (m.dense_weight(), m.utilities(torch.arange(m.store.live)), m.store.scales.clone())
    kernels.use_native(True)
    (w1, u1, s1), (w0, u0, s0) = after[True], after[False]
    assert torch.allclose(u1, u0, rtol=1e-5, atol=1e-7)
    assert float((s1 == s0).all(1).float().mean()) > 0.95           # almost every row re-quantized alike
    step = torch.maximum(s1[:, :1], s0[:, :1]).float().expand(-1, 16)
    assert bool(((w1 - w0).abs() <= step * 1.01 + 1e-6).all())    # the others at most one step apart
    assert float((w1 == w0).float().mean()) > 0.9


def test_native_stochastic_rounding_does_not_depend_on_the_thread_count():
    if len(NATIVE) < 2:
        pytest.skip("native kernels unavailable (no compiler)")
    ids, offsets = _bags(n=3000)
    out = []
    threads = torch.get_num_threads()
    for t in (1, 2):
        torch.set_num_threads(t)
        m = _table("int4")
        for _ in range(3):
            m(ids, offsets).pow(2).sum().backward()
        out.append(m.dense_weight())
    torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("lazy", [False, True])
def test_chunks_a_row_gains_read_zero_not_its_offset(lazy):
    if lazy:
        m = FiitedEmbeddingBag(300, 16, 4, lazy=True, capacity=600, optimizer="adagrad", lr=0.1, init_std=0.1)
        m.set_precision("int8", scales="row")
        m(torch.arange(0, 300, 2), torch.arange(150))          # admits 150 rows of 4 chunks: the whole pool
        m.shrink_rows(torch.where(m.row_chunk_counts() > 0, 1, 0))
    else:
        m = _table("int8")
        m.shrink_rows(torch.ones(300, dtype=torch.long))
    before = m.dense_weight()
    assert bool((m.store.scales[m.row_chunk_counts() > 0, 1] != 0).all())   # every stored row has an offset
    grow = torch.where(m.row_chunk_counts() > 0, 3, 0)
    m.resize_rows(grow)
    after = m.dense_weight().view(300, 4, 4)
    near = _step(m)[grow > 0][:, :8].reshape(-1, 2, 4)
    assert bool((after[grow > 0][:, 1:3].abs() <= near).all())     # the new chunks are zeros (to within a step),
    assert float(m.store.scales[grow > 0, 1].float().abs().max()) > 10 * float(near.max())   # not the offsets
    assert bool((after[grow > 0][:, 0] - before.view(300, 4, 4)[grow > 0][:, 0]).abs().le(
        _step(m)[grow > 0][:, :4] * 2).all())                    # the kept chunk re-quantized with the zeros


def test_state_and_packed_files_round_trip(tmp_path):
    m = _table("int4", cache_rows=0.05)
    ids, offsets = _bags()
    m.cache.record(ids)
    m.refresh_cache()
    m.shrink_rows(torch.randint(1, 5, (300,), generator=torch.Generator().manual_seed(3)))
    fresh = FiitedEmbeddingBag(300, 16, 4, optimizer="adagrad", lr=0.1)
    fresh.load_state_dict(m.state_dict())
    assert fresh.store.row_scales and fresh.table_bytes() == m.table_bytes()
    assert torch.equal(fresh(ids, offsets), m(ids, offsets))
    p = m.to_packed()
    args = p.record_args()
    assert args["scales"] == "row"
    torch.save(p.state_dict(), tmp_path / "p.pt")
    loaded = PackedEmbeddingBag(**args)
    loaded.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    assert torch.equal(loaded(ids, offsets), p(ids, offsets))


def test_one_op_call_serves_tables_with_row_scales():
    tables = [_table("int8", rows=r, seed=r).to_packed() for r in (50, 120, 7)]
    batched = PackedEmbeddingBag.batched(tables)
    assert isinstance(batched, PackedTables) and batched.scales.shape == (177, 2)
    g = torch.Generator().manual_seed(0)
    sparse = torch.stack([torch.randint(0, r, (64,), generator=g) for r in (50, 120, 7)], 1)
    out = batched(sparse)
    for t, (table, o) in enumerate(zip(tables, out)):
        assert torch.allclose(o, table(sparse[:, t:t + 1]), atol=1e-6)
    mixed = [tables[0], PackedEmbeddingBag.from_store(_chunk_scaled_store())]
    assert PackedEmbeddingBag.batched(mixed) is None          # row and chunk scales do not share one store


def _chunk_scaled_store():
    m = FiitedEmbeddingBag(20, 16, 4, optimizer="adagrad", lr=0.1)
    m.set_precision("int8")
    return m.store


def _recipe(scales: str) -> dict:
    return {
        "model": {"name": "dlrm", "args": {"embedding_dim": 16, "bottom_mlp": [16], "top_mlp": [16]}},
        "data": {"name": "synthetic-ctr", "args": {"num_samples": 6000, "cardinality_scale": 0.0005}},
        "train": {"epochs": 2, "batch_size": 128, "progress": False, "optimizer": {"name": "adagrad", "lr": 0.05}},
        "stages": [{"plugin": "fiited", "target_memory_ratio": 0.3, "chunk_size": 4, "interval": 10,
                    "precision": {"storage": "int8", "scales": scales}}],
    }


def test_a_recipe_trains_with_row_scales_and_is_charged_four_bytes_a_row():
    chunk = compresskit.run(compresskit.validate_recipe(_recipe("chunk"), require_model=True))
    row = compresskit.run(compresskit.validate_recipe(_recipe("row"), require_model=True))
    a, b = chunk.report["stages"][0], row.report["stages"][0]
    tables = list(fiited_modules(row.model))
    assert all(m.store.row_scales for _, m in tables)
    assert b["payload_bytes"] == sum(m.store.live * 4 + m.num_embeddings * 4 for _, m in tables)
    assert a["payload_bytes"] == sum(m.store.live * 6 for _, m in fiited_modules(chunk.model))
    assert abs(row.report["training"]["test"]["auc"] - chunk.report["training"]["test"]["auc"]) < 0.02
    with pytest.raises(compresskit.ConfigError, match=r"precision.scales"):
        compresskit.validate_recipe({**_recipe("row"), "stages": [{**_recipe("row")["stages"][0],
                                                                   "precision": {"storage": "int8",
                                                                                 "scales": "col"}}]})
