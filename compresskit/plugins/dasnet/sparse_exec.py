"""Sparse execution: run a conv / linear layer on each sample's active input channels only.

WTA leaves whole input channels (or neurons) zero per sample. The sparse twins below detect them from the input
itself (so pooling, identity shortcuts etc. in between do not matter) and skip them:

* per-channel WTA (``blocks=None``): each sample's active channels and the matching kernel slices are gathered
  and convolved, one convolution per sample;
* block WTA (``blocks=G``): for each of the ``G`` channel blocks, one dense convolution over just the samples in
  which that block is active, with the kernel's block kept contiguous; partial outputs are summed.

Which path pays off depends on the layer and batch size on a given CPU, so each layer is *tuned*: at conversion
both are timed for the batch sizes asked for and the sparse path is kept only where it is faster. Results equal
the dense layer on the masked input up to float rounding.
"""
from __future__ import annotations

import time
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def active_channels(x: torch.Tensor) -> torch.Tensor:
    """Per-sample indices [B, k] of the input channels that are not all zero, padded with zero channels."""
    nonzero = x.reshape(*x.shape[:2], -1).abs().amax(2) > 0
    k = max(1, int(nonzero.sum(1).max()))
    return torch.topk(nonzero.to(torch.int8), k, dim=1, sorted=False).indices


class _SparseTwin(nn.Module):
    """Shared logic of the sparse conv / linear twins: block weights, path choice, per-sample and block loops."""

    def __init__(self, layer: nn.Module, blocks: int | None, sparse_batches: Iterable[int], force: bool) -> None:
        super().__init__()
        self.layer = layer
        in_units = layer.weight.shape[1]
        self.blocks = blocks if blocks and in_units % blocks == 0 and blocks > 1 else None
        self.sparse_batches = set(sparse_batches)
        self.force = force
        self._block_weights: list[torch.Tensor] = []
        self._weight_version = -1

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _with_bias(self, y: torch.Tensor) -> torch.Tensor:
        bias = self.layer.bias
        if bias is None:
            return y
        return y + bias.view(1, -1, *([1] * (y.dim() - 2)))

    def _weights(self) -> list[torch.Tensor]:
        weight = self.layer.weight
        if weight._version != self._weight_version or not self._block_weights:
            size = weight.shape[1] // self.blocks
            self._block_weights = [weight[:, g * size:(g + 1) * size].detach().contiguous()
                                   for g in range(self.blocks)]
            self._weight_version = weight._version
        return self._block_weights

    def sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The skipping computation (block or per-sample path)."""
        batch = x.shape[0]
        if self.blocks is None:
            idx = active_channels(x)
            outs = [self._op(x[b:b + 1, idx[b]], self.layer.weight[:, idx[b]]) for b in range(batch)]
            return self._with_bias(outs[0] if batch == 1 else torch.cat(outs))
        size = x.shape[1] // self.blocks
        active = x.reshape(batch, self.blocks, -1).abs().amax(2) > 0           # [B, G]
        y = None
        for g, weight in enumerate(self._weights()):
            rows = torch.nonzero(active[:, g]).flatten()
            if rows.numel() == 0:
                continue
            part_in = x[:, g * size:(g + 1) * size]
            if rows.numel() < batch:
                part_in = part_in.index_select(0, rows)
            part = self._op(part_in, weight)
            if y is None:
                y = part.new_zeros(batch, *part.shape[1:])
            if rows.numel() == batch:
                y += part
            else:
                y.index_add_(0, rows, part)
        if y is None:
            return self.layer(torch.zeros_like(x))
        return self._with_bias(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.force or x.shape[0] in self.sparse_batches:
            return self.sparse_forward(x)
        return self.layer(x)


class SparseConv2d(_SparseTwin):
    """``nn.Conv2d`` (groups=1, zero padding) that skips inactive input channels / channel blocks."""

    def __init__(self, conv: nn.Conv2d, blocks: int | None = None, sparse_batches: Iterable[int] = (),
                 force: bool = False) -> None:
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("only groups=1, zero-padded convolutions are supported")
        super().__init__(conv, blocks, sparse_batches, force)

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        c = self.layer
        return F.conv2d(x, weight, None, c.stride, c.padding, c.dilation)


class SparseLinear(_SparseTwin):
    """``nn.Linear`` that skips inactive input features / feature blocks (2-D inputs)."""

    def __init__(self, linear: nn.Linear, blocks: int | None = None, sparse_batches: Iterable[int] = (),
                 force: bool = False) -> None:
        super().__init__(linear, blocks, sparse_batches, force)

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if x.dim() == 2 else self.layer(x)


def _capture_inputs(model: nn.Module, sample: tuple[torch.Tensor, ...], min_zero: float) -> dict[str, torch.Tensor]:
    """Inputs of the Conv2d/Linear layers that, on ``sample``, have >= ``min_zero`` of every sample's channels
    entirely zero (the layers that follow WTA)."""
    found: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(module, args):
            x = args[0]
            if x.dim() not in (2, 4):
                return
            zero = x.reshape(*x.shape[:2], -1).abs().amax(2) == 0
            if float(zero.float().mean(1).min()) >= min_zero:
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


def _faster(dense, sparse, x: torch.Tensor, repeats: int = 7) -> bool:
    def best(fn) -> float:
        fn(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        return best(sparse) < 0.95 * best(dense)


def to_sparse_execution(model: nn.Module, sample: tuple[torch.Tensor, ...], batch_sizes: Iterable[int] = (1,),
                        blocks: int | None = None, min_zero: float = 0.2, force: bool = False
                        ) -> dict[str, list[int]]:
    """Wrap each conv / linear layer fed by WTA-sparse input in its sparse twin, tuned per batch size.

    ``sample``: a representative input batch; each tuned batch size is built from its samples (cycled). ``blocks``:
    the WTA block count (None = per channel). With ``force`` the sparse path is always used (tests). Returns
    {layer name: batch sizes run sparsely}.
    """
    inputs = _capture_inputs(model, sample, min_zero)
    decisions: dict[str, list[int]] = {}
    for name, x in sorted(inputs.items()):
        module = model.get_submodule(name)
        twin_cls = SparseConv2d if isinstance(module, nn.Conv2d) else SparseLinear
        twin = twin_cls(module, blocks, force=force)
        chosen: list[int] = []
        if not force:
            for b in batch_sizes:
                xb = x[torch.arange(b) % x.shape[0]]
                if _faster(module, twin.sparse_forward, xb):
                    chosen.append(b)
            twin.sparse_batches = set(chosen)
        if chosen or force:
            model.set_submodule(name, twin)
            decisions[name] = chosen
    return decisions
