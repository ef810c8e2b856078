"""What the user-data loaders (``csv``, ``parquet``, ``libfm``) share: categorical fields that hold one value or
several (multi-hot, optionally weighted) encoded into id tensors, labels made binary, and a dataset given as one
file or as train / validation / test files.

Tensors a loader returns (the label last): ``dense`` float ``[N, D]`` (D may be 0), ``sparse`` int64 ``[N, F]``
when every row holds exactly one value per field, else ``[N, F, L]`` padded with -1 (a bag per row and field), and,
only when some value carries a weight other than 1, ``weights`` float of the same shape as ``sparse``, passed to
the model after ``sparse`` (``DLRM.forward(dense, sparse, weights)``; the weights of a bag's ids, as
``nn.EmbeddingBag``'s ``per_sample_weights``).
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import DataError, shorten
from . import DataBundle, bundle_from_indices, split_indices

SPLITS = ("train", "val", "test")
_SPLIT_WORDS = {"train": ("train", "training"), "val": ("val", "valid", "validation", "dev"), "test": ("test",)}
PAD = -1


@dataclass
class Field:
    """One categorical field over all rows read so far: each row's values (a bag: a list; one value for a
    single-valued field, none for a missing one) and, where given, each value's weight. ``single``: each row holds
    exactly one value, kept as the value itself (and its weight as a float), which encodes far faster."""

    name: str
    values: list = field(default_factory=list)
    weights: list | None = None
    single: bool = False

    def add(self, values: list[str], weights: list[float] | None = None) -> None:
        """Append one row's bag of values (and their weights; 1.0 each when None)."""
        if weights is not None and any(w != 1.0 for w in weights):
            if self.weights is None:
                self.weights = [[1.0] * len(v) for v in self.values]
            self.weights.append(weights)
        elif self.weights is not None:
            self.weights.append([1.0] * len(values))
        self.values.append(values)

    def bags(self) -> list[list[str]]:
        """Each row's values as a list."""
        return [[v] for v in self.values] if self.single else self.values

    def weighted(self) -> bool:
        """Whether some value's weight differs from 1."""
        if self.weights is None:
            return False
        return any(w != 1.0 for w in self.weights) if self.single else \
            any(w != 1.0 for ws in self.weights for w in ws)


def _vocabulary(values, min_count: int) -> dict[str, int]:
    """Ids from 1 in order of first appearance of the values seen at least ``min_count`` times ('' excluded)."""
    counts = Counter(values)
    vocab: dict[str, int] = {}
    for v in values:
        if v not in vocab and v != "" and counts[v] >= min_count:
            vocab[v] = len(vocab) + 1
    return vocab


def encode_fields(fields: Sequence[Field], min_count: int = 1) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                         list[int]]:
    """``(sparse, weights or None, cardinalities)`` of the fields' rows.

    Each field gets its own vocabulary in order of first appearance; a value seen fewer than ``min_count`` times
    (and the empty string) maps to the shared out-of-vocabulary id 0, so a field's cardinality counts it. ``sparse``
    is ``[N, F]`` when every row holds one value per field, else ``[N, F, L]`` padded with -1; ``weights`` (same
    shape) only when a weight differs from 1.
    """
    rows = len(fields[0].values) if fields else 0
    single = all(f.single or all(len(v) == 1 for v in f.values) for f in fields)
    width = 1 if single else max((len(v) for f in fields if not f.single for v in f.values), default=1)
    weighted = any(f.weighted() for f in fields)
    shape = (rows, len(fields)) if single else (rows, len(fields), max(width, 1))
    sparse = torch.full(shape, PAD, dtype=torch.int64)
    weights = torch.zeros(shape, dtype=torch.float32) if weighted else None
    cards = []
    for j, f in enumerate(fields):
        flat = f.values if f.single else [v for vs in f.values for v in vs]
        vocab = _vocabulary(flat, min_count)
        ids = torch.tensor([vocab.get(v, 0) for v in flat], dtype=torch.int64)
        if f.weights is None:
            w = torch.ones(len(flat))
        else:
            w = torch.tensor(f.weights if f.single else [x for ws in f.weights for x in ws], dtype=torch.float32)
        if single:
            sparse[:, j] = ids
            if weights is not None:
                weights[:, j] = w
        else:
            length = torch.ones(rows, dtype=torch.int64) if f.single else \
                torch.tensor([len(vs) for vs in f.values], dtype=torch.int64)
            slots = torch.arange(sparse.shape[2]).expand(rows, -1) < length[:, None]
            sparse[:, j][slots] = ids
            if weights is not None:
                weights[:, j][slots] = w
        cards.append(len(vocab) + 1)
    return sparse, weights, cards


