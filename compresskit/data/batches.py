"""From a dataset's tensors to a model's inputs: batches of a split, a DataBundle's collate applied, the sample batch.

Every place a batch reaches a model (training, evaluation, plugins that count rows, the sample batch that plugins
trace with and export exports with) goes through :func:`to_model_inputs`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch.utils.data import TensorDataset

from ..errors import ConfigError

SAMPLE_ROWS = 8  # rows of the first batch kept as the sample input for tracing and tuning


def batches(dataset: TensorDataset, batch_size: int, order: torch.Tensor | None = None):
    """Yield (inputs tuple, label) batches of a TensorDataset whose last tensor is the label."""
    tensors = dataset.tensors
    n = len(order) if order is not None else len(tensors[-1])
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
        parts = [t[idx] for t in tensors]
        yield tuple(parts[:-1]), parts[-1]


COLLATE_KEYS = ("dense", "sparse", "labels")   # a collate's mapping: model(dense, sparse), label ``labels``


def to_model_inputs(collate: Callable[[tuple, torch.Tensor], Any] | None, inputs: tuple, label: torch.Tensor
                    ) -> tuple[tuple, torch.Tensor]:
    """``(model inputs, label)`` of one batch: the dataset's tensors as they are without ``collate`` (a DataBundle's
    ``collate``), else what ``collate(inputs, label)`` returns, normalised: an ``(inputs, label)`` pair as is, a
    mapping with ``dense`` / ``sparse`` / ``labels`` as ``model(dense, sparse)`` and label ``labels`` (either input
    may be left out), a TorchRec ``Batch`` as ``model(dense_features, sparse_features)`` and ``labels``. Every
    place a batch reaches a model goes through here (after :func:`local_rows` in a distributed run)."""
    if collate is None:
        return tuple(inputs), label
    out = collate(inputs, label)
    if isinstance(out, Mapping):
        unknown = [str(k) for k in out if k not in COLLATE_KEYS]
        if unknown or "labels" not in out or not ("dense" in out or "sparse" in out):
            raise ConfigError("data.collate", f"returned a mapping with keys {', '.join(map(str, out)) or 'none'}; "
                                              f"expected 'labels' and 'dense' and/or 'sparse', nothing else")
        return tuple(out[k] for k in ("dense", "sparse") if k in out), out["labels"]
    if all(hasattr(out, a) for a in ("dense_features", "sparse_features", "labels")):   # torchrec's Batch
        return (out.dense_features, out.sparse_features), out.labels
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], (tuple, list)):
        return tuple(out[0]), out[1]
    raise ConfigError("data.collate", f"returned a {type(out).__name__}; expected (inputs tuple, label), a mapping "
                                      f"with 'dense'/'sparse' and 'labels', or a torchrec Batch")


def sample_inputs(data: Any) -> tuple:
    """Model inputs of the first ``SAMPLE_ROWS`` test rows of a DataBundle, through the data's collate: the sample
    batch plugins trace and tune with, and the one ``compresskit export --format torch.export`` exports with."""
    return to_model_inputs(data.collate, *next(batches(data.test, SAMPLE_ROWS)))[0]
