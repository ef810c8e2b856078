"""UCI Adult (census income) CSV loader; label: income > 50K.

Reads the common CSV with a header row (``age,workclass,fnlwgt,...,income``); the original headerless
``adult.data`` layout is accepted too. '?' is kept as its own category.
"""
from __future__ import annotations

import csv
import math

import torch

from ..errors import DataError, shorten
from . import DataBundle, bundle_from_tensors, register_dataset
from .tabular import encode_categorical, parse_number, read_lines, standardize

COLUMNS = ["age", "workclass", "fnlwgt", "education", "educational-num", "marital-status", "occupation",
           "relationship", "race", "gender", "capital-gain", "capital-loss", "hours-per-week", "native-country",
           "income"]
NUMERIC = ["age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week"]
LOG_SCALED = {"fnlwgt", "capital-gain", "capital-loss"}
CATEGORICAL = ["workclass", "education", "marital-status", "occupation", "relationship", "race", "gender",
               "native-country"]


def _records(path: str) -> list[tuple[int, list[str]]]:
    """(line number, stripped fields) of each CSV line; UCI's '|' comment lines (adult.test's banner) skipped."""
    rows = []
    for n, line in read_lines(path, "UCI Adult census rows, comma-separated"):
        row = next(csv.reader([line]))
        if not row[0].startswith("|"):
            rows.append((n, [c.strip() for c in row]))
    return rows


@register_dataset("adult", needs_path=True, description="UCI Adult census CSV, label income>50K",
                  source="https://archive.ics.uci.edu/dataset/2/adult (adult.data, or one CSV with a header)")
def load_adult(path: str, seed: int = 0) -> DataBundle:
    """Load the CSV; numeric columns standardised (money columns log1p first); a seeded 80/10/10 split.

    Every row is kept: a row with the wrong number of fields, a non-numeric value in a numeric column or an
    unknown income raises :class:`DataError` naming the line.
    """
    rows = _records(path)
    has_header = bool(rows) and rows[0][1][0] == "age"
    header = rows[0][1] if has_header else COLUMNS
    body = rows[1:] if has_header else rows
    if not body:
        raise DataError(path, None, "no data rows; expected UCI Adult census rows, comma-separated")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataError(path, rows[0][0], f"header lacks column(s) {', '.join(missing)}; expected "
                                          f"{', '.join(COLUMNS)}")
    index = {name: header.index(name) for name in COLUMNS}
    names = f"{header[0]}, {header[1]}, ..., {header[-1]}"
    dense, labels = [], []
    for n, r in body:
        if len(r) != len(header):
            raise DataError(path, n, f"expected {len(header)} comma-separated fields ({names}), got {len(r)} "
                                     f"({shorten(','.join(r))}); each UCI Adult row holds one value per column")
        nums = [parse_number(r[index[c]], path, n, c, lo=0 if c in LOG_SCALED else None) for c in NUMERIC]
        dense.append([math.log1p(v) if c in LOG_SCALED else v for c, v in zip(NUMERIC, nums)])
        income = r[index["income"]].rstrip(".")     # adult.test writes '>50K.'
        if income not in ("<=50K", ">50K"):
            raise DataError(path, n, f"income is {shorten(r[index['income']])}; expected <=50K or >50K")
        labels.append(1.0 if income == ">50K" else 0.0)
    values = torch.tensor(dense, dtype=torch.float32)
    encoded, cards = zip(*(encode_categorical([r[index[c]] for _, r in body]) for c in CATEGORICAL))
    info = {"num_dense": len(NUMERIC), "cardinalities": list(cards), "sparse_names": CATEGORICAL, "source": "adult"}
    return bundle_from_tensors((standardize(values), torch.stack(encoded, dim=1), torch.tensor(labels)), "binary",
                               info, seed)
