"""Winners-take-all (WTA) dropout: per sample, only the k strongest channels (conv maps) or neurons stay active.

Channels of a ``[B, C, H, W]`` map are ranked by their mean absolute activation; neurons of a ``[B, F]``
activation by absolute value. ``k = max(1, round((1 - sparsity) * C))``. No trainable parameters; gradients flow
through the kept units only (the mask is a constant of the forward pass), as in dropout.

With ``blocks = G`` the units are ranked in ``G`` contiguous blocks (block score = mean |activation| over the
block) and whole blocks win. This coarser structure is what a CPU can skip efficiently (see ``sparse_exec``);
``blocks=None`` is the paper's per-channel WTA.
"""
from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from torch import nn

ACTIVATIONS = ("ReLU", "ReLU6", "LeakyReLU", "GELU", "SiLU", "ELU", "Hardswish", "Tanh", "Sigmoid")


def keep_count(units: int, sparsity: float) -> int:
    """Units kept out of ``units`` at ``sparsity`` (at least one)."""
    return max(1, min(units, int(round((1.0 - sparsity) * units))))


def wta_mask(x: torch.Tensor, sparsity: float, blocks: int | None = None) -> torch.Tensor:
    """0/1 mask broadcastable to x keeping each sample's top-k channels (dim 1), or top-k channel blocks."""
    batch, units = x.shape[:2]
    groups = blocks if blocks and units % blocks == 0 else units
    k = keep_count(groups, sparsity)
    score = x.detach().abs().reshape(batch, groups, -1).mean(2)
    top = torch.topk(score, k, dim=1, sorted=False).indices
    mask = torch.zeros(batch, groups, dtype=x.dtype, device=x.device).scatter_(1, top, 1.0)
    mask = mask.repeat_interleave(units // groups, dim=1)
    return mask.view(batch, units, *([1] * (x.dim() - 2)))


class WTADropout(nn.Module):
    """Structured winners-take-all dropout (see module docstring); ``active_in`` picks train / eval / both."""

    def __init__(self, sparsity: float, active_in: Literal["both", "train", "eval"] = "both",
                 blocks: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        self.sparsity = sparsity
        self.active_in = active_in
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparsity == 0 or (self.active_in == "train" and not self.training) or \
                (self.active_in == "eval" and self.training):
            return x
        return x * wta_mask(x, self.sparsity, self.blocks)

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity}, active_in={self.active_in!r}, blocks={self.blocks}"


class WithWTA(nn.Sequential):
    """An activation followed by its WTA dropout (keeps the activation's name in the model)."""


def activation_names(model: nn.Module, kinds: tuple[str, ...] = ACTIVATIONS) -> list[str]:
    """Names of activation modules of the given class names (not already followed by WTA)."""
    return [name for name, m in model.named_modules()
            if type(m).__name__ in kinds and name and not isinstance(m, WithWTA)]


def insert_wta(model: nn.Module, sparsity: float, overrides: dict[str, float] | None = None,
               layers: list[str] | None = None, after: tuple[str, ...] = ("ReLU",),
               active_in: Literal["both", "train", "eval"] = "both", blocks: int | None = None) -> dict[str, float]:
    """Put a WTADropout after each activation module (class in ``after``; name matching ``layers`` if given).

    ``overrides`` maps module-name glob patterns to sparsities (last match wins). Returns {module name: sparsity}.
    Raises ValueError naming the pattern when ``layers`` or ``overrides`` match no activation.
    """
    candidates = activation_names(model, after)
    for pattern in list(layers or []) + list(overrides or {}):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in candidates):
            shown = ", ".join(candidates[:12]) + (" ..." if len(candidates) > 12 else "")
            raise ValueError(f"'{pattern}' matches no {'/'.join(after)} module; available: {shown or 'none'}")
    chosen = [n for n in candidates if not layers or any(fnmatch.fnmatchcase(n, p) for p in layers)]
    placed = {}
    for name in chosen:
        s = sparsity
        for pattern, value in (overrides or {}).items():
            if fnmatch.fnmatchcase(name, pattern):
                s = value
        model.set_submodule(name, WithWTA(model.get_submodule(name), WTADropout(s, active_in, blocks)))
        placed[name] = s
    return placed
