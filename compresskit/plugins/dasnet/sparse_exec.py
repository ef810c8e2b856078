"""Sparse execution: run a conv / linear layer on each sample's active input channels only.

WTA leaves whole input channels (or neurons) zero per sample. :class:`SparseConv2d` detects them from the input
itself (so pooling, identity shortcuts etc. in between do not matter), gathers each sample's active channels and
the matching kernel slices, and convolves only those. Per-sample channel sets make batched gathering expensive on
CPUs (per-sample kernels defeat the blocked dense convolution), so each layer is *tuned*: at conversion the
gathered path is timed against the dense convolution for the batch sizes asked for, and kept only where it is
faster. The result equals the dense convolution of the masked input up to float rounding.
"""
from __future__ import annotations

import time
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def active_channels(x: torch.Tensor) -> torch.Tensor:
    """Per-sample indices [B, k] of the input channels that are not all zero, padded with zero channels."""
    nonzero = (x.abs().flatten(2).amax(2) > 0) if x.dim() > 2 else (x != 0)
    k = max(1, int(nonzero.sum(1).max()))
    return torch.topk(nonzero.to(torch.int8), k, dim=1, sorted=False).indices


class SparseConv2d(nn.Module):
    """``nn.Conv2d`` (groups=1) that skips each sample's all-zero input channels for the tuned batch sizes."""

    def __init__(self, conv: nn.Conv2d, sparse_batches: Iterable[int] = (), force: bool = False) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("only groups=1, zero-padded convolutions are supported")
        self.conv = conv
        self.sparse_batches = set(sparse_batches)
        self.force = force

    def sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The gathered computation, one convolution per sample over its active channels."""
        conv = self.conv
        idx = active_channels(x)
        outs = [F.conv2d(x[b:b + 1, idx[b]], conv.weight[:, idx[b]], conv.bias, conv.stride, conv.padding,
                         conv.dilation) for b in range(x.shape[0])]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.force or x.shape[0] in self.sparse_batches:
            return self.sparse_forward(x)
        return self.conv(x)


class SparseLinear(nn.Module):
    """``nn.Linear`` that skips all-zero input features for the tuned batch sizes."""

    def __init__(self, linear: nn.Linear, sparse_batches: Iterable[int] = (), force: bool = False) -> None:
        super().__init__()
        self.linear = linear
        self.sparse_batches = set(sparse_batches)
        self.force = force

    def sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per sample: the active features times the matching weight columns."""
        lin = self.linear
        idx = active_channels(x)
        outs = [F.linear(x[b:b + 1, idx[b]], lin.weight[:, idx[b]], lin.bias) for b in range(x.shape[0])]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and (self.force or x.shape[0] in self.sparse_batches):
            return self.sparse_forward(x)
        return self.linear(x)


def _capture_inputs(model: nn.Module, sample: tuple[torch.Tensor, ...], min_zero: float) -> dict[str, torch.Tensor]:
    """Inputs of the Conv2d/Linear layers that, on ``sample``, have >= ``min_zero`` of every sample's channels
    entirely zero (the layers that follow WTA)."""
    found: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(module, args):
            x = args[0]
            zero = (x.abs().flatten(2).amax(2) == 0) if x.dim() > 2 else (x == 0)
            if x.dim() in (2, 4) and float(zero.float().mean(1).min()) >= min_zero:
                found[name] = x.detach().clone()
        return fn

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*sample)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return found


def _faster(dense, sparse, x: torch.Tensor, repeats: int = 5) -> bool:
    def best(fn) -> float:
        fn(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        return best(sparse) < 0.9 * best(dense)


def to_sparse_execution(model: nn.Module, sample: tuple[torch.Tensor, ...], batch_sizes: Iterable[int] = (1,),
                        min_zero: float = 0.2, force: bool = False) -> dict[str, list[int]]:
    """Wrap each conv / linear layer fed by WTA-sparse input in its sparse twin, tuned per batch size.

    ``sample``: a representative input batch (its first sample is repeated to each tuned batch size). With
    ``force`` the gathered path is always used (for tests). Returns {layer name: batch sizes run sparsely}.
    """
    inputs = _capture_inputs(model, sample, min_zero)
    decisions: dict[str, list[int]] = {}
    for name, x in sorted(inputs.items()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, attr)
        twin_cls = SparseConv2d if isinstance(module, nn.Conv2d) else SparseLinear
        twin = twin_cls(module, force=force)
        chosen = []
        if not force:
            for b in batch_sizes:
                xb = x[:1].expand(b, *x.shape[1:]).contiguous() if b != x.shape[0] else x
                if _faster(module, twin.sparse_forward, xb):
                    chosen.append(b)
            twin.sparse_batches = set(chosen)
        if chosen or force:
            setattr(parent, attr, twin)
            decisions[name] = chosen
    return decisions
