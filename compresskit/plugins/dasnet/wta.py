"""Winners-take-all (WTA) dropout: per sample, only the k strongest channels (conv maps) or neurons stay active.

Channels of a ``[B, C, H, W]`` map are ranked by their summed absolute activation (the same order as the mean);
neurons of a ``[B, F]`` activation by absolute value. ``k = max(1, round((1 - sparsity) * C))``. No trainable
parameters; gradients flow through the kept units only (the mask is a constant of the forward pass), as in dropout.

With ``blocks = G`` the units are ranked in ``G`` contiguous blocks (block score = summed |activation|) and whole
blocks win. This coarser structure is what a CPU can skip efficiently (see ``sparse_exec``); ``blocks=None`` is the
paper's per-channel WTA. In inference the winners can be returned compactly (``compact_wta``, ``ChannelSparse``).
"""
from __future__ import annotations

import fnmatch
import functools
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from . import native
from .compact import ChannelSparse, Part, channels_last

NONNEGATIVE = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)    # outputs >= 0: WTA ranks without abs
ACTIVATIONS = ("ReLU", "ReLU6", "LeakyReLU", "GELU", "SiLU", "ELU", "Hardswish", "Tanh", "Sigmoid")


def keep_count(units: int, sparsity: float) -> int:
    """Units kept out of ``units`` at ``sparsity`` (at least one)."""
    return max(1, min(units, int(round((1.0 - sparsity) * units))))


def unit_groups(units: int, blocks: int | None) -> int:
    """Groups WTA ranks ``units`` in: ``blocks`` contiguous blocks where they divide the units, else one a unit."""
    return blocks if blocks and units % blocks == 0 else units


