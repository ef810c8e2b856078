"""FIITED kernels: the native (C++) and pure-torch kernels agree with each other and with dense modules to 1e-6,
for lookups, gradients, fused optimizer updates and chunk utilities, on whole, pruned and relocated layouts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compresskit.plugins.fiited import FiitedEmbeddingBag, kernels
from compresskit.plugins.fiited.native import kernels as compiled

BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    compiled() is None, reason="no C++ compiler: the native kernels could not be built"))]


@pytest.fixture(params=BACKENDS)
def backend(request):
    kernels.use_native(request.param == "native")
    yield request.param
    kernels.use_native(True)


def _batch(rows: int, n: int = 300, bags: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = (torch.rand(n, generator=gen) ** 2 * rows).long()            # skewed: many repeated ids
    offsets = torch.sort(torch.randint(0, n, (bags,), generator=gen)).values
    offsets[0] = 0
    return ids, offsets, torch.rand(n, generator=gen)


def _loss(out: torch.Tensor, seed: int) -> torch.Tensor:
    """A well-scaled loss with a different upstream gradient for every bag."""
    gen = torch.Generator().manual_seed(100 + seed)
    return (out * torch.randn(out.shape, generator=gen) * 0.1).sum() + 0.05 * out.pow(2).mean()


def _pruned_and_relocated(dense: nn.EmbeddingBag, chunk_size: int, seed: int = 1) -> tuple[FiitedEmbeddingBag,
                                                                                            torch.Tensor]:
    """A FIITED copy of ``dense`` with random row prefixes, then some rows regrown through relocation (a layout
    whose block bases are out of order), and the dense table it equals."""
    gen = torch.Generator().manual_seed(seed)
    bag = FiitedEmbeddingBag.from_dense(dense, chunk_size)
    counts = torch.randint(0, bag.num_chunks + 1, (bag.num_embeddings,), generator=gen)
    counts[[5, 70, 170]] = torch.tensor([0, 1, 2])
    bag.store.shrink_rows(counts)
    # rows of three 64-row blocks, grown in an order that leaves the blocks' bases out of row order
    grown = bag.store.grow_rows(torch.tensor([70, 170, 5]), bag.num_chunks, lambda n, cs: torch.ones(n, cs))
    assert grown.tolist() == [70, 170, 5]
    return bag, bag.store.dense()


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_lookup_and_gradients_equal_dense(backend, mode):
    dense = nn.EmbeddingBag(200, 16, mode=mode)
    bag, table = _pruned_and_relocated(dense, chunk_size=4)
    assert not torch.equal(torch.sort(bag.store.base).values, bag.store.base)   # really out of order
    ids, offsets, psw = _batch(200)
    psw = psw if mode == "sum" else None
    reference = nn.EmbeddingBag.from_pretrained(table.clone(), freeze=False, mode=mode)
    out = bag(ids, offsets, per_sample_weights=psw)
    ref = reference(ids, offsets, per_sample_weights=psw)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    _loss(out, 0).backward()
    _loss(ref, 0).backward()
    rows, chunks, slots = bag.store.entries()
    grad = torch.zeros_like(table).view(200, 4, 4)
    grad[rows, chunks] = bag.store.pool.grad[slots]
    mask = torch.zeros(200, 4, dtype=torch.bool)
    mask[rows, chunks] = True
    assert torch.allclose(grad.view(200, 16), reference.weight.grad * mask.repeat_interleave(4, 1), atol=1e-6, rtol=0)


def test_per_sample_weight_gradient_equals_dense(backend):
    dense = nn.EmbeddingBag(50, 8, mode="sum")
    bag = FiitedEmbeddingBag.from_dense(dense, chunk_size=2)
    ids, offsets, psw = _batch(50)
    w1, w2 = psw.clone().requires_grad_(), psw.clone().requires_grad_()
    _loss(bag(ids, offsets, per_sample_weights=w1), 0).backward()
    _loss(dense(ids, offsets, per_sample_weights=w2), 0).backward()
    assert torch.allclose(w1.grad, w2.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sparse", [False, True])
def test_sparse_and_dense_gradients_agree(backend, sparse):
    dense = nn.EmbeddingBag(40, 8, mode="sum", sparse=sparse)
    bag = FiitedEmbeddingBag.from_dense(dense, chunk_size=4)
    ids, offsets, _ = _batch(40)
    _loss(bag(ids, offsets), 0).backward()
    _loss(dense(ids, offsets), 0).backward()
    got = bag.store.pool.grad.to_dense().view(40, 8)
    assert torch.allclose(got, dense.weight.grad.to_dense(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_fused_update_equals_sparse_embedding_bag_and_torch_optimizer(backend, optimizer):
    """What users run today: nn.EmbeddingBag(sparse=True) + torch.optim; three steps with repeated ids."""
    dense = nn.EmbeddingBag(80, 16, mode="sum", sparse=True)
    bag = FiitedEmbeddingBag.from_dense(dense, chunk_size=4, optimizer=optimizer, lr=0.1, eps=1e-10)
    opt = torch.optim.SGD(dense.parameters(), lr=0.1) if optimizer == "sgd" else \
        torch.optim.Adagrad(dense.parameters(), lr=0.1, eps=1e-10)
    assert not bag.store.pool.requires_grad            # left out of torch optimizers
    for step in range(3):
        ids, offsets, _ = _batch(80, seed=step)
        opt.zero_grad()
        _loss(dense(ids, offsets), step).backward()
        opt.step()
        _loss(bag(ids, offsets), step).backward()
        assert bag.store.pool.grad is None
        assert torch.allclose(bag.store.dense(), dense.weight.detach(), atol=1e-6, rtol=0)


def test_rowwise_adagrad_matches_its_definition(backend):
    """m_r += mean(g_r^2) over the row's stored values; w_r -= lr * g_r / (sqrt(m_r) + eps) (FBGEMM's rule)."""
    dense = nn.EmbeddingBag(200, 8, mode="sum")
    bag, table = _pruned_and_relocated(dense, chunk_size=2)
    bag.set_optimizer("rowwise_adagrad", lr=0.2, eps=1e-8)
    weight = table.clone()
    stored = (torch.arange(4)[None, :] < bag.row_chunk_counts()[:, None]).repeat_interleave(2, 1).float()
    momentum = torch.zeros(200)
    for step in range(3):
        ids, offsets, _ = _batch(200, seed=step)
        w = weight.clone().requires_grad_()
        _loss(nn.functional.embedding_bag(ids, w, offsets, mode="sum"), step).backward()
        g = w.grad * stored
        touched = torch.unique(ids)
        momentum[touched] += (g[touched] ** 2).sum(1) / stored[touched].sum(1).clamp(min=1)
        weight[touched] -= 0.2 * g[touched] / (momentum[touched].sqrt()[:, None] + 1e-8)
        _loss(bag(ids, offsets), step).backward()
        assert torch.allclose(bag.store.dense(), weight, atol=1e-6, rtol=0)


def test_utilities_decay_and_accumulate_chunk_gradient_norms(backend):
    dense = nn.EmbeddingBag(20, 8, mode="sum")
    bag = FiitedEmbeddingBag.from_dense(dense, chunk_size=4)
    bag.track_utility(0.5)
    expected = torch.zeros(20, 2)
    for step in range(4):
        ids, offsets, _ = _batch(20, n=30, bags=6, seed=step)
        w = bag.store.dense().requires_grad_()
        _loss(nn.functional.embedding_bag(ids, w, offsets, mode="sum"), step).backward()
        expected = 0.5 * expected + w.grad.view(20, 2, 4).norm(dim=2)
        bag.zero_grad()
        _loss(bag(ids, offsets), step).backward()
    rows, chunks, slots = bag.store.entries()
    assert torch.allclose(bag.utilities(slots), expected[rows, chunks], rtol=1e-5, atol=1e-6)


def test_per_access_utilities_divide_by_decayed_access_counts(backend):
    from compresskit.plugins.fiited.importance import chunk_utilities

    bag = FiitedEmbeddingBag.from_dense(nn.EmbeddingBag(20, 8, mode="sum"), chunk_size=4)
    bag.track_utility(0.5)
    bag.track_access()
    accesses = torch.zeros(20)
    for step in range(4):
        ids, offsets, _ = _batch(20, n=30, bags=6, seed=step)
        accesses = 0.5 * accesses + torch.bincount(ids, minlength=20).float()
        _loss(bag(ids, offsets), step).backward()
    assert torch.allclose(bag.row_accesses(torch.arange(20)), accesses, rtol=1e-5)
    rows, _, plain = chunk_utilities(bag)
    _, _, by_access = chunk_utilities(bag, by_access=True)
    assert torch.allclose(by_access, plain / (1 + accesses[rows])[:, None], rtol=1e-5)
    fresh = FiitedEmbeddingBag(20, 8, chunk_size=4)      # a trained state dict brings its access counts along
    fresh.load_state_dict(bag.state_dict())
    assert torch.equal(fresh.row_access, bag.row_access)


def test_weight_signals_rank_chunks_by_their_weights(backend):
    """utility: magnitude is each stored chunk's weight norm; gradient_weight that times the gradient utility."""
    from compresskit.plugins.fiited.importance import chunk_utilities

    bag = FiitedEmbeddingBag.from_dense(nn.EmbeddingBag(20, 8, mode="sum"), chunk_size=4)
    bag.track_utility(0.5)
    for step in range(3):
        ids, offsets, _ = _batch(20, n=30, bags=6, seed=step)
        _loss(bag(ids, offsets), step).backward()
    bag.shrink_rows(torch.tensor([0, 1, 2, 1] * 5))
    rows, cnt, plain = chunk_utilities(bag)
    _, _, magnitude = chunk_utilities(bag, signal="magnitude")
    _, _, product = chunk_utilities(bag, signal="gradient_weight")
    norms = bag.dense_weight()[rows].view(-1, 2, 4).norm(dim=2)
    present = torch.arange(2)[None, :] < cnt[:, None]
    assert torch.equal(torch.isinf(magnitude), ~present) and torch.equal(torch.isinf(product), ~present)
    assert torch.allclose(magnitude[present], norms[present], rtol=1e-5)
    assert torch.allclose(product[present], (norms * plain)[present], rtol=1e-5)

    cached = FiitedEmbeddingBag(40, 8, 4, optimizer="sgd", lr=0.5, weight=torch.randn(40, 8))
    cached.set_precision("int8", 0.25)        # cached rows: the cache is the master copy, the codes go stale
    cached.cache.record(torch.arange(10).repeat(5))
    cached.refresh_cache()
    for step in range(3):
        ids, offsets, _ = _batch(40, n=60, bags=6, seed=step)
        _loss(cached(ids, offsets), step).backward()
    rows, _, magnitude = chunk_utilities(cached, signal="magnitude")
    assert cached.cache.ids.numel() == 10
    assert torch.allclose(magnitude, cached.dense_weight()[rows].view(-1, 2, 4).norm(dim=2), rtol=1e-5)


