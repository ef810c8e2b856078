"""Natural-form baselines (uniform narrow table, mixed-dim buckets): outputs, gradients, bytes, planning rules."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compresskit.plugins.fiited.mixed_dim import (MixedDimEmbeddingBag, mixed_dim_tables, plan_mixed_dims,
                                                   plan_mixed_dims_tables)
from compresskit.plugins.fiited.natural import NarrowEmbeddingBag, uniform_dim_for_budget
from compresskit.table_types import TableBytes

ROWS, D = 200, 8


def _counts(rows: int = ROWS, seed: int = 0) -> torch.Tensor:
    """Zipf-like access counts in a shuffled row order, with a few never-seen rows."""
    g = torch.Generator().manual_seed(seed)
    counts = (1000.0 / torch.arange(1, rows + 1).float() ** 0.7).floor()
    counts[-10:] = 0
    return counts[torch.randperm(rows, generator=g)]


def _row_widths(counts: torch.Tensor, budget: int, **kw) -> torch.Tensor:
    """Width each row keeps under the mixed-dim plan, from the plan (0 = dropped bucket)."""
    order, starts, dims = plan_mixed_dims(counts, D, budget, **kw)
    widths = torch.zeros(counts.numel(), dtype=torch.long)
    for i, d in enumerate(dims):
        widths[order[starts[i]:starts[i + 1]]] = d
    return widths


def _truncated(weight: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Dense rows with columns >= their width zeroed (the expected table before training)."""
    cols = torch.arange(weight.shape[1])
    return weight * (cols[None, :] < widths[:, None]).to(weight.dtype)


def _reference_bags(table: torch.Tensor, ids: list[int], offsets: list[int], mode: str,
                    weights: list[float] | None = None, include_last_offset: bool = False) -> torch.Tensor:
    """Bag outputs by explicit loops over Python lists."""
    ends = offsets[1:] if include_last_offset else offsets[1:] + [len(ids)]
    starts = offsets[:-1] if include_last_offset else offsets
    out = torch.zeros(len(starts), table.shape[1], dtype=torch.float64)
    for b, (s, e) in enumerate(zip(starts, ends)):
        for j in range(s, e):
            out[b] += table[ids[j]].double() * (weights[j] if weights is not None else 1.0)
        if mode == "mean" and e > s:
            out[b] /= e - s
    return out


IDS = [3, 0, 7, 7, 12, 49, 1, 0, 33, 21, 21, 21, 5]
OFFSETS = [0, 2, 2, 5, 9]  # includes an empty bag
WEIGHTS = [0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 1.0, 3.0, 0.1, -2.0, 0.7, 1.1, 0.3]


def _dense(bag: bool, mode: str = "sum", include_last_offset: bool = False) -> nn.Module:
    if bag:
        return nn.EmbeddingBag(ROWS, D, mode=mode, include_last_offset=include_last_offset)
    return nn.Embedding(ROWS, D)


def _budget(ratio: float) -> int:
    return int(ratio * ROWS * D * 4)