def _winners(x: torch.Tensor, sparsity: float, blocks: int | None, nonnegative: bool) -> tuple[int, torch.Tensor]:
    """(unit groups, indices [B, k] of each sample's winning groups). The one ranking every path uses (the native
    kernel's too): float32 sums of |x| over each group (the same order as means; ``nonnegative`` inputs skip the
    abs), highest first, a tie won by the lower group (NaN above everything, as ``torch.sort`` puts it). Sums whose
    float32 values tie exactly (all-zero or saturated channels, equal neurons) rank alike on every path; the native
    kernel sums more precisely, so scores within float rounding of each other may rank apart."""
    batch, units = x.shape[:2]
    groups = unit_groups(units, blocks)
    magnitude = x.detach() if nonnegative else x.detach().abs()
    if x.dim() > 2:        # per channel first: a reduction that reads any memory layout in place
        magnitude = magnitude.sum(tuple(range(2, x.dim())))
    score = magnitude.reshape(batch, groups, units // groups).sum(2)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    return groups, order[:, :keep_count(groups, sparsity)]


def masked_wta(x: torch.Tensor, sparsity: float, blocks: int | None = None, nonnegative: bool = False
               ) -> torch.Tensor:
    """``x * wta_mask(x, ...)``: in inference (no autograd, not traced) on a float32 CPU tensor, contiguous or
    channels-last, one pass of the native kernel (``native/wta.cpp``: about 5 us at batch 1 against 20 us for the
    torch ops); else the torch ops."""
    kernels = native.kernels_for(x)
    if kernels is not None:
        groups = unit_groups(x.shape[1], blocks)
        return kernels.wta_masked(x, keep_count(groups, sparsity), groups, nonnegative)
    return x * wta_mask(x, sparsity, blocks, nonnegative)


def wta_mask(x: torch.Tensor, sparsity: float, blocks: int | None = None, nonnegative: bool = False) -> torch.Tensor:
    """0/1 mask broadcastable to x keeping each sample's top-k channels (dim 1), or top-k channel blocks."""
    batch, units = x.shape[:2]
    groups, top = _winners(x, sparsity, blocks, nonnegative)
    mask = torch.zeros(batch, groups, dtype=x.dtype, device=x.device).scatter_(1, top, 1.0)
    mask = mask.repeat_interleave(units // groups, dim=1)
    return mask.view(batch, units, *([1] * (x.dim() - 2)))


def compact_wta(x: torch.Tensor, sparsity: float, blocks: int | None = None,
                nonnegative: bool = False) -> ChannelSparse:
    """WTA of ``x`` in compact form: only the winning channels, samples grouped by their winning set.

    Equals ``x * wta_mask(x, sparsity, blocks, nonnegative)`` once densified (same ranking). Per-channel WTA
    selects and copies the winners in one native pass where it can (``native/wta.cpp``'s ``wta_compact``).
    """
    batch, units = x.shape[:2]
    groups = unit_groups(units, blocks)
    if groups == units:                                     # per channel: one part, each sample its own set
        return ChannelSparse(batch, units, [Part(None, *_channel_winners(x, sparsity, blocks, nonnegative))])
    size = units // groups
    samples_of: dict[tuple[int, ...], list[int]] = {}
    for b, pattern in enumerate(_group_winners(x, sparsity, blocks, nonnegative)):
        samples_of.setdefault(tuple(pattern), []).append(b)
    parts = []
    for pattern, samples in samples_of.items():
        rows = None if len(samples) == batch else torch.tensor(samples, device=x.device)
        if pattern[-1] - pattern[0] == len(pattern) - 1:             # adjacent blocks: one channel range
            span = (pattern[0] * size, (pattern[-1] + 1) * size)
            channels = _channel_range(span, x.device)
            view = x[:, span[0]:span[1]]
            if rows is None:
                data = view
            elif channels_last(x):        # gather pixel-major: there a pixel's kept channels are adjacent
                data = x.permute(0, 2, 3, 1)[..., span[0]:span[1]].index_select(0, rows).permute(0, 3, 1, 2)
            else:
                data = view.index_select(0, rows)
        else:
            span = None
            channels = (torch.tensor(pattern, device=x.device)[:, None] * size
                        + torch.arange(size, device=x.device)).flatten()
            data = x.index_select(1, channels) if rows is None else x[rows[:, None], channels]
        parts.append(Part(rows, channels, data, pattern, span))
    return ChannelSparse(batch, units, parts)


def _group_winners(x: torch.Tensor, sparsity: float, blocks: int, nonnegative: bool) -> list[list[int]]:
    """Each sample's winning groups, ascending (one native pass where it runs: ``wta_winners``)."""
    kernels = native.kernels_for(x)
    if kernels is not None:
        groups = unit_groups(x.shape[1], blocks)
        return kernels.wta_winners(x, keep_count(groups, sparsity), groups, nonnegative).tolist()
    return _winners(x, sparsity, blocks, nonnegative)[1].sort(1).values.tolist()


def _channel_winners(x: torch.Tensor, sparsity: float, blocks: int | None, nonnegative: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel WTA's winners: each sample's winning channels, ascending ``[B, k]``, and their data
    ``[B, k, ...]``."""
    kernels = native.kernels_for(x)
    if kernels is not None:
        top, data = kernels.wta_compact(x, keep_count(x.shape[1], sparsity), nonnegative)
        return top, data
    top = _winners(x, sparsity, blocks, nonnegative)[1].sort(1).values
    return top, x[torch.arange(x.shape[0], device=x.device)[:, None], top]


@functools.lru_cache(maxsize=256)
def _channel_range(span: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``arange(lo, hi)``, made once per span (read only)."""
    return torch.arange(*span, device=device)


class WTADropout(nn.Module):
    """Structured winners-take-all dropout (see module docstring); ``active_in`` picks train / eval / both.

    In inference (eval mode, no autograd) it returns the compact ``ChannelSparse`` form for the batch sizes in
    ``compact_batches`` (or always, with ``compact_always``); ``sparse_exec.to_sparse_execution`` sets these.
    """

    def __init__(self, sparsity: float, active_in: Literal["both", "train", "eval"] = "both",
                 blocks: int | None = None, nonnegative_input: bool = False) -> None:
        super().__init__()
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        self.sparsity = sparsity
        self.active_in = active_in
        self.blocks = blocks
        self.nonnegative_input = nonnegative_input
        self.compact_batches: set[int] = set()
        self.compact_always = False

    def forward(self, x: torch.Tensor) -> torch.Tensor | ChannelSparse:
        if self.sparsity == 0 or (self.active_in == "train" and not self.training) or \
                (self.active_in == "eval" and self.training):
            return x
        if not self.training and not torch.is_grad_enabled() and \
                (self.compact_always or x.shape[0] in self.compact_batches):
            return compact_wta(x, self.sparsity, self.blocks, self.nonnegative_input)
        return masked_wta(x, self.sparsity, self.blocks, self.nonnegative_input)

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity}, active_in={self.active_in!r}, blocks={self.blocks}"

    def to_dense(self) -> "WTADropout":
        """The same WTA without the compact output: the masked dense form (what ``torch.export`` traces)."""
        dense = WTADropout(self.sparsity, self.active_in, self.blocks, self.nonnegative_input)
        return dense.train(self.training)


class WithWTA(nn.Sequential):
    """An activation followed by its WTA dropout (keeps the activation's name in the model)."""

    def record_args(self) -> dict[str, Any]:
        """The WTA's settings and compact batch sizes, for the layout record (``compresskit.layout``)."""
        wta = self[1]
        return {"sparsity": wta.sparsity, "active_in": wta.active_in, "blocks": wta.blocks,
                "nonnegative_input": wta.nonnegative_input, "compact_batches": sorted(wta.compact_batches),
                "compact_always": wta.compact_always}

    @classmethod
    def from_record(cls, model: nn.Module, name: str, args: dict[str, Any]) -> "WithWTA":
        """The activation at ``name`` of ``model`` followed by the recorded WTA."""
        wta = WTADropout(float(args["sparsity"]), args.get("active_in", "both"), args.get("blocks"),
                         bool(args.get("nonnegative_input", False)))
        wta.compact_batches = {int(b) for b in args.get("compact_batches", [])}
        wta.compact_always = bool(args.get("compact_always", False))
        return cls(model.get_submodule(name), wta)


def activation_names(model: nn.Module, kinds: tuple[str, ...] = ACTIVATIONS) -> list[str]:
    """Names of activation modules of the given class names (not already followed by WTA)."""
    return [name for name, m in model.named_modules()
            if type(m).__name__ in kinds and name and not isinstance(m, WithWTA)]


def conv_activation_names(model: nn.Module, kinds: tuple[str, ...] = ACTIVATIONS) -> list[str]:
    """Names of the activation modules (class names in ``kinds``) that follow a convolution: those whose nearest
    Conv / Linear module registered before them is a convolution. In a CNN these are the feature extractor's
    activations, not the classifier head's (which follow a Linear)."""
    names: list[str] = []
    last: nn.Module | None = None
    for name, m in model.named_modules():
        if isinstance(m, (_ConvNd, nn.Linear)):
            last = m
        elif name and type(m).__name__ in kinds and not isinstance(m, WithWTA) and isinstance(last, _ConvNd):
            names.append(name)
    return names


def insert_wta(model: nn.Module, sparsity: float, overrides: dict[str, float] | None = None,
               layers: list[str] | None = None, after: tuple[str, ...] = ("ReLU",),
               active_in: Literal["both", "train", "eval"] = "both", blocks: int | None = None,
               conv_only: bool = False) -> dict[str, float]:
    """Put a WTADropout after each activation module (class in ``after``; name matching ``layers`` if given).

    ``conv_only``: only the activations that follow a convolution (``conv_activation_names``). ``overrides`` maps
    module-name glob patterns to sparsities (last match wins). Returns {module name: sparsity}. Raises ValueError
    naming the pattern when ``layers`` or ``overrides`` match no candidate activation.
    """
    candidates = conv_activation_names(model, after) if conv_only else activation_names(model, after)
    for pattern in list(layers or []) + list(overrides or {}):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in candidates):
            shown = ", ".join(candidates[:12]) + (" ..." if len(candidates) > 12 else "")
            where = " after a convolution" if conv_only else ""
            raise ValueError(f"'{pattern}' matches no {'/'.join(after)} module{where}; available: {shown or 'none'}")
    chosen = [n for n in candidates if not layers or any(fnmatch.fnmatchcase(n, p) for p in layers)]
    placed = {}
    for name in chosen:
        s = sparsity
        for pattern, value in (overrides or {}).items():
            if fnmatch.fnmatchcase(name, pattern):
                s = value
        activation = model.get_submodule(name)
        wta = WTADropout(s, active_in, blocks, nonnegative_input=isinstance(activation, NONNEGATIVE))
        model.set_submodule(name, WithWTA(activation, wta))
        placed[name] = s
    return placed
