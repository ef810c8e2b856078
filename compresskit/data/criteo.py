"""Criteo display-advertising TSV loader (Kaggle ``train.txt`` / Terabyte day files).

Each line: ``label \t I1..I13 \t C1..C26`` with integer dense counts and hexadecimal categorical hashes; empty
fields are missing values.
"""
from __future__ import annotations

import os

import torch

from . import DataBundle, bundle_from_tensors, register_dataset
from .tabular import encode_categorical

NUM_DENSE, NUM_SPARSE = 13, 26


@register_dataset("criteo", needs_path=True, description="Criteo Kaggle/Terabyte TSV (label, 13 ints, 26 hex)")
def load_criteo(path: str, seed: int = 0, max_rows: int | None = None, min_count: int = 1) -> DataBundle:
    """Read up to ``max_rows`` lines; dense -> log(1 + max(x, 0)); categories seen < ``min_count`` times -> id 0."""
    if os.path.isdir(path):
        path = os.path.join(path, "train.txt")
    labels, dense_rows, cats = [], [], [[] for _ in range(NUM_SPARSE)]
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_rows is not None and lineno > max_rows:
                break
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 1 + NUM_DENSE + NUM_SPARSE:
                raise ValueError(f"line {lineno} has {len(parts)} tab-separated fields, expected "
                                 f"{1 + NUM_DENSE + NUM_SPARSE}")
            labels.append(float(parts[0]))
            dense_rows.append([max(float(v), 0.0) if v else 0.0 for v in parts[1:1 + NUM_DENSE]])
            for j, v in enumerate(parts[1 + NUM_DENSE:]):
                cats[j].append(v)
    if not labels:
        raise ValueError("no rows")
    dense = torch.log1p(torch.tensor(dense_rows, dtype=torch.float32))
    columns, cards = zip(*(encode_categorical(c, min_count) for c in cats))
    sparse = torch.stack(columns, dim=1)
    info = {"num_dense": NUM_DENSE, "cardinalities": list(cards), "source": "criteo"}
    return bundle_from_tensors((dense, sparse, torch.tensor(labels)), "binary", info, seed)
