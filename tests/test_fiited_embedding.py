"""FIITED embedding modules: equal to the dense modules before pruning, zeros for pruned chunks, gradients only
to stored chunks, conversion of existing models, and state-dict round trips of compacted stores."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compresskit.models.dlrm import DLRM
from compresskit.plugins.fiited import FiitedEmbedding, FiitedEmbeddingBag, convert_embeddings, fiited_modules


def _store_grad_as_dense(m: FiitedEmbeddingBag) -> torch.Tensor:
    g = torch.zeros(m.num_embeddings * m.num_chunks, m.chunk_size)
    rows, chunks, slots = m.store.entries()
    grad = m.store.pool.grad
    grad = grad.to_dense() if grad.is_sparse else grad
    g[rows * m.num_chunks + chunks] = grad[slots]
    return g.view(m.num_embeddings, m.embedding_dim)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_bag_equals_dense_1d(mode, include_last_offset, sparse):
    dense = nn.EmbeddingBag(200, 24, mode=mode, include_last_offset=include_last_offset, sparse=sparse)
    fiited = FiitedEmbeddingBag.from_dense(dense, chunk_size=6)
    ids = torch.randint(0, 200, (97,))
    offsets = torch.tensor([0, 0, 5, 17, 17, 60, 96])
    if include_last_offset:
        offsets = torch.cat([offsets, torch.tensor([97])])
    weights = torch.rand(97) if mode == "sum" else None
    a = dense(ids, offsets, per_sample_weights=weights)
    b = fiited(ids, offsets, per_sample_weights=weights)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    upstream = torch.randn_like(a)
    (a * upstream).sum().backward()
    (b * upstream).sum().backward()
    dense_grad = dense.weight.grad.to_dense() if sparse else dense.weight.grad
    assert torch.allclose(_store_grad_as_dense(fiited), dense_grad, atol=1e-6, rtol=0)


def test_bag_equals_dense_2d_input():
    dense = nn.EmbeddingBag(50, 16, mode="mean")
    fiited = FiitedEmbeddingBag.from_dense(dense, chunk_size=8)
    ids = torch.randint(0, 50, (12, 4))
    assert torch.allclose(dense(ids), fiited(ids), atol=1e-6, rtol=0)


def test_embedding_equals_dense_any_shape():
    dense = nn.Embedding(30, 8)
    fiited = FiitedEmbedding.from_dense(dense, chunk_size=2)
    ids = torch.randint(0, 30, (3, 5, 2))
    out = fiited(ids)
    assert out.shape == (3, 5, 2, 8)
    assert torch.allclose(dense(ids), out, atol=1e-6, rtol=0)


def test_pruned_chunks_read_as_zero_and_get_no_gradient():
    dense = nn.EmbeddingBag(10, 8, mode="sum")
    fiited = FiitedEmbeddingBag.from_dense(dense, chunk_size=2)
    counts = fiited.store.row_counts()
    counts[1], counts[4] = 1, 0
    fiited.store.shrink_rows(counts)
    reference = dense.weight.detach().clone()
    reference[1, 2:] = 0
    reference[4, :] = 0
    ids = torch.tensor([1, 4, 1, 7])
    offsets = torch.tensor([0, 1, 2])
    expected = nn.functional.embedding_bag(ids, reference, offsets, mode="sum")
    out = fiited(ids, offsets)
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    out.sum().backward()
    assert fiited.store.pool.grad.shape == (40 - 7, 2)            # gradient exists only for stored chunks
    assert fiited.row_chunk_counts().tolist() == [4, 1, 4, 4, 0, 4, 4, 4, 4, 4]


def test_convert_existing_models():
    model = DLRM(num_dense=3, cardinalities=[20, 30, 40], embedding_dim=8)
    x = (torch.randn(16, 3), torch.stack([torch.randint(0, c, (16,)) for c in (20, 30, 40)], 1))
    before = model(*x)
    names = convert_embeddings(model, chunk_size=4)
    assert names == ["embeddings.0", "embeddings.1", "embeddings.2"]
    assert torch.allclose(model(*x), before, atol=1e-6, rtol=0)

    class UserModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.user = nn.Embedding(50, 12)
            self.item = nn.Embedding(60, 12)
            self.head = nn.Linear(12, 1)

        def forward(self, u, i):
            return self.head(self.user(u) * self.item(i)).squeeze(-1)

    user_model = UserModel()
    u, i = torch.randint(0, 50, (9,)), torch.randint(0, 60, (9,))
    ref = user_model(u, i)
    assert convert_embeddings(user_model, chunk_size=3, include=["user"]) == ["user"]
    assert isinstance(user_model.user, FiitedEmbedding) and isinstance(user_model.item, nn.Embedding)
    assert torch.allclose(user_model(u, i), ref, atol=1e-6, rtol=0)


def test_convert_rejects_bad_chunk_size():
    model = nn.Sequential(nn.Embedding(5, 10))
    with pytest.raises(ValueError, match="not a multiple of chunk_size 4"):
        convert_embeddings(model, chunk_size=4)


def test_compacted_state_dict_loads_into_fresh_model():
    model = DLRM(num_dense=2, cardinalities=[30, 40], embedding_dim=8)
    convert_embeddings(model, chunk_size=2)
    for _, m in fiited_modules(model):
        counts = m.store.row_counts()
        counts[::3] = 2
        m.store.shrink_rows(counts)
    state = model.state_dict()
    fresh = DLRM(num_dense=2, cardinalities=[30, 40], embedding_dim=8)
    convert_embeddings(fresh, chunk_size=2)
    fresh.load_state_dict(state)
    x = (torch.randn(7, 2), torch.stack([torch.randint(0, 30, (7,)), torch.randint(0, 40, (7,))], 1))
    assert torch.equal(fresh(*x), model(*x))
    assert fresh.embeddings[0].store.capacity == model.embeddings[0].store.capacity < 30 * 4


def test_lazy_bag_allocates_on_first_training_access_within_capacity():
    bag = FiitedEmbeddingBag(1000, 8, chunk_size=4, lazy=True, capacity=10)
    assert bag.store.live == 0
    ids = torch.tensor([3, 5, 3, 7, 73, 75, 77])
    offsets = torch.arange(7)
    bag.eval()
    assert bag(ids, offsets).abs().sum() == 0                   # evaluation never allocates
    bag.train()
    out = bag(ids, offsets)
    # rows are admitted a block of 64 at a time, first come first served: rows 3, 5, 7 (6 chunks) fit, the block of
    # 73, 75, 77 (6 more) does not
    stored = bag.row_chunk_counts()
    assert torch.nonzero(stored).flatten().tolist() == [3, 5, 7] and bag.store.live == 6
    assert ((out.abs().sum(1) > 0) == torch.tensor([True, True, True, True, False, False, False])).all()
    bag(torch.tensor([200]), torch.tensor([0]))                 # a small block still fits
    assert bag.row_chunk_counts()[200] == 2 and bag.store.live == 8
    bag(torch.tensor([73, 74]), torch.tensor([0]))              # 4 chunks, 2 free slots: refused, not "seen"
    assert bag.row_chunk_counts()[[73, 74]].tolist() == [0, 0]
    counts = bag.store.row_counts()
    counts[[3, 5]] = 0
    bag.store.shrink_rows(counts)                               # pruning frees 4 slots in place
    out = bag(torch.tensor([73, 74]), torch.tensor([0, 1]))     # so the late rows get their chunks now
    assert bag.row_chunk_counts()[[73, 74]].tolist() == [2, 2] and bool((out.abs().sum(1) > 0).all())
    assert bag.store.capacity == 10 and bag.store.live == 8


def _id_modules():
    """(name, module, call(ids) -> output, dense twin's call) for every module type that takes ids."""
    from compresskit.plugins.fiited.mixed_dim import MixedDimEmbeddingBag
    from compresskit.plugins.fiited.natural import NarrowEmbeddingBag

    dense_bag, dense_emb = nn.EmbeddingBag(20, 8, mode="sum"), nn.Embedding(20, 8)
    counts = torch.arange(20, dtype=torch.float32)
    bag_call = lambda m: (lambda ids: m(ids, torch.tensor([0, 1])))  # noqa: E731
    weighted = lambda m: (lambda ids: m(ids, torch.tensor([0, 1]), torch.ones(ids.numel())))  # noqa: E731
    last = lambda m: (lambda ids: m(ids, torch.tensor([0, 1, ids.numel()])))  # noqa: E731
    return [
        ("fiited bag", bag_call(FiitedEmbeddingBag(20, 8, chunk_size=4)), bag_call(dense_bag)),
        ("fiited bag weighted", weighted(FiitedEmbeddingBag(20, 8, chunk_size=4)), weighted(dense_bag)),
        ("fiited bag last offset", last(FiitedEmbeddingBag(20, 8, chunk_size=4, include_last_offset=True)),
         last(nn.EmbeddingBag(20, 8, mode="sum", include_last_offset=True))),
        ("fiited bag 2-D", lambda ids: FiitedEmbeddingBag(20, 8, chunk_size=4)(ids.view(1, -1)),
         lambda ids: dense_bag(ids.view(1, -1))),
        ("fiited lazy bag", bag_call(FiitedEmbeddingBag(20, 8, chunk_size=4, lazy=True, capacity=8)),
         bag_call(dense_bag)),
        ("fiited embedding", FiitedEmbedding(20, 8, chunk_size=4), dense_emb),
        ("narrow bag", weighted(NarrowEmbeddingBag.from_dense(dense_bag, 4)), weighted(dense_bag)),
        ("narrow embedding", NarrowEmbeddingBag.from_dense(dense_emb, 4), dense_emb),
        ("mixed-dim bag", bag_call(MixedDimEmbeddingBag.from_dense(dense_bag, counts, 20 * 8 * 4)),
         bag_call(dense_bag)),
        ("mixed-dim embedding", MixedDimEmbeddingBag.from_dense(dense_emb, counts, 20 * 8 * 4), dense_emb),
    ]


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("bad", [20, 25, -1, -20])
def test_out_of_range_and_negative_ids_raise_index_error(native, bad):
    from compresskit.plugins.fiited import kernels

    kernels.use_native(native)
    try:
        for name, call, dense_call in _id_modules():
            ids = torch.tensor([3, bad])
            with pytest.raises((IndexError, RuntimeError)):      # the torch module refuses it too
                dense_call(ids)
            with pytest.raises(IndexError, match=rf"^index {bad} out of range for a table of 20 rows "
                                                 rf"\(ids must be in \[0, 20\)\)$"):
                call(ids)
            assert call(torch.tensor([0, 19])).shape[-1] == 8, name  # the edges are in range
    finally:
        kernels.use_native(True)


def test_lazy_bag_bad_id_admits_nothing():
    bag = FiitedEmbeddingBag(20, 8, chunk_size=4, lazy=True, capacity=16)
    with pytest.raises(IndexError):
        bag(torch.tensor([3, -1]), torch.tensor([0]))
    assert bag.store.live == 0 and int(bag.seen.sum()) == 0


@pytest.mark.parametrize("dense,option", [
    (nn.EmbeddingBag(20, 8, scale_grad_by_freq=True), "scale_grad_by_freq=True"),
    (nn.Embedding(20, 8, scale_grad_by_freq=True), "scale_grad_by_freq=True"),
    (nn.EmbeddingBag(20, 8, max_norm=1.0), "max_norm=1.0"),
    (nn.Embedding(20, 8, padding_idx=0), "padding_idx=0"),
    (nn.EmbeddingBag(20, 8, mode="max"), "mode 'max'"),
])
def test_from_dense_refuses_options_it_cannot_honour(dense, option):
    """A row seen 3 times with scale_grad_by_freq gets gradient 1.0 from nn.EmbeddingBag; the twin would give 3.0, so
    the conversion stops instead of changing training silently."""
    twin = FiitedEmbeddingBag if isinstance(dense, nn.EmbeddingBag) else FiitedEmbedding
    with pytest.raises(ValueError, match=option.replace("(", r"\(")):
        twin.from_dense(dense, 4)
    model = nn.Sequential(dense)
    with pytest.raises(ValueError, match="not supported"):
        convert_embeddings(model, 4)


def test_a_trained_state_dict_loads_into_a_freshly_converted_model():
    """The natural way back: build the model, convert it, load the trained state (utilities, fused row-wise Adagrad
    state and pruned sizes included) and compute what the trained model computes."""
    import compresskit
    from compresskit.plugins.fiited import FiitedConfig

    torch.manual_seed(0)
    trained = DLRM(4, [50, 30, 20], embedding_dim=8, bottom_mlp=[8], top_mlp=[8])
    compression = compresskit.prepare(trained, FiitedConfig(target_memory_ratio=0.5, chunk_size=4, start_step=0,
                                                            end_step=2, interval=1), total_steps=4)
    for name, table in fiited_modules(trained):
        if name.endswith("0"):
            table.register_buffer("row_momentum", torch.rand(table.num_embeddings))   # as rowwise Adagrad leaves it
    dense, sparse = torch.randn(16, 4), torch.stack([torch.randint(0, c, (16,)) for c in (50, 30, 20)], 1)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    compression.attach_optimizer(optimizer)
    for _ in range(4):
        trained(dense, sparse).sum().backward()
        compression.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        compression.step()
    state = trained.state_dict()
    assert any(k.endswith("utility_scale") for k in state)
    fresh = DLRM(4, [50, 30, 20], embedding_dim=8, bottom_mlp=[8], top_mlp=[8])
    convert_embeddings(fresh, 4)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.eval()(dense, sparse), trained.eval()(dense, sparse))
