"""UCI Adult (census income) CSV loader; label: income > 50K.

Reads the common CSV with a header row (``age,workclass,fnlwgt,...,income``); the original headerless
``adult.data`` layout is accepted too. '?' is kept as its own category.
"""
from __future__ import annotations

import csv
import math

import torch

from . import DataBundle, bundle_from_tensors, register_dataset
from .tabular import encode_categorical, standardize

COLUMNS = ["age", "workclass", "fnlwgt", "education", "educational-num", "marital-status", "occupation",
           "relationship", "race", "gender", "capital-gain", "capital-loss", "hours-per-week", "native-country",
           "income"]
NUMERIC = ["age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week"]
LOG_SCALED = {"fnlwgt", "capital-gain", "capital-loss"}
CATEGORICAL = ["workclass", "education", "marital-status", "occupation", "relationship", "race", "gender",
               "native-country"]


@register_dataset("adult", needs_path=True, description="UCI Adult census CSV, label income>50K")
def load_adult(path: str, seed: int = 0) -> DataBundle:
    """Load the CSV; numeric columns standardised (money columns log1p first); a seeded 80/10/10 split."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError("empty file")
    header = rows[0] if rows[0][0] == "age" else COLUMNS
    body = rows[1:] if rows[0][0] == "age" else rows
    index = {name: header.index(name) for name in COLUMNS if name in header}
    missing = [c for c in COLUMNS if c not in index]
    if missing:
        raise ValueError(f"columns missing: {', '.join(missing)}")
    body = [r for r in body if len(r) == len(header)]
    dense = torch.tensor([[math.log1p(float(r[index[c]])) if c in LOG_SCALED else float(r[index[c]])
                           for c in NUMERIC] for r in body], dtype=torch.float32)
    encoded, cards = zip(*(encode_categorical([r[index[c]] for r in body]) for c in CATEGORICAL))
    labels = torch.tensor([1.0 if r[index["income"]].startswith(">50K") else 0.0 for r in body])
    info = {"num_dense": len(NUMERIC), "cardinalities": list(cards), "sparse_names": CATEGORICAL, "source": "adult"}
    return bundle_from_tensors((standardize(dense), torch.stack(encoded, dim=1), labels), "binary", info, seed)
