"""The sparse path's layers: they run inference on WTA's compact activations, so dropped channels cost nothing.

``convert.to_sparse_execution`` switches the model's ``WTADropout`` modules to the compact output
(``ChannelSparse``: per sample only the winning channels, samples grouped by their winning set) and wraps the layers
that receive it in these twins:

* ``SparseConv2d`` / ``SparseLinear``: for each part, one convolution (matmul) over just that part's samples and
  the kernel's slice for its channels. Block WTA has few distinct channel sets, so each part is a real batch and
  its kernel slice is cut once and cached. Per-channel WTA (one part, a channel set a sample) runs a conv on the
  native kernel (``native/sparse_conv.cpp``: the kept channels' rows of a weight packed once); without it, and for
  a Linear, each sample's slice is gathered from a kernel stored input-channel-major (a copy of contiguous rows).
  A BatchNorm (and ReLU) after the conv can be folded into that call (``fuse``).
* ``SparsePool``: max / average pooling of the kept channels only.

The convolutions go through ``onednn`` (the one module that calls PyTorch's private oneDNN operators, with a
public ``F.conv2d`` fallback). For the batch sizes in ``SparseConv2d.prepacked_batches`` (chosen by timing in
``convert``) each cached kernel slice is also reordered once into oneDNN's blocked weight layout (*prepacked*), so
the convolution does not reorder the weight on every call; where ``onednn`` cannot prepack, the plain slices serve.
A folded BatchNorm's scale and shift come from ``torch.nn.utils.fusion.fuse_conv_bn_weights``.

Other modules get the dense tensor (see ``compact``); a residual ``+`` scatters into the shortcut's copy. The
masked tensor is never built, pooling touches only kept channels, and each conv reads only kept input channels.
Results equal the masked dense model up to float rounding.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ...torch_private import add_forward_hook, own_tensors, tensor_versions
from . import onednn
from .compact import ChannelSparse, Part, channels_last, densify
from . import native

_NO_BIAS = torch.empty(0)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.AvgPool1d)


def dense_output(module: nn.Module, args, output):
    """Forward hook on a model with a sparse path: its output as the dense model gives it, dense, and a feature map
    in its input's memory format (the prepacked convolutions compute channels-last whatever the input)."""
    output = densify(output)
    if isinstance(output, torch.Tensor) and output.dim() == 4 and args and isinstance(args[0], torch.Tensor) \
            and args[0].dim() == 4:
        output = output.contiguous(memory_format=torch.channels_last if channels_last(args[0])
                                   else torch.contiguous_format)
    return output


def ensure_dense_output(model: nn.Module):
    """Register :func:`dense_output` on ``model`` unless it is there; returns the new handle (None if it was)."""
    return add_forward_hook(model, dense_output, "_dense_output_hook")


