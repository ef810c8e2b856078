"""Regrowth (FIITED) and re-admission (AdaEmbed): allocation follows drifting data, the budget is held, and the
store's one-pass resize keeps every kept chunk and frees what it drops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import compresskit
from compresskit.data.drift_ctr import DriftCTR, load_drift_ctr
from compresskit.models.dlrm import DLRM
from compresskit.plugins.fiited import FiitedConfig
from compresskit.plugins.fiited.embedding import FiitedEmbeddingBag, fiited_modules
from compresskit.plugins.fiited.importance import normalised_importance, regrowth_grid, whole_rows
from compresskit.plugins.fiited.store import ChunkStore

IDS, FIELDS, TOP = 1000, 2, 40


def newly_popular(seed: int = 0) -> list[torch.Tensor]:
    stream = DriftCTR(IDS, FIELDS, seed=seed)
    return [stream.changed_ids(f, TOP)[0] for f in range(FIELDS)]


def train_through_drift(config: FiitedConfig) -> dict:
    """A time-ordered pass over a drifting stream; mean chunks of the newly popular rows at the drift and at the
    end, the plugin's rounds and the final memory ratio."""
    data = load_drift_ctr(num_samples=16_000, num_ids=IDS, fields=FIELDS)
    torch.manual_seed(0)
    model = DLRM(2, data.info["cardinalities"], embedding_dim=16, bottom_mlp=[16], top_mlp=[32])
    steps = len(data.train) // 64
    compression = compresskit.prepare(model, config, total_steps=steps)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05)
    compression.attach_optimizer(optimizer)
    rows = newly_popular()

    def mean_chunks() -> float:
        return float(torch.cat([m.row_chunk_counts()[r].float() for (_, m), r in zip(fiited_modules(model), rows)])
                     .mean())

    dense, sparse, label = data.train.tensors
    at_drift = None
    for step in range(steps):
        at = slice(step * 64, (step + 1) * 64)
        loss = F.binary_cross_entropy_with_logits(model(dense[at], sparse[at]), label[at])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        compression.after_backward()
        optimizer.step()
        compression.step()
        if step == steps // 2:
            at_drift = mean_chunks()
    plugin = compression.plugins[0]
    return {"at_drift": at_drift, "end": mean_chunks(), "rounds": plugin.rounds, "steps": steps,
            "end_step": plugin._schedule_bounds(steps)[1],
            "memory_ratio": compression.report()["stages"][0]["memory_ratio"]}


def test_newly_popular_rows_gain_chunks_with_regrowth_and_the_budget_is_held():
    cfg = dict(target_memory_ratio=0.15, chunk_size=4, interval=10, end_fraction=0.3)
    grown = train_through_drift(FiitedConfig(regrow=True, **cfg))
    frozen = train_through_drift(FiitedConfig(regrow=False, **cfg))
    # the allocation is reached before the drift (end at 30%), then it follows the data
    assert grown["end"] > grown["at_drift"] + 0.5, grown
    assert frozen["end"] <= frozen["at_drift"] + 1e-9, frozen        # pruning alone is permanent
    assert grown["end"] > frozen["end"] + 0.5
    # rounds go on after the target was reached, and the budget holds at every one of them
    after = [r for r in grown["rounds"] if r["step"] > grown["end_step"]]
    assert len(after) >= 10 and sum(r["regrown_rows"] for r in after) > 0
    kept = [r["kept_chunks"] for r in after]
    assert max(kept) - min(kept) <= 0.01 * max(kept)
    assert grown["memory_ratio"] <= 0.15 and frozen["memory_ratio"] <= 0.15
    assert not [r for r in frozen["rounds"] if r["step"] > frozen["end_step"]]


def test_adaembed_readmits_rows_whose_importance_rises():
    torch.manual_seed(0)
    bag = FiitedEmbeddingBag(64, 8, chunk_size=4, weight=torch.randn(64, 8) * 0.1)
    bag.track_utility(0.9)
    bag.track_candidates("row")
    head = nn.Linear(8, 1)

    def train(ids: torch.Tensor, steps: int = 5) -> None:
        for _ in range(steps):
            out = head(bag(ids.view(-1, 1)))
            out.pow(2).sum().backward()

    train(torch.arange(0, 32))
    importance = bag.candidate_utilities(torch.arange(64))
    assert (importance[:32] > 0).all() and (importance[32:] == 0).all()
    keep = whole_rows([normalised_importance(importance)], [torch.full((64,), 2)], 64)[0]
    bag.resize_rows(torch.where(keep, 0, 2), "random", torch.Generator().manual_seed(0))
    assert (bag.row_chunk_counts()[32:] == 0).all() and (bag.row_chunk_counts()[:32] == 2).all()
    # the data moves to rows 32..63: their importance overtakes, and they come back with fresh values
    train(torch.arange(32, 64), steps=60)
    importance = bag.candidate_utilities(torch.arange(64))
    drop = whole_rows([normalised_importance(importance)], [torch.full((64,), 2)], 64)[0]
    grown = bag.resize_rows(torch.where(drop, 0, 2), "random", torch.Generator().manual_seed(0))
    assert torch.equal(grown, torch.arange(32, 64))
    readmitted = bag.store.dense()[32:]
    assert (readmitted != 0).all() and readmitted.std() < 0.2      # fresh values at the table's own scale


