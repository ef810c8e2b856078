"""``ChannelSparse``: a WTA-sparse activation stored compactly, only each sample's winning channels.

A ``[B, C, *spatial]`` (or ``[B, F]``) activation after winners-take-all has, per sample, only ``k`` of ``C``
channels nonzero. ``ChannelSparse`` keeps just those: the batch is split into *parts*, each a set of samples
(``rows``) with their data ``[n, k, *spatial]`` and their active channels (``channels``). With block WTA there
are few distinct channel sets, so a part is the samples sharing one set (``channels [k]``); per-channel WTA keeps
one part for the whole batch with each sample's own set (``channels [B, k]``).

Layers that know the format (``sparse_exec``) run on the parts directly. Everything else sees an ordinary dense
tensor: any torch function called on a ``ChannelSparse`` (``torch.flatten``, ``F.relu``, ``+`` ...) gets the
densified tensor, and so does any tensor attribute (``x.view`` ...). Adding it to a dense tensor (a residual
shortcut) scatters the parts into a copy of that tensor instead of densifying first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import native


@dataclass
class Part:
    """Samples ``rows`` (None: the whole batch, in order) whose active channels are ``channels`` (sorted): one set
    ``[k]`` for all of them, or one a sample ``[n, k]`` (``per_sample``); ``data`` holds those channels only.
    ``key`` names a shared channel set (for weight caching; None: not cached)."""

    rows: torch.Tensor | None
    channels: torch.Tensor
    data: torch.Tensor
    key: tuple[int, ...] | None = None
    span: tuple[int, int] | None = None     # (lo, hi) when channels are the contiguous range lo..hi-1

    @property
    def per_sample(self) -> bool:
        """Whether each sample has its own channel set (``channels [n, k]``, per-channel WTA)."""
        return self.channels.dim() == 2


class ChannelSparse:
    """A channel-sparse activation in compact form (see the module docstring)."""

    __slots__ = ("batch", "units", "parts", "_dense")

    def __init__(self, batch: int, units: int, parts: list[Part]) -> None:
        self.batch, self.units, self.parts = batch, units, parts
        self._dense: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense activation this stands for."""
        return torch.Size((self.batch, self.units, *self.parts[0].data.shape[2:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].data.dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].data.device

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ChannelSparse":
        """Apply a channel-wise operation that maps zero maps to zero (pooling) to every part's data."""
        return ChannelSparse(self.batch, self.units, [Part(p.rows, p.channels, fn(p.data), p.key, p.span)
                                                      for p in self.parts])

    def scatter_into(self, out: torch.Tensor, accumulate: bool) -> torch.Tensor:
        """Write (or add) the parts into the dense tensor ``out`` in place and return it."""
        for p in self.parts:
            if p.span is not None:
                target = out[:, p.span[0]:p.span[1]]
                if p.rows is None:
                    target.add_(p.data) if accumulate else target.copy_(p.data)
                elif accumulate:     # one add per sample: index_add_ into a channel slice is several times slower
                    for i, row in enumerate(p.rows.tolist()):
                        target[row].add_(p.data[i])
                else:
                    target.index_copy_(0, p.rows, p.data)
            else:
                rows = torch.arange(self.batch, device=out.device) if p.rows is None else p.rows
                out.index_put_((rows[:, None], p.channels if p.per_sample else p.channels[None, :]), p.data,
                               accumulate=accumulate)
        return out

    def added_to(self, dense: torch.Tensor) -> torch.Tensor:
        """``dense`` + this activation (a residual shortcut), a new tensor: one native pass where the parts cover
        the batch in order (``native/wta.cpp``'s ``add_channels``), else scattered into a copy of ``dense``."""
        if len(self.parts) == 1 and self.parts[0].rows is None:
            kernels = native.kernels_for(dense)
            if kernels is not None:
                return kernels.add_channels(dense, self.parts[0].channels, self.parts[0].data)
        return self.scatter_into(dense.clone(), accumulate=True)

    def dense(self) -> torch.Tensor:
        """The dense activation (dropped channels zero); computed once."""
        if self._dense is None:
            self._dense = self.scatter_into(self.parts[0].data.new_zeros(self.shape), accumulate=False)
        return self._dense

    def assemble(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Stack per-part results ``[n, ...]`` back into batch order."""
        if len(outputs) == 1 and self.parts[0].rows is None:
            return outputs[0]
        first = outputs[0]
        layout = torch.channels_last if channels_last(first) else torch.contiguous_format
        out = torch.empty((self.batch, *first.shape[1:]), dtype=first.dtype, device=first.device, memory_format=layout)
        for p, y in zip(self.parts, outputs):
            out.index_copy_(0, p.rows, y)
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ADD and len(args) == 2 and not kwargs:
            a, b = args
            sparse, dense = (a, b) if isinstance(a, ChannelSparse) else (b, a)
            if isinstance(dense, torch.Tensor) and isinstance(sparse, ChannelSparse) and \
                    dense.shape == sparse.shape and dense.dtype == sparse.dtype:
                return sparse.added_to(dense)
        return func(*densify(args), **densify(kwargs))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ChannelSparse.__slots__:
            raise AttributeError(name)
        return getattr(self.dense(), name)

    def __repr__(self) -> str:
        return f"ChannelSparse(shape={tuple(self.shape)}, parts={len(self.parts)})"


def channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is a 4-D tensor in channels-last memory format (and not also plain contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}


def densify(value: Any) -> Any:
    """``value`` with every ``ChannelSparse`` in it (also inside lists / tuples / dicts) made dense."""
    if isinstance(value, ChannelSparse):
        return value.dense()
    if isinstance(value, (list, tuple)):
        return type(value)(densify(v) for v in value)
    if isinstance(value, dict):
        return {k: densify(v) for k, v in value.items()}
    return value