class _SparseTwin(nn.Module):
    """A layer that runs on ``ChannelSparse`` parts (input-channel slices of its weight) and is the plain layer
    on ordinary tensors. ``fold`` (see ``fuse``) makes the compact path also apply a following BatchNorm (and
    ReLU) in the same call."""

    input_dim = 4

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self._folded: tuple[nn.BatchNorm2d, ...] = ()     # a tuple: the BatchNorm is not a submodule of this
        self.fused_relu = False
        self._cache: dict[tuple, torch.Tensor] = {}          # channel set (or (set, "prepacked")) -> kernel
        self._channel_major: torch.Tensor | None = None
        self._cached_version: tuple[tuple[int, int], ...] | None = ()
        self._weight_bias: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._fused_output: weakref.ref | None = None

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def record_args(self) -> dict[str, Any]:
        """What rebuilds this twin from a layout record (``compresskit.layout``; a folded BatchNorm is recorded by
        its ``PassFolded``)."""
        return {}

    @classmethod
    def from_record(cls, model: nn.Module, name: str, args: dict[str, Any]) -> "_SparseTwin":
        """The twin of the layer at ``name`` of ``model``, set up as recorded; the model gets the dense-output
        hook the sparse path needs."""
        twin = cls(model.get_submodule(name))
        ensure_dense_output(model)
        return twin

    def to_dense(self) -> nn.Module:
        """The layer this twin runs (what it replaced), unfolded: the masked dense model's layer."""
        self.unfold()
        return self.layer

    def fold(self, bn: nn.BatchNorm2d, relu: bool) -> None:
        """Apply the eval-mode ``bn`` (and a ReLU if ``relu``) to the compact path's output, folded into the kernel
        slices and bias. Only for a ``bn`` that reads nothing but this layer's output (``fuse`` checks)."""
        self._folded, self.fused_relu = (bn,), relu
        self._cached_version = ()

    def unfold(self) -> None:
        """Undo ``fold``."""
        self._folded, self.fused_relu = (), False
        self._cached_version = ()

    @property
    def folded_bn(self) -> nn.BatchNorm2d | None:
        """The BatchNorm the compact path applies (None: none)."""
        return self._folded[0] if self._folded else None

    def __getstate__(self) -> dict:
        # a weak reference does not pickle, nor does a prepacked (opaque oneDNN) kernel: caches are rebuilt lazily
        return {**super().__getstate__(), "_fused_output": None, "_cache": {}}

    def produced(self, x: object) -> bool:
        """Whether ``x`` is this layer's last compact output with the folded BatchNorm / ReLU already applied."""
        return self._fused_output is not None and self._fused_output() is x

    def _weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The compact path's (weight, bias): the layer's, with the folded BatchNorm's scale and shift
        (``torch.nn.utils.fusion.fuse_conv_bn_weights``, as ``fuse_conv_bn_eval`` folds a dense conv). Slices
        cached from an earlier call are dropped when any of the tensors they came from has changed."""
        bn = self.folded_bn
        # read the tensors from the modules' dicts: this runs on every call, nn.Module.__getattr__ is slow at batch 1
        sources = own_tensors(self.layer)
        if bn is not None:
            sources += own_tensors(bn, ("running_mean", "running_var"))
        version = tensor_versions(sources)
        if version is None or version != self._cached_version:
            self._cache.clear()
            self._channel_major = None
            self._cached_version = version
            weight, bias = self.layer.weight.detach(), self.layer.bias
            bias = None if bias is None else bias.detach()
            if bn is not None:
                weight, bias = fuse_conv_bn_weights(
                    weight, bias, bn.running_mean, bn.running_var, bn.eps,
                    None if bn.weight is None else bn.weight.detach(), None if bn.bias is None else bn.bias.detach())
                weight, bias = weight.detach(), bias.detach()           # plain tensors, not Parameters
            self._weight_bias = (weight, bias)
        return self._weight_bias

    def _weight_for(self, part: Part, weight: torch.Tensor) -> torch.Tensor:
        """``weight``'s slice over the shared ``part.channels`` (contiguous), cached per channel set where it has a
        key."""
        if part.key is not None:
            if part.key not in self._cache:
                self._cache[part.key] = weight.index_select(1, part.channels).contiguous()
            return self._cache[part.key]
        return self._sample_slice(weight, part.channels)

    def _sample_slice(self, weight: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """``weight``'s slice over one uncached channel set, gathered from an input-channel-major copy."""
        if self._channel_major is None:           # [in, out, ...]: one sample's slice is contiguous rows
            self._channel_major = weight.transpose(0, 1).contiguous()
        return self._channel_major.index_select(0, channels).transpose(0, 1).contiguous()

    def _kernel_for(self, part: Part, weight: torch.Tensor, batch: int) -> torch.Tensor:
        """The kernel ``_op`` gets for ``part`` of a batch of ``batch`` samples (here: the weight slice)."""
        return self._weight_for(part, weight)

    def _part_output(self, part: Part, weight: torch.Tensor, bias: torch.Tensor | None, batch: int
                     ) -> torch.Tensor:
        """The layer's output for ``part``'s samples: one call over a shared channel set, or (per-sample sets)
        one call a sample over its own weight slice."""
        if part.per_sample:
            if not part.data.shape[0]:         # no sample: any slice of the right width gives the empty output
                return self._op(part.data, self._sample_slice(weight, torch.arange(part.data.shape[1])), bias)
            return torch.cat([self._op(part.data[i:i + 1], self._sample_slice(weight, part.channels[i]), bias)
                              for i in range(part.data.shape[0])])
        return self._op(part.data, self._kernel_for(part, weight, batch), bias)

    def forward(self, x: torch.Tensor | ChannelSparse) -> torch.Tensor:
        if not isinstance(x, ChannelSparse) or x.dim() != self.input_dim or \
                type(self.layer) not in (nn.Conv2d, nn.Linear):
            return self._dense(densify(x))
        weight, bias = self._weight_and_bias()
        y = x.assemble([self._part_output(p, weight, bias, x.batch) for p in x.parts])
        return self._mark_fused(y)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on an ordinary (masked or unmasked) tensor."""
        return self.layer(x)

    def _mark_fused(self, y: torch.Tensor) -> torch.Tensor:
        """``y``, remembered as this layer's output with the folded BatchNorm / ReLU applied (``produced``)."""
        if self._folded:
            object.__setattr__(self, "_fused_output", weakref.ref(y))     # skips nn.Module.__setattr__'s checks
        return y


