"""Built-in collates (``data.collate``): functions ``collate(inputs, label[, info])`` that turn one batch of a
dataset's tensors into a model's inputs (see :func:`compresskit.data.batches.to_model_inputs`).

``torchrec``: ``(dense [B, D], categorical [B, F] or [B, F, L][, weights], label)`` -> ``{dense, sparse:
KeyedJaggedTensor, labels}`` for
TorchRec models (``torchrec.models.dlrm.DLRM``: ``model(dense, sparse)``). TorchRec is imported when first used.
"""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any, Callable

import torch

from ..errors import ConfigError, first_line
from ..models.tables import feature_major_bags
from ..optional import import_quietly

TORCHREC_INSTALL = 'pip install "compresskit[torchrec]" && pip install --no-deps torchrec==1.8.0'


def require_torchrec(path: str, load: bool = True) -> ModuleType | None:
    """The ``torchrec`` package (``load=False``: only check that it is installed), or a one-line ConfigError at
    ``path`` saying how to install it."""
    if importlib.util.find_spec("torchrec") is None:
        raise ConfigError(path, f"needs TorchRec, which is not installed: {TORCHREC_INSTALL} (torchrec's own "
                                f"metadata asks for the CUDA fbgemm-gpu, which does not load on CPU)")
    if not load:
        return None
    try:
        module, why = import_quietly("torchrec")
    except Exception as e:   # not only ImportError: e.g. an fbgemm-gpu library that does not load with this torch
        module, why = None, f"did not import: {first_line(e, 120)}"
    if module is None:
        raise ConfigError(path, f"TorchRec is installed but {why}; reinstall it with: {TORCHREC_INSTALL}")
    return module


def torchrec_collate(inputs: tuple[torch.Tensor, ...], label: torch.Tensor,
                     info: dict[str, Any] | None = None) -> dict[str, Any]:
    """``(dense, categorical[, weights])`` -> ``{"dense": float [B, D], "sparse": KeyedJaggedTensor, "labels":
    label}``.

    ``categorical`` is int ``[B, F]`` (one id per feature per sample: a KJT with every length 1) or ``[B, F, L]``
    (multi-hot bags padded with -1: lengths count the ids); ``weights`` (the shape of ``categorical``) become the
    KJT's weights. Feature names (the KJT's keys) are ``info["sparse_names"]`` when the dataset gives them, else
    ``f0 .. f{F-1}`` (as the ``torchrec_dlrm`` model names its tables' features)."""
    sparse = inputs[1] if len(inputs) in (2, 3) else None
    weights = inputs[2] if len(inputs) == 3 else None
    if not (torch.is_tensor(sparse) and sparse.dim() in (2, 3) and not sparse.is_floating_point()
            and (weights is None or (torch.is_tensor(weights) and weights.shape == sparse.shape))):
        held = ", ".join(f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}" if torch.is_tensor(t)
                         else type(t).__name__ for t in inputs) or "nothing"
        raise ConfigError("data.collate", f"'torchrec' takes batches of (dense float [B, D], categorical int "
                                          f"[B, F] or [B, F, L], optional weights of its shape, label); this "
                                          f"dataset's batches hold {held} before the label")
    torchrec = sys.modules.get("torchrec") or require_torchrec("data.collate")   # imported once, checked once
    batch, features = sparse.shape[:2]
    if sparse.dim() == 2:                      # one id a bag, every id kept (no padding in this form)
        values, lengths = sparse.t().reshape(-1), torch.ones(batch * features, dtype=torch.int64)
        kjt_weights = None if weights is None else weights.t().reshape(-1)
    else:
        values, lengths, kjt_weights = feature_major_bags(sparse, weights)
    return {"dense": inputs[0].float(),
            "sparse": torchrec.KeyedJaggedTensor(keys=feature_names(features, info), values=values.long(),
                                                 lengths=lengths.to(torch.int64),
                                                 weights=None if kjt_weights is None else kjt_weights.float(),
                                                 stride=batch),
            "labels": label}


def feature_names(count: int, info: dict[str, Any] | None = None) -> list[str]:
    """The sparse feature names of a dataset: ``info["sparse_names"]`` when it has ``count`` of them, else
    ``f0 .. f{count-1}``."""
    names = (info or {}).get("sparse_names")
    if isinstance(names, (list, tuple)) and len(names) == count and all(isinstance(n, str) for n in names):
        return list(names)
    return [f"f{i}" for i in range(count)]


COLLATES: dict[str, Callable[..., Any]] = {"torchrec": torchrec_collate}
