"""Sparse execution: run inference on WTA's compact activations, so dropped channels cost nothing downstream.

``to_sparse_execution`` switches the model's ``WTADropout`` modules to the compact output (``ChannelSparse``: per
sample only the winning channels, samples grouped by their winning set) and wraps the layers that receive it:

* ``SparseConv2d`` / ``SparseLinear``: for each part, one convolution (matmul) over just that part's samples and
  the kernel's slice for its channels. Block WTA has few distinct channel sets, so each part is a real batch and
  its kernel slice is cut once and cached; per-channel WTA gathers each sample's slice from a kernel stored
  input-channel-major, so the gather copies contiguous rows.
* ``SparsePool``: max / average pooling of the kept channels only.

Other modules get the dense tensor (see ``compact``); a residual ``+`` scatters into the shortcut's copy. The
masked tensor is never built, pooling touches only kept channels, and each conv reads only kept input channels.
Whether that beats the masked dense model depends on the net, the batch size and the CPU, so each batch size in
``batch_sizes`` is timed both ways and the compact path kept only where it is faster. Results equal the masked
dense model up to float rounding.
"""
from __future__ import annotations

import time
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .compact import ChannelSparse, Part, densify
from .wta import WTADropout

POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.AvgPool1d)


class _SparseTwin(nn.Module):
    """A layer that runs on ``ChannelSparse`` parts (input-channel slices of its weight) and is the plain layer
    on ordinary tensors."""

    input_dim = 4

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._channel_major: torch.Tensor | None = None
        self._cached_version: tuple[int, int] = (-1, -1)

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _weight_for(self, part: Part) -> torch.Tensor:
        """The weight's slice over ``part.channels`` (contiguous), cached per channel set where it has a key."""
        weight = self.layer.weight
        version = (weight.data_ptr(), weight._version)
        if version != self._cached_version:
            self._cache.clear()
            self._channel_major = None
            self._cached_version = version
        if part.key is not None:
            if part.key not in self._cache:
                self._cache[part.key] = weight.detach().index_select(1, part.channels).contiguous()
            return self._cache[part.key]
        if self._channel_major is None:           # [in, out, ...]: one sample's slice is contiguous rows
            self._channel_major = weight.detach().transpose(0, 1).contiguous()
        return self._channel_major.index_select(0, part.channels).transpose(0, 1).contiguous()

    def forward(self, x: torch.Tensor | ChannelSparse) -> torch.Tensor:
        if not isinstance(x, ChannelSparse) or x.dim() != self.input_dim or \
                type(self.layer) not in (nn.Conv2d, nn.Linear):
            return self.layer(densify(x))
        y = x.assemble([self._op(p.data, self._weight_for(p)) for p in x.parts])
        bias = self.layer.bias
        if bias is not None:
            y = y + bias.view(1, -1, *([1] * (y.dim() - 2)))
        return y


class SparseConv2d(_SparseTwin):
    """``nn.Conv2d`` (groups=1, zero padding) over each part's kept input channels only."""

    def __init__(self, conv: nn.Conv2d) -> None:
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("only groups=1, zero-padded convolutions are supported")
        super().__init__(conv)

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return conv2d_onednn(x, weight, self.layer)


def conv2d_onednn(x: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv``'s convolution of ``x`` with ``weight`` (no bias), on oneDNN where it applies.

    PyTorch sends small batch-1 inputs (under 20480 elements) to its native im2col kernel, which is slower than
    oneDNN on the CPUs we measured; compact inputs are small, so they would fall under that rule where the dense
    layer did not. The benchmark gives the dense baseline the same kernel (see benchmarks/dasnet.py).
    """
    if x.is_cpu and x.dtype == torch.float32 and torch.backends.mkldnn.is_available() \
            and not isinstance(conv.padding, str):
        return torch.mkldnn_convolution(x.contiguous(), weight, None, conv.padding, conv.stride, conv.dilation, 1)
    return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation)


class SparseLinear(_SparseTwin):
    """``nn.Linear`` over each part's kept input features only (2-D inputs)."""

    input_dim = 2

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)