class SparseConv2d(_SparseTwin):
    """``nn.Conv2d`` (groups=1, zero padding) over each part's kept input channels only; for the batch sizes in
    ``prepacked_batches`` with kernel slices prepacked for oneDNN (where ``onednn`` can prepack). Per-sample channel
    sets (per-channel WTA), and every part at the batch sizes in ``native_batches``, run on the native kernel
    (``native/sparse_conv.cpp``) where it is built.

    On an ordinary (WTA-masked) tensor of a batch size in ``tuned_dense_batches`` it is the *tuned dense* layer
    instead, in inference (eval mode, no autograd): the whole kernel with the folded BatchNorm (and ReLU), prepacked
    for oneDNN, as a tuned dense model runs it. ``to_sparse_execution`` chooses that where it beats both the masked
    and the compact path. ``dense_input``: a conv no WTA feeds (the stem, which gets the image), wrapped only to run
    as the tuned dense layer."""

    _native_per_sample = False     # per-sample channel sets came (they always take the native kernel)

    def __init__(self, conv: nn.Conv2d, dense_input: bool = False) -> None:
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("only groups=1, zero-padded convolutions are supported")
        super().__init__(conv)
        self.prepacked_batches: set[int] = set()
        self.native_batches: set[int] = set()
        self.tuned_dense_batches: set[int] = set()
        self.dense_input = dense_input

    def record_args(self) -> dict[str, Any]:
        """The batch sizes run with prepacked kernels, natively and as the tuned dense layer, and whether no WTA
        feeds it (see ``_SparseTwin.record_args``)."""
        return {"prepacked_batches": sorted(self.prepacked_batches), "native_batches": sorted(self.native_batches),
                "tuned_dense_batches": sorted(self.tuned_dense_batches), "dense_input": self.dense_input}

    @classmethod
    def from_record(cls, model: nn.Module, name: str, args: dict[str, Any]) -> "SparseConv2d":
        """See ``_SparseTwin.from_record``."""
        twin = super().from_record(model, name, args)
        twin.prepacked_batches = {int(b) for b in args.get("prepacked_batches", [])}
        twin.native_batches = {int(b) for b in args.get("native_batches", [])}
        twin.tuned_dense_batches = {int(b) for b in args.get("tuned_dense_batches", [])}
        twin.dense_input = bool(args.get("dense_input", False))
        return twin

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[0] not in self.tuned_dense_batches or self.training or torch.is_grad_enabled():
            return self.layer(x)
        weight, bias = self._weight_and_bias()
        kernel = self._cache.get(("dense", "prepacked"))
        if kernel is None and onednn.prepack_available() and onednn.applies(x, self.layer):
            kernel = onednn.prepack_conv_weight(weight, self.layer, x.shape)
            if kernel is not None:
                self._cache[("dense", "prepacked")] = kernel      # dropped with the slices when the weights change
        return self._mark_fused(onednn.conv2d(x, weight if kernel is None else kernel, bias, self.layer,
                                              self.fused_relu))

    def _kernel_for(self, part: Part, weight: torch.Tensor, batch: int) -> torch.Tensor:
        if batch not in self.prepacked_batches or part.key is None or not onednn.prepack_available() \
                or not onednn.applies(part.data, self.layer):
            return self._weight_for(part, weight)
        key = (part.key, "prepacked")       # dropped with the slices when the weights change
        packed = self._cache.get(key)
        if packed is None:
            packed = onednn.prepack_conv_weight(self._weight_for(part, weight), self.layer, part.data.shape)
            if packed is None:              # cannot prepack after all: the plain slice
                return self._weight_for(part, weight)
            self._cache[key] = packed
        return packed

    def _part_output(self, part: Part, weight: torch.Tensor, bias: torch.Tensor | None, batch: int
                     ) -> torch.Tensor:
        """Per-sample channel sets (per-channel WTA), and every part of a batch size in ``native_batches``, go
        through the native kernel where it runs (``native/sparse_conv.cpp``: the kept channels' rows of a weight
        packed once, no slice cut); everything else as ``_SparseTwin``."""
        kernels = native.kernels_for(part.data, contiguous=False) \
            if part.per_sample or batch in self.native_batches else None
        conv = self.layer
        if kernels is None or conv.dilation != (1, 1) or isinstance(conv.padding, str) or part.data.dim() != 4:
            return super()._part_output(part, weight, bias, batch)
        packed = self._cache.get(("native",))     # dropped with the slices when the weights change
        if packed is None:
            packed = self._cache[("native",)] = kernels.pack_conv_weight(weight)
        self._native_per_sample = self._native_per_sample or part.per_sample
        return kernels.sparse_input_conv2d(part.data, part.channels, packed, _NO_BIAS if bias is None else bias,
                                           conv.out_channels, *conv.kernel_size, *conv.stride, *conv.padding,
                                           self.fused_relu)

    def drop_unused_kernels(self) -> None:
        """Forget the prepacked kernels no batch size uses any more (the tuner timed them and chose otherwise), and
        the native kernel's packed weight where no batch size and no per-sample channel set needs it."""
        for key in [k for k in self._cache if k[-1] == "prepacked"]:
            if (key[0] == "dense" and not self.tuned_dense_batches) or \
                    (key[0] != "dense" and not self.prepacked_batches):
                del self._cache[key]
        if not self.native_batches and not self._native_per_sample:
            self._cache.pop(("native",), None)

    def prepacked_kernels(self) -> int:
        """How many prepacked kernel slices are cached (0 where no part had a cacheable channel set; the tuned
        dense layer's whole kernel is not a slice)."""
        return sum(1 for key in self._cache if key[-1] == "prepacked" and key[0] != "dense")

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return onednn.conv2d(x, weight, bias, self.layer, self.fused_relu)


class SparseLinear(_SparseTwin):
    """``nn.Linear`` over each part's kept input features only (2-D inputs)."""

    input_dim = 2

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


class SparsePool(nn.Module):
    """A pooling layer applied to the kept channels only (pooling maps an all-zero channel to zeros)."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.layer = pool

    def record_args(self) -> dict[str, Any]:
        """Nothing beyond the pool it wraps (see ``compresskit.layout``)."""
        return {}

    @classmethod
    def from_record(cls, model: nn.Module, name: str, args: dict[str, Any]) -> "SparsePool":
        """The compact form of the pool at ``name`` of ``model``."""
        return cls(model.get_submodule(name))

    def to_dense(self) -> nn.Module:
        """The pool this one wraps."""
        return self.layer

    def forward(self, x: torch.Tensor | ChannelSparse) -> torch.Tensor | ChannelSparse:
        return x.map(self.layer) if isinstance(x, ChannelSparse) else self.layer(x)
