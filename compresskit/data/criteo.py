"""Criteo display-advertising TSV loader (Kaggle ``train.txt`` / Terabyte day files).

Each line: ``label \t I1..I13 \t C1..C26`` with integer dense counts and hexadecimal categorical hashes; empty
fields are missing values.
"""
from __future__ import annotations

import os
from typing import Annotated

import torch

from ..errors import DataError, shorten
from ..schema import Range
from . import DataBundle, bundle_from_tensors, register_dataset
from .tabular import encode_categorical, parse_number, read_lines, split_fields

NUM_DENSE, NUM_SPARSE = 13, 26
FIELDS = 1 + NUM_DENSE + NUM_SPARSE    # label, I1..I13, C1..C26


@register_dataset("criteo", needs_path=True, description="Criteo Kaggle/Terabyte TSV (label, 13 ints, 26 hex)",
                  source="https://ailab.criteo.com/ressources/ (Kaggle Display Advertising train.txt, or a Terabyte day_N)")
def load_criteo(path: str, seed: int = 0, max_rows: Annotated[int, Range(1)] | None = None,
                min_count: Annotated[int, Range(1)] = 1) -> DataBundle:
    """Read up to ``max_rows`` rows; dense -> log(1 + max(x, 0)); categories seen < ``min_count`` times -> id 0.

    A row with the wrong field count, a label other than 0/1 or a non-numeric dense value raises
    :class:`DataError` naming the line (and the field, I1..I13).
    """
    if os.path.isdir(path):
        path = os.path.join(path, "train.txt")
    labels, dense_rows, cats = [], [], [[] for _ in range(NUM_SPARSE)]
    for lineno, line in read_lines(path, "Criteo rows (label, I1..I13, C1..C26), tab-separated", sep="\t"):
        if max_rows is not None and len(labels) >= max_rows:
            break
        parts = split_fields(line, "\t", FIELDS, path, lineno, "Criteo rows are tab-separated, missing values empty",
                             "label, I1..I13, C1..C26")
        if parts[0] not in ("0", "1"):
            raise DataError(path, lineno, f"label is {shorten(parts[0])}; expected 0 or 1")
        labels.append(float(parts[0]))
        dense_rows.append([max(parse_number(v, path, lineno, f"I{j}"), 0.0) if v else 0.0
                           for j, v in enumerate(parts[1:1 + NUM_DENSE], 1)])
        for j, v in enumerate(parts[1 + NUM_DENSE:]):
            cats[j].append(v)
    dense = torch.log1p(torch.tensor(dense_rows, dtype=torch.float32))
    columns, cards = zip(*(encode_categorical(c, min_count) for c in cats))
    sparse = torch.stack(columns, dim=1)
    info = {"num_dense": NUM_DENSE, "cardinalities": list(cards), "source": "criteo"}
    return bundle_from_tensors((dense, sparse, torch.tensor(labels)), "binary", info, seed)
