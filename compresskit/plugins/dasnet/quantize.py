"""``quantize: int8``: int8 dynamic quantization of a model's Linear layers, with torchao where it imports.

``quantize_int8`` runs ``torchao.quantization.quantize_`` with ``Int8DynamicActivationInt8WeightConfig`` (int8
weights, per output channel; activations quantized to int8 per token on every call): each target Linear stays an
``nn.Linear`` whose ``weight`` becomes a torchao tensor subclass (``Int8Tensor`` in torchao 0.18). Where torchao does
not import, it logs one warning and falls back to the deprecated ``torch.ao.quantization.quantize_dynamic``, which
swaps each target for a ``torch.ao.nn.quantized.dynamic.Linear``. The backend that ran is returned for the report.

Targets (``linear_targets``): the modules of type exactly ``nn.Linear``, except those owned by the sparse path's
``SparseLinear`` twin (``sparse_exec``). The twin runs its Linear on WTA's compact activation by slicing the float
weight per part (``index_select`` / ``transpose``), which torchao's ``Int8Tensor`` does not implement (the call
raises), and which a torch.ao swap would silently turn off (the twin then runs the swapped module densely). So a
Linear the sparse path runs stays float32 under both backends: its cost is already cut to the kept inputs. A Linear
subclass (e.g. ``MultiheadAttention.out_proj``, whose owner reads its weight directly) is not a target either.
"""
from __future__ import annotations

import logging
import warnings
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ...layout import tag
from ...optional import import_quietly
from .sparse_exec import SparseLinear

log = logging.getLogger(__name__)

TORCHAO = "torchao"
TORCH_AO = "torch.ao (torchao not installed)"
TORCH_AO_BROKEN = "torch.ao (torchao did not import)"


def linear_targets(model: nn.Module) -> list[str]:
    """Names of the Linear layers ``quantize_int8`` converts: type exactly ``nn.Linear``, not run by a
    ``SparseLinear`` twin (see the module docstring)."""
    owned = {id(m.layer) for m in model.modules() if isinstance(m, SparseLinear)}
    return sorted(name for name, m in model.named_modules() if type(m) is nn.Linear and id(m) not in owned)


def _import_torchao() -> tuple[ModuleType | None, str]:
    """(``torchao.quantization``, "") where torchao imports, else (None, why)."""
    return import_quietly("torchao.quantization")


def quantize_int8(model: nn.Module, targets: list[str]) -> tuple[nn.Module, str]:
    """Quantize the Linear layers named in ``targets`` (see ``linear_targets``) to int8 dynamic quantization, in
    place. Returns (the model, the backend that ran: ``"torchao"``, or ``"torch.ao (...)"`` after a logged
    warning where torchao does not import)."""
    wanted = set(targets)
    ao, why = _import_torchao()
    if ao is not None:
        ao.quantize_(model, ao.Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: fqn in wanted)
        for name in wanted:       # torchao sets a bound-method extra_repr per layer, which does not pickle
            model.get_submodule(name).__dict__.pop("extra_repr", None)
            tag(model.get_submodule(name), Int8Linear, {"backend": TORCHAO})
        return model, TORCHAO
    log.warning("quantize: int8: torchao %s; falling back to the deprecated torch.ao.quantization.quantize_dynamic",
                why)
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():        # torch.ao's deprecation warnings, one per layer
        warnings.simplefilter("ignore")
        model = quantize_dynamic(model, {name: default_dynamic_qconfig for name in wanted}, dtype=torch.qint8,
                                 inplace=True)
    backend = TORCH_AO if why == "not installed" else TORCH_AO_BROKEN
    for name in wanted:
        tag(model.get_submodule(name), Int8Linear, {"backend": backend})
    return model, backend


class Int8Linear:
    """Layout-record builder of a Linear that ``quantize: int8`` quantized in place (``compresskit.layout``)."""

    @classmethod
    def from_record(cls, model: nn.Module, name: str, args: dict[str, Any]) -> nn.Module:
        """Quantize the Linear at ``name`` of ``model`` as the run did; its int8 weights come from the state dict
        (which ``torch.load(weights_only=True)`` reads once torchao is imported: it allowlists its tensors).
        ValueError when the backend that quantized it is not the one this environment runs."""
        if type(model.get_submodule(name)) is not nn.Linear:
            raise ValueError(f"expected an nn.Linear to quantize, found {type(model.get_submodule(name)).__name__}")
        quantized, backend = quantize_int8(model, [name])
        if backend != args.get("backend"):
            raise ValueError(f"the run quantized it with {args.get('backend')}, this environment with {backend}: "
                             f"install the run's torchao to rebuild it")
        return quantized.get_submodule(name)
