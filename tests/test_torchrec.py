"""TorchRec in compresskit: FIITED converts an EmbeddingBagCollection / EmbeddingCollection exactly (outputs and
gradients, weighted KJTs, tables of different dims), pruned tables equal a dense reference with the pruned dims
zeroed, the ``torchrec`` collate builds the KJT, and the ``torchrec_dlrm`` recipe trains, prunes and resumes."""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import yaml
from torch import nn

torchrec = pytest.importorskip("torchrec", reason="TorchRec is not installed: pip install \"compresskit[torchrec]\" "
                                                    "&& pip install --no-deps torchrec==1.8.0")

from torchrec import (EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection,  # noqa: E402
                      EmbeddingConfig, KeyedJaggedTensor)

import compresskit  # noqa: E402
from compresskit.data.collate import torchrec_collate  # noqa: E402
from compresskit.plugins.fiited import FiitedConfig, fiited_modules  # noqa: E402
from compresskit.plugins.fiited.embedding import FiitedEmbedding, FiitedEmbeddingBag, convert_embeddings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "fiited_torchrec_dlrm_movielens.yaml")
KEYS = ["f0", "f1", "f2"]


def _ebc(weighted: bool) -> EmbeddingBagCollection:
    """Two tables of different dims, the second shared by two features."""
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=40, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=30, feature_names=["f1", "f2"])],
        is_weighted=weighted)


def _ec() -> EmbeddingCollection:
    return EmbeddingCollection(tables=[
        EmbeddingConfig(name="t0", embedding_dim=8, num_embeddings=40, feature_names=["f0"]),
        EmbeddingConfig(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["f1", "f2"])])


def _kjt(batch: int = 6, weighted: bool = False, seed: int = 1) -> KeyedJaggedTensor:
    """A jagged batch (0 to 4 ids a bag, empty bags included) of the three features."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (len(KEYS) * batch,), generator=gen)
    values = torch.randint(0, 30, (int(lengths.sum()),), generator=gen)
    weights = torch.rand(values.numel(), generator=gen).requires_grad_() if weighted else None
    return KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths, weights=weights)


class Head(nn.Module):
    """A collection followed by a dense layer: the 'dense part' whose gradients must not change."""

    def __init__(self, collection: nn.Module, width: int) -> None:
        super().__init__()
        self.collection, self.linear = collection, nn.Linear(width, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.linear(flat(self.collection(kjt)))


def flat(out) -> torch.Tensor:
    """A KeyedTensor's values, or an EmbeddingCollection's JaggedTensors' values side by side (rows: ids)."""
    if isinstance(out, dict):
        return torch.cat([out[k].values() for k in KEYS], dim=0)
    return out.values()


def _dense(kind: str) -> Head:
    """An unconverted head for ``ebc``, ``ebc_weighted`` or ``ec``."""
    torch.manual_seed(0)
    collection = _ec() if kind == "ec" else _ebc(kind == "ebc_weighted")
    return Head(collection, 8 if kind == "ec" else 8 + 16 + 16)


def _pair(kind: str):
    """(converted head, unconverted twin, input KJT)."""
    dense = _dense(kind)
    model = copy.deepcopy(dense)
    names = convert_embeddings(model, chunk_size=4)
    assert len(names) == 2
    return model, dense, _kjt(weighted=kind == "ebc_weighted")


def _tables(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}


@pytest.mark.parametrize("kind", ["ebc", "ebc_weighted", "ec"])
def test_converted_collection_matches_torchrec_outputs_and_gradients(kind):
    model, dense, kjt = _pair(kind)
    twins = dict(fiited_modules(model))
    expected_type = FiitedEmbedding if kind == "ec" else FiitedEmbeddingBag
    assert set(twins) == set(_tables(dense)) and all(type(m) is expected_type for m in twins.values())
    got, ref = flat(model.collection(kjt)), flat(dense.collection(kjt))
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6, rtol=0)
    if kind == "ec":     # the JaggedTensors keep the KJT's lengths
        out = model.collection(kjt)
        assert all(torch.equal(out[k].lengths(), kjt[k].lengths()) for k in KEYS)
    # backward: the dense layer, the per-sample weights and the tables get the same gradients
    kjt_ref = _kjt(weighted=kind == "ebc_weighted")
    model(kjt).square().sum().backward()
    dense(kjt_ref).square().sum().backward()
    for a, b in zip(model.linear.parameters(), dense.linear.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-6)
    if kind == "ebc_weighted":
        assert torch.allclose(kjt.weights().grad, kjt_ref.weights().grad, atol=1e-6, rtol=1e-6)
    for name, m in _tables(dense).items():   # unpruned, the pool is the table row by row
        pool_grad = twins[name].store.pool.grad.view(m.num_embeddings, m.embedding_dim)
        assert torch.allclose(pool_grad, m.weight.grad, atol=1e-6, rtol=1e-6)