def test_normalisation_lets_tables_of_different_scales_share_one_threshold():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1000, generator=gen)
    b = torch.rand(1000, generator=gen) * 100          # the same shape of importance, 100x the scale
    raw = whole_rows([a, b], [torch.ones(1000, dtype=torch.long)] * 2, 1000)
    assert int((~raw[0]).sum()) < 20                    # raw sums: the large-scale table takes almost all of it
    normed = whole_rows([normalised_importance(a), normalised_importance(b)],
                        [torch.ones(1000, dtype=torch.long)] * 2, 1000)
    kept = [int((~d).sum()) for d in normed]
    assert abs(kept[0] - kept[1]) < 100, kept


def test_resize_rows_keeps_prefixes_and_sizes_the_pool_exactly():
    for seed in range(10):
        for fixed in (False, True):
            gen = torch.Generator().manual_seed(seed)
            store = ChunkStore(20, 4, 2, capacity=80 if fixed else 0, fixed_capacity=fixed)
            store.register_slot_buffer("utility")
            store.load_dense(torch.randn(20, 8, generator=gen))
            store.utility.copy_(torch.arange(store.capacity).float() + 1)
            store.shrink_rows(torch.randint(0, 5, (20,), generator=gen))
            before, old = store.dense().clone(), store.row_counts().clone()
            new = torch.randint(0, 5, (20,), generator=gen)
            rows, slots = store.resize_rows(new, lambda n, cs: torch.full((n, cs), 7.0))
            after, cnt = store.dense(), store.row_counts()
            if not fixed:
                assert torch.equal(cnt, new) and store.capacity == store.live
            assert (cnt >= torch.minimum(old, new)).all() and (cnt <= torch.maximum(old, new)).all()
            for r in range(20):
                k = int(min(old[r], cnt[r])) * 2
                assert torch.equal(after[r, :k], before[r, :k])           # kept chunks unchanged
                assert (after[r, k:int(cnt[r]) * 2] == 7).all()           # fresh chunks initialised
            assert torch.equal(torch.sort(rows).values,
                               torch.repeat_interleave(torch.arange(20), cnt - torch.minimum(old, cnt)))
            assert (store.pool.detach()[slots] == 7).all() and (store.utility[slots] == 0).all()


def test_shuffle_false_trains_in_stored_order(tmp_path):
    seen: list[torch.Tensor] = []
    recipe = {"model": {"name": "test_fiited_regrowth:recording_model"},
              "data": {"name": "drift-ctr", "args": {"num_samples": 640, "num_ids": 50}},
              "train": {"epochs": 1, "batch_size": 64, "progress": False, "shuffle": False,
                        "optimizer": {"name": "sgd", "lr": 0.01}},
              "output": {"dir": str(tmp_path)}, "stages": []}
    RECORDED.clear()
    compresskit.run(compresskit.validate_recipe(recipe, require_model=True))
    seen = torch.cat(RECORDED[:10])
    train = load_drift_ctr(num_samples=640, num_ids=50).train.tensors[1]
    assert torch.equal(seen, train)


RECORDED: list[torch.Tensor] = []


class _Recording(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        if self.training:
            RECORDED.append(sparse.clone())
        return self.linear(dense).squeeze(-1)


def recording_model(**_: object) -> nn.Module:
    """A model that records the sparse ids of every training batch (for the shuffle test)."""
    return _Recording()


def test_a_table_pruned_to_nothing_can_regrow():
    """At a 1% budget a whole table can lose every chunk; its rows' candidates still compete (a regression: the
    empty pool was indexed)."""
    torch.manual_seed(0)
    bag = FiitedEmbeddingBag(16, 8, chunk_size=4, weight=torch.randn(16, 8))
    bag.track_utility(0.9)
    bag.track_candidates("chunk")
    bag.resize_rows(torch.zeros(16, dtype=torch.long))
    assert bag.store.capacity == 0
    bag(torch.arange(4).view(-1, 1)).sum().backward()
    rows, ext, grid = regrowth_grid(bag)
    assert torch.equal(rows, torch.arange(4)) and torch.equal(ext, torch.ones(4, dtype=torch.long))
    assert bool((grid[:, 0] > 0).all()) and bool(torch.isinf(grid[:, 1:]).all())
    grown = bag.resize_rows(torch.tensor([1] * 4 + [0] * 12))
    assert torch.equal(grown, torch.arange(4)) and bag.store.capacity == 4
