"""Datasets: one registry of loaders, each returning a :class:`DataBundle` of train/val/test tensors."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch.utils.data import TensorDataset

from ..errors import ConfigError, first_line, shorten
from ..registry import Registry
from ..schema import check_call_args


@dataclass
class DataBundle:
    """Train/val/test splits as TensorDatasets whose last tensor is the label, plus what models need to know.

    ``collate`` (optional): ``collate(inputs, label)`` maps one batch's tensors (this rank's rows of it) to what the
    model takes: ``(inputs tuple, label)``, a mapping with ``dense``, ``sparse`` (e.g. a TorchRec
    KeyedJaggedTensor) and ``labels``, or a TorchRec ``Batch``; see :func:`compresskit.data.batches.to_model_inputs`."""

    train: TensorDataset
    val: TensorDataset | None
    test: TensorDataset
    task: Literal["binary", "multiclass"]
    info: dict[str, Any] = field(default_factory=dict)
    collate: Callable[[tuple[torch.Tensor, ...], torch.Tensor], Any] | None = None


@dataclass
class DatasetEntry:
    """A registered loader and whether it reads files from ``data.path``."""

    loader: Callable[..., DataBundle]
    needs_path: bool
    description: str
    source: str = ""     # where a user gets the files (a dataset that reads data.path)


def _import_builtins() -> None:
    from . import (adult, columns, criteo, drift_ctr, images, libfm, movielens, planted_ctr,  # noqa: F401
                   synthetic_ctr)  # (registration)


DATASETS: Registry[DatasetEntry] = Registry("dataset", "data.name", _import_builtins)


def register_dataset(name: str, *, needs_path: bool, description: str, source: str = ""):
    """Decorator: register ``loader(path, seed, **args) -> DataBundle`` under ``name``; ``source`` says where the
    files of a dataset that reads ``data.path`` come from (named when the path is missing)."""

    def deco(fn: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        DATASETS.add(name, DatasetEntry(fn, needs_path, description, source))
        return fn

    return deco


def split_indices(n: int, fractions: tuple[float, float, float], seed: int) -> tuple[torch.Tensor, ...]:
    """A seeded random permutation of ``range(n)`` cut into train/val/test parts by ``fractions``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]


def bundle_from_tensors(tensors: tuple[torch.Tensor, ...], task: str, info: dict[str, Any], seed: int,
                        fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> DataBundle:
    """Split full tensors (label last) into a DataBundle with a seeded random split."""
    return bundle_from_indices(tensors, split_indices(len(tensors[-1]), fractions, seed), task, info)


def bundle_from_indices(tensors: tuple[torch.Tensor, ...], splits: tuple[torch.Tensor, ...], task: str,
                        info: dict[str, Any]) -> DataBundle:
    """A DataBundle of the rows ``splits`` (train, validation, test indices; an empty validation part: None)."""
    tr, va, te = splits
    take = lambda idx: TensorDataset(*(t[idx] for t in tensors))  # noqa: E731
    return DataBundle(take(tr), take(va) if len(va) else None, take(te), task, info)


def check_data_config(cfg: Any) -> dict[str, Any]:
    """Validate a DataConfig: known dataset, path present and existing where needed, loader arguments known, typed
    and within the bounds the loader declares (``Annotated[int, Range(...)]``). Returns the checked arguments."""
    entry = DATASETS.get(cfg.name)
    if entry.needs_path:
        get = f"; get it from {entry.source}" if entry.source else ""
        if not cfg.path:
            raise ConfigError("data.path", f"required for dataset '{cfg.name}' (folder or file in upstream "
                                           f"format{get})")
        if not os.path.exists(cfg.path):
            where = "" if os.path.isabs(cfg.path) else f" (relative to {shorten(os.getcwd(), 200)})"
            raise ConfigError("data.path", f"file not found: {shorten(cfg.path, 200)}{where}{get}; point at your copy "
                                           f"with --set data.path=... or the recipe's environment variable")
    return check_call_args(entry.loader, cfg.args, "data.args", f"dataset '{cfg.name}'", skip=("path", "seed"))


def load_dataset(cfg: Any, seed: int = 0) -> DataBundle:
    """Load the dataset a DataConfig names (validated first). A bad record raises :class:`DataError` naming its file
    and line."""
    args = check_data_config(cfg)
    entry = DATASETS.get(cfg.name)
    try:
        return entry.loader(path=cfg.path, seed=seed, **args)
    except (ValueError, TypeError) as e:
        raise ConfigError("data", f"cannot load '{cfg.name}' from {shorten(cfg.path)}: {first_line(e)}") from None