def _masked_reference(model: nn.Module, dense: nn.Module) -> nn.Module:
    """``dense`` with each table's weights those of ``model``'s FIITED twin: its stored chunks, zeros elsewhere."""
    ref = copy.deepcopy(dense)
    twins = dict(fiited_modules(model))
    with torch.no_grad():
        for name, m in _tables(ref).items():
            twin = twins[name]
            kept = twin.store.row_counts() * twin.chunk_size
            mask = torch.arange(m.embedding_dim)[None, :] < kept[:, None]
            m.weight.copy_(m.weight * mask)
            assert int(mask.sum()) == twin.store.live * twin.chunk_size
    return ref


@pytest.mark.parametrize("kind", ["ebc", "ebc_weighted", "ec"])
def test_shrunk_tables_equal_a_dense_reference_with_the_pruned_dims_zeroed(kind):
    model, dense, kjt = _pair(kind)
    gen = torch.Generator().manual_seed(2)
    for _, m in fiited_modules(model):
        counts = torch.randint(0, m.num_chunks + 1, (m.num_embeddings,), generator=gen)
        m.store.shrink_rows(counts)
        assert torch.equal(m.store.row_counts(), counts) and m.store.capacity == int(counts.sum())
    ref = _masked_reference(model, dense)
    got, want = flat(model.collection(kjt)), flat(ref.collection(kjt))
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    kjt_ref = _kjt(weighted=kind == "ebc_weighted")
    model(kjt).square().sum().backward()
    ref(kjt_ref).square().sum().backward()
    for a, b in zip(model.linear.parameters(), ref.linear.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    if kind == "ebc_weighted":
        assert torch.allclose(kjt.weights().grad, kjt_ref.weights().grad, atol=1e-5, rtol=1e-5)
    twins = dict(fiited_modules(model))
    for name, m in _tables(ref).items():   # each stored chunk gets the reference's gradient of those dims
        twin = twins[name]
        slots, counts = twin.store.row_slots(torch.arange(m.num_embeddings))
        for row, (slot, count) in enumerate(zip(slots.tolist(), counts.tolist())):
            stored = twin.store.pool.grad[slot:slot + count].reshape(-1)
            assert torch.allclose(stored, m.weight.grad[row, :count * twin.chunk_size], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ebc_weighted", "ec"])
def test_plugin_prunes_a_collection_to_its_budget(kind):
    """prepare() finds the collection's tables; utilities from a few backward passes; prune_to keeps the budget and
    the pruned model equals the dense reference with the pruned dims zeroed."""
    dense = _dense(kind)
    model = copy.deepcopy(dense)          # prepare() converts it
    compression = compresskit.prepare(model, FiitedConfig(target_memory_ratio=0.25, chunk_size=4,
                                                          fused_optimizer="none"), total_steps=10)
    plugin = compression.plugins[0]
    assert [n for n, _ in plugin.modules] == sorted(_tables(dense))
    for seed in range(3):    # gradients only: the weights stay those of ``dense``
        model(_kjt(weighted=kind == "ebc_weighted", seed=seed)).sum().backward()
    dense_chunks = sum(m.num_embeddings * m.num_chunks for _, m in plugin.modules)
    plugin.prune_to(dense_chunks // 4)
    assert plugin.stored_chunks() == dense_chunks // 4
    assert any(bool((m.store.row_counts() < m.num_chunks).any()) for _, m in plugin.modules)
    ref = _masked_reference(model, dense)
    kjt = _kjt(weighted=kind == "ebc_weighted", seed=7)
    assert torch.allclose(flat(model.collection(kjt)), flat(ref.collection(kjt)), atol=1e-6, rtol=0)
    assert torch.allclose(model(kjt), ref(kjt), atol=1e-6, rtol=1e-6)


def test_torchrec_collate_builds_the_kjt():
    dense = torch.rand(4, 3, dtype=torch.float64)
    sparse = torch.tensor([[1, 5], [2, 6], [3, 7], [4, 8]])
    label = torch.tensor([0.0, 1.0, 1.0, 0.0])
    out = torchrec_collate((dense, sparse), label)
    assert set(out) == {"dense", "sparse", "labels"} and out["dense"].dtype == torch.float32
    kjt = out["sparse"]
    assert kjt.keys() == ["f0", "f1"] and kjt.stride() == 4
    assert torch.equal(kjt["f0"].values(), sparse[:, 0]) and torch.equal(kjt["f1"].values(), sparse[:, 1])
    assert torch.equal(kjt.lengths(), torch.ones(8, dtype=torch.int64)) and out["labels"] is label
    named = torchrec_collate((dense, sparse), label, info={"sparse_names": ["user", "item"]})
    assert named["sparse"].keys() == ["user", "item"]
    with pytest.raises(compresskit.ConfigError, match=r"^data\.collate: 'torchrec' takes batches"):
        torchrec_collate((sparse,), label)


def _tiny_recipe(out_dir: str | None = None, **train) -> dict:
    """The repository's TorchRec recipe, made tiny: synthetic clicks, dim 8, a few hundred steps."""
    with open(RECIPE, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    raw["model"]["args"] = {"embedding_dim": 8, "dense_arch_layer_sizes": [16, 8], "over_arch_layer_sizes": [16, 1]}
    raw["data"] = {"name": "synthetic-ctr", "args": {"num_samples": 5000, "cardinality_scale": 0.0005},
                   "collate": "torchrec"}
    raw["train"].update({"epochs": 2, "batch_size": 64, "progress": False, "threads": 1, "checkpoint_every": 20,
                         "optimizer": {"name": "adagrad", "lr": 0.05}, **train})
    raw["stages"][0].update({"target_memory_ratio": 0.25, "interval": 10, "start_step": 10, "end_step": 60})
    raw["logging"] = {"csv": False, "plots": False, "tensorboard": "never"}
    raw["output"] = {"dir": out_dir or "unused"}
    return raw


def _run(raw: dict, out_dir: str | None = None, resume: bool = False):
    return compresskit.run(compresskit.validate_recipe(raw, require_model=True), out_dir=out_dir, resume=resume,
                           raw=raw)


def test_torchrec_dlrm_recipe_trains_and_prunes_end_to_end():
    from torchrec.models.dlrm import DLRM

    result = _run(_tiny_recipe())
    stage = result.report["stages"][0]
    assert isinstance(result.model, DLRM)
    tables = dict(fiited_modules(result.model))
    assert len(tables) == 26 and all(n.startswith("sparse_arch.embedding_bag_collection.embedding_bags.t_f")
                                     for n in tables)
    assert stage["pruning_rounds"] >= 3 and stage["memory_ratio"] <= 0.25
    assert stage["payload_bytes"] == sum(m.store.pool.numel() * 4 for m in tables.values())
    test = result.report["training"]["test"]
    assert math.isfinite(test["auc"]) and 0.5 < test["auc"] <= 1 and math.isfinite(test["logloss"])


def test_torchrec_dlrm_resume_with_the_collate_matches_the_straight_run(tmp_path):
    """Stop after 70 steps (past every pruning round), resume to the end (126 steps): the same model and metrics as
    the run straight through (the pruning schedule is given in steps, so it does not depend on the run's length)."""
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    straight = _run(_tiny_recipe(full), full)
    assert straight.report["training"]["steps"] == 126
    _run(_tiny_recipe(cut, max_steps=70), cut)
    assert torch.load(os.path.join(cut, "checkpoint.pt"), weights_only=True)["step"] == 70
    resumed = _run(_tiny_recipe(cut), cut, resume=True)
    a = torch.load(os.path.join(full, "model.pt"), weights_only=True)
    b = torch.load(os.path.join(cut, "model.pt"), weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.report["training"]["test"] == resumed.report["training"]["test"]
    assert straight.report["stages"][0]["stored_chunks"] == resumed.report["stages"][0]["stored_chunks"]


# ------------------------------------------------------------------------------------------ distributed
def _sharded_collection(rank: int, world: int, convert: bool) -> tuple[list[str], float]:
    """On each rank: a sharded weighted collection (three tables, one read by two features) fed this rank's samples
    of a jagged batch, against the one-process collection on the whole batch: the KeyedTensor and every local
    table's gradient (each rank's loss is its share, so the reference loss is divided by the ranks)."""
    from compresskit.distributed.collective import Collective
    from compresskit.distributed.sharding import shard_tables

    torch.manual_seed(0)
    collection = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=40, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=30, feature_names=["f1", "f2"]),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=300, feature_names=["f3"])], is_weighted=True)
    model = Head(collection, 8 + 16 + 16 + 4)
    if convert:
        convert_embeddings(model, chunk_size=4)
    reference = copy.deepcopy(model)
    keys, batch = ["f0", "f1", "f2", "f3"], 7
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 5, (len(keys), batch), generator=gen)       # empty bags included
    values = [torch.randint(0, 30, (int(n.sum()),), generator=gen) for n in lengths]
    weights = [torch.rand(v.numel(), generator=gen) for v in values]
    target = torch.randn(batch, 44, generator=gen)

    def kjt(rows: list[int]) -> KeyedJaggedTensor:
        picked = [(v.split(n.tolist()), w.split(n.tolist())) for v, w, n in zip(values, weights, lengths)]
        return KeyedJaggedTensor(keys=keys, lengths=lengths[:, rows].reshape(-1),
                                 values=torch.cat([vs[b] for vs, _ in picked for b in rows]),
                                 weights=torch.cat([ws[b] for _, ws in picked for b in rows]))

    local = shard_tables(model, Collective(rank, world))
    rows = [0, 1, 2, 3] if rank == 0 else [4, 5, 6]                        # uneven shares
    got = model.collection(kjt(rows))
    (got.values() * target[rows]).sum().backward()
    expected = reference.collection(kjt(list(range(batch))))
    ((expected.values() * target).sum() / world).backward()
    assert got.keys() == expected.keys() and got.length_per_key() == expected.length_per_key()
    err = float((got.values() - expected.values()[rows]).abs().max())
    twins = dict(reference.named_modules())
    for name, table in model.named_modules():
        if name in local:
            for p, q in zip(table.parameters(), twins[name].parameters()):
                err = max(err, float((p.grad.to_dense() - q.grad.to_dense()).abs().max()))
    return local, err


