"""FIITED plugin: in-training pruning reaches the target with memory measured from the store, rows stay prefixes,
baselines hit their budgets on the same code path, and recipe errors are clear."""
from __future__ import annotations

import pytest
import torch

import compresskit
from compresskit.plugins.fiited import fiited_modules
from compresskit.plugins.fiited.plugin import kept_ratio


def _recipe(method: str, ratio: float = 0.2, **stage) -> dict:
    return {
        "model": {"name": "dlrm", "args": {"embedding_dim": 16, "bottom_mlp": [16], "top_mlp": [16]}},
        "data": {"name": "synthetic-ctr", "args": {"num_samples": 6000, "cardinality_scale": 0.0005}},
        "train": {"epochs": 2, "batch_size": 128, "progress": False, "optimizer": {"name": "adagrad", "lr": 0.05}},
        "stages": [{"plugin": "fiited", "method": method, "target_memory_ratio": ratio, "chunk_size": 4,
                    "interval": 10, **stage}],
    }


def _run(recipe: dict):
    rec, stages = compresskit.validate_recipe(recipe, require_model=True)
    return compresskit.run(rec, stages)


def test_in_training_pruning_reaches_target_and_frees_memory():
    result = _run(_recipe("fiited", 0.2))
    stage = result.report["stages"][0]
    plugin = result.plugins[0]
    assert stage["stored_chunks"] <= int(0.2 * stage["dense_chunks"])
    assert stage["stored_chunks"] >= int(0.2 * stage["dense_chunks"]) - 1
    # the report's bytes are the store tensors' bytes, and the pools really shrank
    pool_bytes = sum(m.store.pool.numel() * 4 for _, m in fiited_modules(result.model))
    assert stage["payload_bytes"] == pool_bytes
    assert stage["payload_ratio"] == pytest.approx(0.2, abs=0.01)
    assert all(m.store.capacity == m.store.live for _, m in fiited_modules(result.model))
    # gradual: several rounds, non-increasing stored chunks
    kept = [r["kept_chunks"] for r in plugin.rounds]
    assert len(kept) >= 3 and kept == sorted(kept, reverse=True)
    assert 0.5 < result.report["training"]["test"]["auc"] <= 1


def test_rows_always_keep_a_prefix_of_chunks():
    result = _run(_recipe("fiited", 0.3))
    for _, m in fiited_modules(result.model):
        rows, chunks, _ = m.store.entries()
        counts = torch.bincount(rows, minlength=m.num_embeddings)
        # a row with k chunks holds exactly chunks 0..k-1
        expected = torch.cat([torch.arange(int(k)) for k in counts])
        assert torch.equal(chunks, expected)


@pytest.mark.parametrize("method", ["adaembed", "mixed_dim", "uniform"])
def test_baselines_meet_the_same_budget(method):
    result = _run(_recipe(method, 0.25))
    stage = result.report["stages"][0]
    assert stage["stored_chunks"] <= int(0.25 * stage["dense_chunks"])
    models = list(fiited_modules(result.model))
    if method == "uniform":
        assert all(bool((m.row_chunk_counts() == 1).all()) for _, m in models)
    if method == "adaembed":   # whole rows: every row keeps all chunks or none
        for _, m in models:
            counts = m.row_chunk_counts()
            assert bool(((counts == 0) | (counts == m.num_chunks)).all())


def test_uniform_below_one_chunk_is_a_clear_error():
    with pytest.raises(compresskit.ConfigError, match="below one chunk"):
        _run(_recipe("uniform", 0.1))


def test_cubic_schedule():
    assert kept_ratio(0, 10, 110, 0.1, "cubic") == 1.0
    assert kept_ratio(110, 10, 110, 0.1, "cubic") == 0.1
    mid = kept_ratio(60, 10, 110, 0.1, "cubic")
    assert 0.1 < mid < kept_ratio(60, 10, 110, 0.1, "linear")


def test_fiited_stage_errors_name_the_field():
    bad = _recipe("fiited")
    bad["stages"][0]["target_memory_ratio"] = 1.5
    with pytest.raises(compresskit.ConfigError, match=r"stages\[0\].target_memory_ratio: got 1.5"):
        compresskit.validate_recipe(bad)
    bad = _recipe("fiited")
    bad["stages"][0]["methd"] = "x"
    with pytest.raises(compresskit.ConfigError, match="did you mean 'method'"):
        compresskit.validate_recipe(bad)


def test_python_api_on_an_existing_model():
    from compresskit.data.synthetic_ctr import load_synthetic_ctr
    from compresskit.models.dlrm import DLRM

    data = load_synthetic_ctr(num_samples=3000, cardinality_scale=0.0005)
    model = DLRM(data.info["num_dense"], data.info["cardinalities"], embedding_dim=8)
    result = compresskit.apply(model, {"train": {"epochs": 1, "batch_size": 100, "progress": False},
                                       "stages": [{"plugin": "fiited", "target_memory_ratio": 0.5,
                                                   "chunk_size": 2, "interval": 5}]}, data=data)
    assert result.report["stages"][0]["payload_ratio"] == pytest.approx(0.5, abs=0.01)
    assert result.model is model