class SparsePool(nn.Module):
    """A pooling layer applied to the kept channels only (pooling maps an all-zero channel to zeros)."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.layer = pool

    def forward(self, x: torch.Tensor | ChannelSparse) -> torch.Tensor | ChannelSparse:
        return x.map(self.layer) if isinstance(x, ChannelSparse) else self.layer(x)


def _twin_for(module: nn.Module) -> nn.Module | None:
    if type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros":
        return SparseConv2d(module)
    if type(module) is nn.Linear:
        return SparseLinear(module)
    if isinstance(module, POOLS) and not getattr(module, "return_indices", False):
        return SparsePool(module)
    return None


def _densify_output(module: nn.Module, args, output):
    return densify(output)


def _receivers(model: nn.Module, sample: tuple[torch.Tensor, ...]) -> list[str]:
    """Names of the modules that receive a ``ChannelSparse`` as first input on ``sample``."""
    found: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: found.append(name)
                                         if args and isinstance(args[0], ChannelSparse) else None)
             for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(*sample)
    finally:
        for h in hooks:
            h.remove()
    return found


def _best_time(model: nn.Module, x: tuple[torch.Tensor, ...], repeats: int = 7) -> float:
    with torch.no_grad():
        model(*x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(*x)
            times.append(time.perf_counter() - start)
    return min(times)


def to_sparse_execution(model: nn.Module, sample: tuple[torch.Tensor, ...], batch_sizes: Iterable[int] = (1,),
                        force: bool = False) -> dict[str, list[int]]:
    """Switch the WTA modules of ``model`` to compact outputs and wrap the layers fed by them (see module doc).

    ``sample``: a representative input batch; each batch size in ``batch_sizes`` is built from its samples
    (cycled) and timed with the compact path and with the masked dense one; the compact path is used for the batch
    sizes where it is faster. With ``force`` it is always used (tests). The compact path runs in eval mode without
    autograd (``torch.no_grad`` / ``inference_mode``); training and autograd use the masked dense path. Returns
    {wrapped layer name: batch sizes run compactly}.
    """
    wta = [m for m in model.modules() if isinstance(m, WTADropout) and m.sparsity > 0]
    if not wta:
        return {}
    was_training = model.training
    model.eval()
    hook = None
    try:
        for m in wta:
            m.compact_always = True
        wrapped: list[str] = []
        while True:                    # a wrapped pool passes the compact form on, so look again downstream
            twins = {name: _twin_for(model.get_submodule(name)) for name in _receivers(model, sample)
                     if name not in wrapped}
            twins = {name: twin for name, twin in twins.items() if twin is not None}
            if not twins:
                break
            for name, twin in twins.items():
                model.set_submodule(name, twin)
                wrapped.append(name)
        if not any(h is _densify_output for h in model._forward_hooks.values()):
            hook = model.register_forward_hook(_densify_output)
        for m in wta:
            m.compact_always = force
        chosen = []
        if not force:
            for b in batch_sizes:
                xb = tuple(t[torch.arange(b) % t.shape[0]] for t in sample)
                for m in wta:
                    m.compact_batches.discard(b)
                dense_time = _best_time(model, xb)
                for m in wta:
                    m.compact_batches.add(b)
                if _best_time(model, xb) < 0.95 * dense_time:
                    chosen.append(b)
                else:
                    for m in wta:
                        m.compact_batches.discard(b)
            if not chosen:             # no batch size gains: leave the model as it was
                for name in wrapped:
                    model.set_submodule(name, model.get_submodule(name).layer)
                if hook is not None:
                    hook.remove()
                wrapped = []
    finally:
        for m in wta:
            m.compact_always = force
        model.train(was_training)
    return {name: (list(batch_sizes) if force else chosen) for name in wrapped}