def binary_labels(values: Sequence[tuple[str, int, str]], positive: str | None, positive_above: float | None,
                  column: str = "label", unit: str = "line") -> torch.Tensor:
    """Float 0/1 labels of ``(raw label, line, file)`` records.

    ``positive``: the label text that is the positive class; ``positive_above``: a numeric label above it is
    positive; neither: labels must be 0/1 or -1/+1 (positive > 0). Anything else raises :class:`DataError` naming
    the file and line."""
    out = []
    for raw, line, file in values:
        text = raw.strip()
        if positive is not None:
            out.append(1.0 if text == positive else 0.0)
            continue
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        if positive_above is not None:
            if number != number:
                raise DataError(file, line, f"{column} is {shorten(text)}; expected a number (data.args."
                                            f"positive_above is {positive_above:g})", unit)
            out.append(1.0 if number > positive_above else 0.0)
        elif number in (0.0, 1.0, -1.0):
            out.append(1.0 if number > 0 else 0.0)
        else:
            raise DataError(file, line, f"{column} is {shorten(text)}; expected 0/1 or -1/+1, or set "
                                        f"data.args.positive (the positive class's text) or data.args.positive_above "
                                        f"(a threshold for a numeric label)", unit)
    if positive is not None and values and not any(out):
        raise DataError(values[0][2], None, f"no {column} equals data.args.positive ({positive!r}); its first values "
                                            f"are {shorten(', '.join(sorted({v[0].strip() for v in values[:1000]})[:8]))}")
    return torch.tensor(out, dtype=torch.float32)


def split_files(path: str, kind: str, whole_folder: bool = False) -> list[tuple[str | None, str]]:
    """``(split or None, file)`` of each file a dataset at ``path`` is made of: ``path`` itself when it is a file
    (split None: the loader splits it), else, in a folder, its
    train / validation / test files (names holding ``train``, ``val``/``valid``/``validation``/``dev``, ``test``
    as words, e.g. ``frappe.train.libfm``; validation optional), its only file, or (``whole_folder``: a reader that
    takes a folder, as pyarrow's does, whose split entries may be folders too) the folder itself. Anything else
    raises :class:`DataError` saying what the folder holds."""
    if not os.path.isdir(path):
        return [(None, path)]
    names = sorted(n for n in os.listdir(path) if not n.startswith(".") and not n.startswith("_")
                   and (os.path.isfile(os.path.join(path, n)) or whole_folder))
    found: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name in names:
        words = set(re.split(r"[^a-z]+", name.lower()))
        splits = [split for split in SPLITS if words & set(_SPLIT_WORDS[split])]
        if len(splits) > 1:
            raise DataError(os.path.join(path, name), None, f"the name holds the words of {' and '.join(splits)}; "
                                                            f"name each split's {kind} file with one of them")
        for split in splits:
            found[split].append(name)
    doubled = {s: f for s, f in found.items() if len(f) > 1}
    if doubled:
        s, files = next(iter(doubled.items()))
        raise DataError(path, None, f"several {s} files ({', '.join(files)}); expected one {kind} file per split, "
                                    f"or point data.path at a single file")
    if found["train"] and found["test"]:
        return [(s, os.path.join(path, f[0])) for s, f in found.items() if f]
    if any(found.values()):
        held = ", ".join(f"{s}: {f[0]}" for s, f in found.items() if f)
        raise DataError(path, None, f"holds {held}, but given splits need a train and a test file (named with "
                                    f"those words); or point data.path at one file to split it 80/10/10")
    if len(names) == 1 and os.path.isfile(os.path.join(path, names[0])):
        return [(None, os.path.join(path, names[0]))]
    if whole_folder and names:
        return [(None, path)]
    held = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "") or "no files"
    raise DataError(path, None, f"holds {held}; expected one {kind} file, or train and test files (and optionally a "
                                f"validation file) named with those words, e.g. data.train.{kind}")


def bundle(tensors: tuple[torch.Tensor, ...], parts: list[str] | None, info: dict, seed: int, where: str,
           fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> DataBundle:
    """A binary-task DataBundle from full tensors (label last): the rows' given ``parts`` (one split name per row,
    from :func:`split_files`) or, when None, a seeded random split by ``fractions``. Too few rows for a train and
    a test part raises :class:`DataError` at ``where``."""
    if parts is None:
        tr, va, te = split_indices(len(tensors[-1]), fractions, seed)
    else:
        tagged = torch.tensor([SPLITS.index(p) for p in parts])
        tr, va, te = ((tagged == i).nonzero().flatten() for i in range(3))
    if not len(tr) or not len(te):
        raise DataError(where, None, f"{len(tensors[-1])} rows leave {len(tr)} for training and {len(te)} for "
                                     f"testing; expected enough rows for both (a seeded 80/10/10 split)")
    return bundle_from_indices(tensors, (tr, va, te), "binary", info)


def sparse_info(sparse: torch.Tensor, weights: torch.Tensor | None, names: list[str], cards: list[int]) -> dict:
    """What models read from a loader's sparse tensors: cardinalities, feature names, and whether rows hold bags
    (``multi_hot``) or weights."""
    return {"cardinalities": cards, "sparse_names": names, "multi_hot": sparse.dim() == 3,
            "weighted": weights is not None}
