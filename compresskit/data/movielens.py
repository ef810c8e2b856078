"""MovieLens-100K loader from the original GroupLens files (``u.data``, ``u.user``, ``u.item``).

Label: rating >= 4. Sparse features: user, item, gender, occupation, zip-code prefix, age bucket.
Dense features: standardised age, release year and the 19 genre flags.
"""
from __future__ import annotations

import os

import torch

from . import DataBundle, bundle_from_tensors, register_dataset
from .tabular import encode_categorical, standardize


def _read(path: str, sep: str, encoding: str = "latin-1") -> list[list[str]]:
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\n").split(sep) for line in f if line.strip()]


@register_dataset("movielens-100k", needs_path=True, description="MovieLens-100K (u.data/u.user/u.item), rating>=4")
def load_movielens(path: str, seed: int = 0, min_rating_positive: int = 4) -> DataBundle:
    """Load ratings joined with user and item side information; a seeded 80/10/10 split."""
    for name in ("u.data", "u.user", "u.item"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"missing {name} in {path}")
    users = {r[0]: r for r in _read(os.path.join(path, "u.user"), "|")}
    items = {r[0]: r for r in _read(os.path.join(path, "u.item"), "|")}
    ratings = _read(os.path.join(path, "u.data"), "\t")
    cols: dict[str, list[str]] = {k: [] for k in ("user", "item", "gender", "occupation", "zip", "age_bucket")}
    dense, labels = [], []
    for user_id, item_id, rating, _ in ratings:
        u, it = users[user_id], items[item_id]
        age = int(u[1])
        cols["user"].append(user_id)
        cols["item"].append(item_id)
        cols["gender"].append(u[2])
        cols["occupation"].append(u[3])
        cols["zip"].append(u[4][:3])
        cols["age_bucket"].append(str(min(age // 10, 6)))
        year = int(it[2][-4:]) if it[2] else 1995
        dense.append([float(age), float(year)] + [float(g) for g in it[5:24]])
        labels.append(1.0 if int(rating) >= min_rating_positive else 0.0)
    encoded, cards = zip(*(encode_categorical(v) for v in cols.values()))
    sparse = torch.stack(encoded, dim=1)
    dense_t = torch.tensor(dense, dtype=torch.float32)
    dense_t[:, :2] = standardize(dense_t[:, :2])
    info = {"num_dense": dense_t.shape[1], "cardinalities": list(cards), "sparse_names": list(cols),
            "source": "movielens-100k"}
    return bundle_from_tensors((dense_t, sparse, torch.tensor(labels)), "binary", info, seed)