def _make(kind: str, dense: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """(baseline module, expected truncated table)."""
    w = dense.weight.detach()
    if kind == "narrow":
        widths = torch.full((ROWS,), 3)
        return NarrowEmbeddingBag.from_dense(dense, 3), _truncated(w, widths)
    counts, budget = _counts(), _budget(0.4)
    module = MixedDimEmbeddingBag.from_dense(dense, counts, budget)
    return module, _truncated(w, _row_widths(counts, budget))


@pytest.mark.parametrize("kind", ["narrow", "mixed"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_bag_1d_matches_truncated_reference(kind, mode, include_last_offset):
    dense = _dense(True, mode, include_last_offset)
    module, table = _make(kind, dense)
    offsets = OFFSETS + [len(IDS)] if include_last_offset else OFFSETS
    out = module(torch.tensor(IDS), torch.tensor(offsets))
    ref = _reference_bags(table, IDS, offsets, mode, include_last_offset=include_last_offset)
    assert out.shape == (len(OFFSETS), D)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=0)
    # and torch's own bag on the truncated table agrees
    twin = nn.EmbeddingBag.from_pretrained(table, freeze=True, mode=mode, include_last_offset=include_last_offset)
    torch.testing.assert_close(out, twin(torch.tensor(IDS), torch.tensor(offsets)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["narrow", "mixed"])
def test_bag_per_sample_weights(kind):
    module, table = _make(kind, _dense(True, "sum"))
    out = module(torch.tensor(IDS), torch.tensor(OFFSETS), per_sample_weights=torch.tensor(WEIGHTS))
    ref = _reference_bags(table, IDS, OFFSETS, "sum", WEIGHTS)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="per_sample_weights"):
        _make(kind, _dense(True, "mean"))[0](torch.tensor(IDS), torch.tensor(OFFSETS),
                                             per_sample_weights=torch.tensor(WEIGHTS))


@pytest.mark.parametrize("kind", ["narrow", "mixed"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_bag_2d_input(kind, mode):
    module, table = _make(kind, _dense(True, mode))
    ids = torch.tensor(IDS[:12]).view(4, 3)
    flat = ids.reshape(-1).tolist()
    out = module(ids)
    torch.testing.assert_close(out.double(), _reference_bags(table, flat, [0, 3, 6, 9], mode), atol=1e-6, rtol=0)
    if mode == "sum":
        psw = torch.tensor(WEIGHTS[:12]).view(4, 3)
        out = module(ids, per_sample_weights=psw)
        ref = _reference_bags(table, flat, [0, 3, 6, 9], mode, WEIGHTS[:12])
        torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="offsets"):
        module(ids, torch.tensor([0, 3]))


@pytest.mark.parametrize("kind", ["narrow", "mixed"])
def test_embedding_style_any_shape(kind):
    module, table = _make(kind, _dense(False))
    assert not module.bag
    ids = torch.randint(0, ROWS, (2, 3, 4))
    out = module(ids)
    assert out.shape == (2, 3, 4, D)
    torch.testing.assert_close(out, table[ids], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="nn.Embedding"):
        module(ids.reshape(-1), torch.tensor([0]))


@pytest.mark.parametrize("kind", ["narrow", "mixed"])
def test_gradients_reach_tables_and_projections(kind):
    module, _ = _make(kind, _dense(True, "sum"))
    out = module(torch.arange(ROWS), torch.arange(0, ROWS, 5))
    (out * torch.randn_like(out)).sum().backward()
    if kind == "narrow":
        assert module.weight.grad is not None and bool((module.weight.grad.abs().sum(1) > 0).all())
        return
    assert len(module.tables) >= 2
    for table in module.tables:  # every row was looked up once
        assert table.grad is not None and bool((table.grad.abs().sum(1) > 0).all())
    linears = [p for p in module.projections if isinstance(p, nn.Linear)]
    assert linears
    for proj in linears:
        assert proj.weight.grad is not None and float(proj.weight.grad.abs().sum()) > 0


def test_per_sample_weight_gradient_and_sparse_tables():
    dense = nn.EmbeddingBag(ROWS, D, mode="sum", sparse=True)
    module = MixedDimEmbeddingBag.from_dense(dense, _counts(), _budget(0.4))
    psw = torch.tensor(WEIGHTS, requires_grad=True)
    module(torch.tensor(IDS), torch.tensor(OFFSETS), per_sample_weights=psw).sum().backward()
    assert psw.grad is not None and float(psw.grad.abs().sum()) > 0
    assert any(t.grad is not None and t.grad.is_sparse for t in module.tables)


def _tensor_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("ratio", [0.15, 0.25, 0.3, 0.4, 0.7, 1.0])
def test_mixed_memory_fits_budget_and_matches_tensors(ratio):
    budget = _budget(ratio)
    module = MixedDimEmbeddingBag.from_dense(nn.EmbeddingBag(ROWS, D), _counts(), budget)
    mem = module.table_bytes()
    assert mem.total <= budget and mem.training == 0
    assert mem.total == mem.payload + mem.index == _tensor_bytes(module)
    assert module.remap.dtype == torch.int32
    assert mem.index == ROWS * 4 + module.bucket_starts.numel() * 8
    dims = [d for d in module.dims if d > 0]
    assert dims[0] == max(dims) and dims == sorted(dims, reverse=True)


def test_narrow_memory_and_dim_for_budget():
    budget = _budget(0.4)
    d = uniform_dim_for_budget(ROWS, D, budget)
    assert d == 3  # 0.4 * 8 = 3.2 columns
    module = NarrowEmbeddingBag.from_dense(nn.EmbeddingBag(ROWS, D), d)
    mem = module.table_bytes()
    assert mem == TableBytes(ROWS * d * 4)
    assert mem.total == _tensor_bytes(module) <= budget
    with pytest.raises(ValueError, match="dim must be"):
        NarrowEmbeddingBag.from_dense(nn.EmbeddingBag(ROWS, D), D + 1)


def test_most_frequent_bucket_gets_largest_dim():
    counts = _counts()
    order, starts, dims = plan_mixed_dims(counts, D, _budget(0.3))
    assert len(dims) == 4 and all(d > 0 for d in dims)
    assert dims[0] > dims[-1] and dims == sorted(dims, reverse=True)
    assert bool((counts[order[:-1]] >= counts[order[1:]]).all())  # sorted by count, most frequent first
    assert int(counts[order[0]]) == int(counts.max())


def test_bucket_split_equal_access_mass_and_ties_by_id():
    counts = torch.tensor([1.0, 8.0, 1.0, 4.0, 1.0, 1.0, 0.0, 0.0])  # total 16 -> 4 per bucket
    order, starts, _ = plan_mixed_dims(counts, D, 10**6)
    assert order.tolist() == [1, 3, 0, 2, 4, 5, 6, 7]  # descending counts, ties by id
    assert starts == [0, 1, 2, 4, 8]  # masses 8 | 4 | 2 | 2 (+ the never-seen rows in the tail)
    equal = plan_mixed_dims(torch.ones(8), D, 10**6, num_buckets=4)
    assert equal[0].tolist() == list(range(8)) and equal[1] == [0, 2, 4, 6, 8]
    assert plan_mixed_dims(torch.ones(3), D, 10**6, num_buckets=4)[1] == [0, 1, 2, 3]  # fewer rows than buckets


def test_dims_follow_popularity_power_rule():
    # buckets of 16, 64, 256 rows with equal mass: p ratios 1 : 1/4 : 1/16 -> dims 1 : 1/2 : 1/4 at alpha 0.5
    counts = torch.cat([torch.full((16,), 16.0), torch.full((64,), 4.0), torch.ones(256)])
    _, starts, dims = plan_mixed_dims(counts, 64, 10**9, num_buckets=3)
    assert starts == [0, 16, 80, 336]
    assert dims == [64, 64, 64]  # an ample budget stores everything at full width, no projections
    index = 336 * 4 + 4 * 8
    budget = index + 4 * (16 * 16 + 16 * 64 + 64 * 8 + 8 * 64 + 256 * 4 + 4 * 64)
    assert plan_mixed_dims(counts, 64, budget, num_buckets=3)[2] == [16, 8, 4]
    assert plan_mixed_dims(counts, 64, budget - 1, num_buckets=3)[2] == [15, 8, 4]
    equal = plan_mixed_dims(counts, 64, budget, num_buckets=3, alpha=0.0)[2]  # alpha 0: one dim for all
    assert len(set(equal)) == 1 and 336 * equal[0] + 3 * 64 * equal[0] <= budget - index


def test_small_bucket_may_be_cheaper_at_full_width():
    # one hot row: 1 x 8 values at full width beat 1 x 1 + an 8 x 1 projection, so the fit takes full width
    counts = torch.cat([torch.tensor([1000.0]), torch.ones(99)])
    _, starts, dims = plan_mixed_dims(counts, 8, 100 * 4 + 3 * 8 + 4 * (8 + 99 * 1 + 8), num_buckets=2)
    assert starts == [0, 1, 100] and dims == [8, 1]


def test_full_budget_stores_full_rows_without_projections():
    dense = nn.EmbeddingBag(ROWS, D)
    module = MixedDimEmbeddingBag.from_dense(dense, _counts(), ROWS * D * 4 + 10**4)
    assert module.dims == [D] * len(module.dims)
    assert not any(isinstance(p, nn.Linear) for p in module.projections)
    torch.testing.assert_close(module(torch.arange(ROWS).view(-1, 1)), dense.weight.detach())


def test_tight_budget_drops_rare_buckets_then_errors():
    counts = _counts()
    order, starts, _ = plan_mixed_dims(counts, D, 10**6)
    sizes = [b - a for a, b in zip(starts, starts[1:])]
    index = ROWS * 4 + 5 * 8
    all_ones = index + 4 * sum(n + D for n in sizes)
    # one byte short of every bucket at one dim: the rarest bucket is dropped, its rows read zeros
    module = MixedDimEmbeddingBag.from_dense(nn.EmbeddingBag(ROWS, D), counts, all_ones - 1)
    assert module.dims[-1] == 0 and module.dims[0] >= 1 and module.kept == len(module.tables) < 4
    assert module.table_bytes().total <= all_ones - 1 and module.table_bytes().total == _tensor_bytes(module)
    dropped = order[starts[module.kept]:]
    assert bool((module(dropped.view(-1, 1)) == 0).all())
    kept = order[:starts[module.kept]]
    assert bool((module(kept.view(-1, 1)).abs().sum(1) > 0).all())
    minimum = index + 4 * (sizes[0] + D)
    assert plan_mixed_dims(counts, D, minimum)[2] == [1, 0, 0, 0]
    with pytest.raises(ValueError, match=f"budget of {minimum - 1} bytes is below the minimum of {minimum} bytes"):
        MixedDimEmbeddingBag.from_dense(nn.EmbeddingBag(ROWS, D), counts, minimum - 1)


def test_rejects_unsupported_dense_options():
    with pytest.raises(ValueError, match="padding_idx"):
        NarrowEmbeddingBag.from_dense(nn.Embedding(ROWS, D, padding_idx=0), 2)
    with pytest.raises(ValueError, match="mode 'max'"):
        MixedDimEmbeddingBag.from_dense(nn.EmbeddingBag(ROWS, D, mode="max"), _counts(), _budget(0.5))
    with pytest.raises(ValueError, match="counts has"):
        MixedDimEmbeddingBag.from_dense(nn.EmbeddingBag(ROWS, D), torch.ones(ROWS + 1), _budget(0.5))


# ------------------------------------------------------------------------------ model-wide mixed-dim budget
MODEL_D = 32


def _model_counts() -> list[torch.Tensor]:
    """Access counts of a model with tables of 2, 10 and 2000 rows (different totals, Zipf-like, shuffled)."""
    g = torch.Generator().manual_seed(1)

    def zipf(rows: int, s: float, scale: float) -> torch.Tensor:
        c = (scale / torch.arange(1, rows + 1).float() ** s).floor()
        return c[torch.randperm(rows, generator=g)]

    return [torch.tensor([700.0, 300.0]), zipf(10, 1.0, 500.0), zipf(2000, 0.8, 3000.0)]


def _model_budget(ratio: float, counts: list[torch.Tensor]) -> int:
    return int(ratio * sum(c.numel() for c in counts) * MODEL_D * 4)


def _bucket_pops(counts: torch.Tensor, order: torch.Tensor, starts: list[int]) -> list[float]:
    """Mean accesses per row of each bucket / total accesses of the table, recomputed from the plan."""
    total = float(counts.double().sum())
    return [float(counts[order[a:b]].double().mean()) / total for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.6])
def test_model_wide_budget_fits_and_matches_tensors(ratio):
    counts = _model_counts()
    budget = _model_budget(ratio, counts)
    denses = [nn.EmbeddingBag(c.numel(), MODEL_D, mode="sum") for c in counts]
    modules = mixed_dim_tables(denses, counts, budget)
    plans = plan_mixed_dims_tables(counts, MODEL_D, budget)
    totals = [m.table_bytes().total for m in modules]
    assert sum(totals) <= budget
    assert totals == [_tensor_bytes(m) for m in modules]
    # popularity is per table (accesses / that table's total): rescaling one table's counts changes nothing
    rescaled = plan_mixed_dims_tables([counts[0] * 50, counts[1], counts[2] / 3], MODEL_D, budget)
    assert [dims for _, _, dims in rescaled] == [dims for _, _, dims in plans]
    for module, dense, (order, starts, dims) in zip(modules, denses, plans):
        assert module.dims == dims and all(d > 0 for d in dims)  # nothing dropped at these budgets
        widths = torch.zeros(dense.num_embeddings, dtype=torch.long)
        for i, d in enumerate(dims):
            widths[order[starts[i]:starts[i + 1]]] = d
        rows = torch.arange(dense.num_embeddings).view(-1, 1)
        torch.testing.assert_close(module(rows), _truncated(dense.weight.detach(), widths), atol=1e-6, rtol=0)


def test_tiny_tables_feasible_only_under_model_wide_budget():
    counts = _model_counts()
    budget = _model_budget(0.1, counts)
    tiny = nn.EmbeddingBag(2, MODEL_D)
    with pytest.raises(ValueError, match="below the minimum"):  # 10% of a 2-row table < its remap + one row
        MixedDimEmbeddingBag.from_dense(tiny, counts[0], int(0.1 * 2 * MODEL_D * 4))
    denses = [tiny, nn.EmbeddingBag(10, MODEL_D), nn.EmbeddingBag(2000, MODEL_D)]
    modules = mixed_dim_tables(denses, counts, budget)
    assert sum(m.table_bytes().total for m in modules) <= budget
    assert modules[0].dims[0] > modules[2].dims[0]  # a tiny table's rows are hot: wider than the big table's head
    assert all(d > 0 for m in modules for d in m.dims)


@pytest.mark.parametrize("ratio", [0.04, 0.05, 0.1, 0.25, 0.6])
def test_more_popular_bucket_never_narrower_across_tables(ratio):
    counts = _model_counts()
    plans = plan_mixed_dims_tables(counts, MODEL_D, _model_budget(ratio, counts))
    buckets = [(p, d) for c, (order, starts, dims) in zip(counts, plans)
               for p, d in zip(_bucket_pops(c, order, starts), dims)]
    for p_a, d_a in buckets:
        for p_b, d_b in buckets:
            if p_a > p_b:
                assert d_a >= d_b, (buckets, p_a, p_b)
    if ratio == 0.04:  # tight: the globally rarest buckets (of the big table) are dropped, every table kept
        assert plans[2][2][-1] == 0 and all(dims[0] > 0 for _, _, dims in plans)
    if ratio == 0.1:
        assert len({d for _, d in buckets}) > 3  # the dims really spread with popularity


@pytest.mark.parametrize("ratio", [0.1, 0.25, 1.0])
def test_model_wide_alpha_zero_gives_one_dim(ratio):
    counts = _model_counts()
    plans = plan_mixed_dims_tables(counts, MODEL_D, _model_budget(ratio, counts), alpha=0.0)
    dims = {d for _, _, ds in plans for d in ds}
    assert len(dims) == 1 and dims.pop() > 0


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("ratio", [0.15, 0.25, 0.3, 0.4, 0.7, 1.0])
def test_model_wide_planner_on_one_table_equals_per_table(ratio, alpha):
    counts = _counts()
    budget = _budget(ratio)
    order, starts, dims = plan_mixed_dims(counts, D, budget, alpha=alpha)
    (g_order, g_starts, g_dims), = plan_mixed_dims_tables([counts], D, budget, alpha=alpha)
    assert torch.equal(order, g_order) and starts == g_starts and dims == g_dims
    # popularity is per table: rescaling a table's counts, or adding an identical table with its own share of the
    # budget, leaves the plan unchanged (when nothing is dropped)
    assert plan_mixed_dims_tables([counts * 7], D, budget, alpha=alpha)[0][2] == dims
    if all(d > 0 for d in dims):
        twin = plan_mixed_dims_tables([counts, counts.clone()], D, 2 * budget, alpha=alpha)
        assert twin[0][2] == twin[1][2] == dims
    dense = nn.EmbeddingBag(ROWS, D)
    a = MixedDimEmbeddingBag.from_dense(dense, counts, budget, alpha=alpha)
    b = MixedDimEmbeddingBag.from_plan(dense, order, starts, dims)
    assert a.dims == b.dims and torch.equal(a.remap, b.remap)
    torch.testing.assert_close(a(torch.arange(ROWS).view(-1, 1)), b(torch.arange(ROWS).view(-1, 1)))


def test_model_wide_budget_too_small_errors():
    counts = [torch.ones(4), torch.ones(10), _counts(2000, seed=2)]
    plans = plan_mixed_dims_tables(counts, MODEL_D, 10**9, num_buckets=2)
    heads = [starts[1] for _, starts, _ in plans]  # rows of each table's most frequent bucket
    assert heads[:2] == [2, 5] and heads[2] >= 2  # >= 2 rows: cheapest at dim 1 with its projection
    index = sum(c.numel() * 4 + 3 * 8 for c in counts)
    minimum = index + 4 * sum(n + MODEL_D for n in heads)
    assert [dims for _, _, dims in plan_mixed_dims_tables(counts, MODEL_D, minimum, num_buckets=2)] == [[1, 0]] * 3
    with pytest.raises(ValueError, match=f"budget of {minimum - 1} bytes over 3 tables is below the minimum of "
                                         f"{minimum} bytes \\(remap index {index} bytes \\+ each table's most "
                                         f"frequent bucket alone"):
        plan_mixed_dims_tables(counts, MODEL_D, minimum - 1, num_buckets=2)
    with pytest.raises(ValueError, match="below the minimum"):
        mixed_dim_tables([nn.EmbeddingBag(c.numel(), MODEL_D) for c in counts], counts, minimum - 1, num_buckets=2)


def test_mixed_dim_tables_rejects_mismatches():
    counts = _model_counts()
    denses = [nn.EmbeddingBag(c.numel(), MODEL_D) for c in counts]
    with pytest.raises(ValueError, match="one counts tensor per dense table"):
        mixed_dim_tables(denses, counts[:2], 10**6)
    with pytest.raises(ValueError, match="counts\\[1\\] has"):
        mixed_dim_tables(denses, [counts[0], counts[2], counts[1]], 10**6)
    with pytest.raises(ValueError, match="same embedding_dim"):
        mixed_dim_tables(denses[:2] + [nn.EmbeddingBag(2000, 16)], counts, 10**6)