def test_out_of_range_ids_raise_like_embedding_bag(backend):
    bag = FiitedEmbeddingBag(10, 4, chunk_size=2)
    with pytest.raises(IndexError, match="out of range"):
        bag(torch.tensor([3, 10]), torch.tensor([0]))
    with pytest.raises(IndexError, match="out of range"):
        bag(torch.tensor([-1]), torch.tensor([0]))


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_fused_update_on_a_table_pruned_to_nothing(backend, optimizer):
    """A table whose every chunk is pruned keeps training (it reads zeros, updates nothing)."""
    bag = FiitedEmbeddingBag(20, 8, chunk_size=4, optimizer=optimizer, lr=0.1)
    bag.track_utility(0.9)
    bag.store.shrink_rows(torch.zeros(20, dtype=torch.int64))
    assert bag.store.capacity == 0
    ids, offsets, _ = _batch(20)
    out = bag(ids, offsets)
    _loss(out, 0).backward()
    assert bool((out == 0).all()) and bag.store.live == 0


@pytest.mark.skipif(compiled() is None, reason="no C++ compiler: the native kernels could not be built")
@pytest.mark.parametrize("dim,cs", [(24, 4), (40, 4), (64, 2), (128, 4)])
@pytest.mark.parametrize("storage,cache", [("fp32", 0.0), ("int8", 0.0), ("int8", 0.2), ("int4", 0.2)])
def test_training_forward_in_registers_equals_pure_torch(dim, cs, storage, cache):
    """The training forwards pool in registers (register_pooling.h): partial registers, rows of more than 16
    chunks, quantized rows with and without the cache, sum and mean, over thread splits and several groups."""
    gen = torch.Generator().manual_seed(dim + cs)
    bag = FiitedEmbeddingBag(500, dim, cs, optimizer="sgd", lr=0.1, weight=torch.randn(500, dim, generator=gen))
    bag.shrink_rows(torch.randint(0, dim // cs + 1, (500,), generator=gen))
    if storage != "fp32":
        bag.set_precision(storage, cache)
        if bag.cache is not None:
            bag.cache.record(torch.randint(0, 500, (3000,), generator=gen))
            bag.refresh_cache()
    ids = torch.randint(0, 500, (20_000,), generator=gen)
    offsets = torch.cat([torch.tensor([0, 0]), torch.sort(torch.randint(0, 20_000, (700,), generator=gen)).values])
    weights = torch.rand(20_000, generator=gen)
    threads = torch.get_num_threads()
    bag.eval()
    try:
        with torch.no_grad():
            for mode, w in (("sum", weights), ("mean", None)):
                bag.mode = mode
                kernels.use_native(False)
                ref = bag(ids, offsets, w)
                kernels.use_native(True)
                for n in (1, 2):
                    torch.set_num_threads(n)
                    assert torch.allclose(bag(ids, offsets, w), ref, atol=1e-5, rtol=1e-5), (mode, n)
    finally:
        torch.set_num_threads(threads)
        kernels.use_native(True)


def test_offsets_out_of_order_are_a_value_error(backend):
    bag = FiitedEmbeddingBag(50, 8, 4)
    ids = torch.randint(0, 50, (300,))
    for offsets in (torch.tensor([250, 0]), torch.tensor([0, 301]), torch.tensor([-1, 5])):
        with pytest.raises(ValueError, match="offsets must be non-decreasing and in"):
            bag(ids, offsets)


def test_row_slots_over_whole_blocks_of_large_counts():
    """The index sums up to 63 count bytes of a row's block (one masked cache-line load natively): every position
    in a block, counts up to 255 chunks a row, native == torch == a running sum over the rows."""
    gen = torch.Generator().manual_seed(5)
    rows = 64 * 5 + 7
    counts = torch.zeros(64 * 6, dtype=torch.uint8)
    counts[:rows] = torch.randint(0, 256, (rows,), generator=gen).to(torch.uint8)
    counts[64:128] = 255                                           # a block whose sums need more than 8 bits
    counts[128:192] = 0
    totals = counts.view(-1, 64).sum(1, dtype=torch.int64)
    base = torch.cumsum(totals, 0) - totals + 1000
    expected = 1000 + torch.cumsum(counts[:rows].long(), 0) - counts[:rows].long()
    for native in ([True, False] if kernels.native_kernels() is not None else [False]):
        kernels.use_native(native)
        try:
            first, cnt = kernels.row_slots(counts, base, torch.arange(rows), rows)
        finally:
            kernels.use_native(True)
        assert torch.equal(first, expected) and torch.equal(cnt, counts[:rows].long())