@pytest.mark.parametrize("convert", [False, True], ids=["torchrec-bags", "fiited-bags"])
def test_a_sharded_collection_equals_the_one_process_collection(convert):
    """Jagged, weighted bags go to each table's owner as a KJT holds them (lengths, then ids and weights) and the
    pooled vectors come back: outputs and gradients equal the unsharded collection's, with TorchRec's own bags or
    FIITED's in their place."""
    from compresskit.distributed.local import run_local

    results = run_local(_sharded_collection, 2, (convert,), timeout=90)
    owned = [set(local) for local, _ in results]
    assert owned[0] | owned[1] == {"collection.embedding_bags.t0", "collection.embedding_bags.t1",
                                   "collection.embedding_bags.t2"} and not owned[0] & owned[1]
    assert max(err for _, err in results) < 1e-6


def test_torchrec_dlrm_with_fiited_on_two_ranks_equals_one_process(tmp_path):
    """The TorchRec DLRM with FIITED on multi-hot CSV data (the ``tags`` column) under 2 ranks: the model, the
    loss curve, the test metrics and the kept chunks of the one-process run, and the bytes each rank sent close
    to the communication model's (jagged bags: a length plus the ids a bag holds)."""
    from test_distributed import csv_recipe, two_ranks_against_one

    report2 = two_ranks_against_one(tmp_path, csv_recipe(
        {"name": "torchrec_dlrm", "args": {"embedding_dim": 8, "dense_arch_layer_sizes": [16, 8],
                                           "over_arch_layer_sizes": [16, 1]}}, collate="torchrec"))
    ranks = report2["distributed"]["ranks"]
    assert sorted(t for r in ranks for t in r["tables"]) == sorted(
        f"sparse_arch.embedding_bag_collection.embedding_bags.t_{k}" for k in ("user", "item", "tags", "hour", "device"))
