"""Data loaders read the upstream formats, the synthetic generator is Criteo-shaped and learnable, the model zoo
builds, metrics are right, and docs/recipes.md documents every recipe field."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from compresskit.data.adult import load_adult
from compresskit.data.criteo import load_criteo
from compresskit.data.images import load_digits
from compresskit.data.movielens import load_movielens
from compresskit.data.synthetic_ctr import KAGGLE_CARDINALITIES, SyntheticCTR, load_synthetic_ctr
from compresskit.errors import DataError
from compresskit.metrics import log_loss, roc_auc
from compresskit.models import available_models
from compresskit.resolve import resolve_model


def test_synthetic_ctr_is_criteo_shaped_seeded_and_skewed():
    a = load_synthetic_ctr(num_samples=20_000, cardinality_scale=0.01)
    b = load_synthetic_ctr(num_samples=20_000, cardinality_scale=0.01)
    dense, sparse, label = a.train.tensors
    assert dense.shape[1] == 13 and sparse.shape[1] == 26 and len(a.info["cardinalities"]) == 26
    assert torch.equal(sparse, b.train.tensors[1])                  # seeded
    assert (sparse < torch.tensor(a.info["cardinalities"])).all()
    counts = torch.bincount(sparse[:, 2]).sort(descending=True).values
    assert counts[:10].sum() > 0.1 * len(sparse)                     # Zipf: a few ids dominate
    assert 0.1 < float(label.mean()) < 0.6


def test_synthetic_ctr_full_kaggle_scale_streams_without_materialising():
    gen = SyntheticCTR(KAGGLE_CARDINALITIES, seed=3)
    dense, sparse, label = next(gen.stream(256, seed=0))
    assert sum(KAGGLE_CARDINALITIES) > 33_000_000
    assert (sparse.max(0).values < torch.tensor(KAGGLE_CARDINALITIES)).all() and sparse.dtype == torch.long


def test_planted_model_is_learnable():
    import compresskit

    recipe = {"model": {"name": "dlrm", "args": {"embedding_dim": 8}},
              "data": {"name": "synthetic-ctr", "args": {"num_samples": 30_000, "cardinality_scale": 0.0005}},
              "train": {"epochs": 1, "batch_size": 256, "progress": False}}
    rec = compresskit.validate_recipe(recipe, require_model=True)
    auc = compresskit.run(rec).report["training"]["test"]["auc"]
    assert auc > 0.7          # clicks follow the planted ids and dense features, so a DLRM learns them


def test_criteo_tsv_reader(tmp_path):
    lines = []
    gen = np.random.default_rng(0)
    for i in range(50):
        ints = [str(gen.integers(0, 100)) if gen.random() > 0.2 else "" for _ in range(13)]
        cats = [f"{gen.integers(0, 5):08x}" if gen.random() > 0.1 else "" for _ in range(26)]
        lines.append("\t".join([str(i % 2)] + ints + cats))
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    data = load_criteo(str(tmp_path), max_rows=40)
    total = len(data.train) + len(data.test) + (len(data.val) if data.val else 0)
    assert total == 40 and data.info["num_dense"] == 13 and len(data.info["cardinalities"]) == 26
    assert all(c <= 6 for c in data.info["cardinalities"])           # 5 values + the shared missing id
    bad = tmp_path / "bad.txt"
    bad.write_text("1\t2\t3\n")
    with pytest.raises(DataError, match="line 1: expected 40 tab-separated fields"):
        load_criteo(str(bad))


def test_movielens_from_upstream_files(movielens_path):
    data = load_movielens(movielens_path)
    assert len(data.train) + len(data.val) + len(data.test) == 100_000
    assert data.info["cardinalities"][:2] == [944, 1683]             # 943 users, 1682 items (+ missing id)
    assert 0.5 < float(data.train.tensors[2].mean()) < 0.6           # rating >= 4


def test_adult_csv(adult_path):
    data = load_adult(adult_path)
    assert len(data.train) + len(data.val) + len(data.test) == 48_842
    assert data.info["num_dense"] == 6 and len(data.info["cardinalities"]) == 8
    assert 0.2 < float(data.train.tensors[2].mean()) < 0.3


def test_digits_and_model_zoo():
    data = load_digits(image_size=32)
    x = data.train.tensors[0][:4]
    for name in available_models():
        if name in ("dlrm", "torchrec_dlrm"):   # recommendation models (tests of their own)
            continue
        in_channels = 1
        model = resolve_model(type("M", (), {"name": name, "args": {"in_channels": in_channels}, "checkpoint": None}),
                              data.info)
        assert model(x).shape == (4, 10)


def test_metrics_against_definitions():
    y = np.array([0, 0, 1, 1, 1, 0])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.4])
    pairs = [(p, n) for p in s[y == 1] for n in s[y == 0]]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(y, s) == pytest.approx(expected)
    assert log_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.2])) == pytest.approx(
        -(np.log(0.9) + np.log(0.8)) / 2)
    assert np.isnan(roc_auc(np.ones(3), np.arange(3.0)))


def test_log_loss_matches_scikit_learn():
    from sklearn.metrics import log_loss as sk_log_loss

    gen = torch.Generator().manual_seed(0)
    p = torch.rand(5000, generator=gen, dtype=torch.float64) * 0.998 + 0.001
    y = (torch.rand(5000, generator=gen) < p).double()
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y.numpy(), p.numpy()), rel=1e-12)


def test_recipe_docs_cover_every_field():
    from compresskit.recipe import (DataConfig, LoggingConfig, ModelConfig, OptimizerConfig, OutputConfig,
                                    TrainConfig)
    from compresskit.registry import available_plugins
    from compresskit.schema import fields_help

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "recipes.md"), encoding="utf-8").read()
    classes = [ModelConfig, DataConfig, TrainConfig, OptimizerConfig, OutputConfig, LoggingConfig]
    classes += [cls.Config for cls in available_plugins().values() if cls.__module__.startswith("compresskit.")]
    from compresskit.plugins.fiited.plugin import PrecisionConfig
    classes.append(PrecisionConfig)
    for cls in classes:
        for row in fields_help(cls):
            assert f"| `{row['name']}` | {row['type']} | `{row['default']}` |" in doc, (cls.__name__, row["name"])
