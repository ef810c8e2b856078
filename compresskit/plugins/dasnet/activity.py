"""Measured activity of WTA layers during training: how many channels (neurons) of each sample are really non-zero
after WTA, against the layer's width and the winners WTA keeps. For the training log and the report's plot."""
from __future__ import annotations

import torch
from torch import nn

from ...plots import Figure
from .wta import WTADropout, keep_count

MEASURE_EVERY = 8   # training forwards between measurements (a reduction over the layer's output each time)


class ActivityProbe:
    """Forward hooks on the WTA layers of a model that measure, every :data:`MEASURE_EVERY` training forwards,
    the mean number of channels per sample with any non-zero value after WTA."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.layers: dict[str, WTADropout] = {}
        for name in names:
            wta = next((m for m in model.get_submodule(name).modules() if isinstance(m, WTADropout)), None)
            if wta is not None:
                self.layers[name] = wta
        self.active: dict[str, float] = {}
        self.width: dict[str, int] = {}
        self._calls = 0
        self._handles = [wta.register_forward_hook(self._hook(name)) for name, wta in self.layers.items()]

    def _hook(self, name: str):
        first = next(iter(self.layers))

        def measure(module: nn.Module, args: tuple, out) -> None:
            if not module.training or not torch.is_tensor(out) or out.dim() < 2:
                return
            if name == first:
                self._calls += 1
            if (self._calls - 1) % MEASURE_EVERY:
                return
            with torch.no_grad():
                alive = out.detach().flatten(2).ne(0).any(2) if out.dim() > 2 else out.detach().ne(0)
                self.active[name] = float(alive.sum(1).float().mean())
            self.width[name] = out.shape[1]

        return measure

    def kept(self, name: str) -> int | None:
        """Winners WTA keeps per sample in layer ``name`` (channels, or whole blocks' channels), once measured."""
        if name not in self.width:
            return None
        wta, units = self.layers[name], self.width[name]
        groups = wta.blocks if wta.blocks and units % wta.blocks == 0 else units
        return keep_count(groups, wta.sparsity) * (units // groups)

    def metrics(self) -> dict[str, float]:
        """``active_channels/<layer>``: the last measurement (NaN before the first)."""
        return {f"active_channels/{name}": self.active.get(name, float("nan")) for name in self.layers}

    def figure(self) -> Figure | None:
        """Per WTA layer: its channels, the winners WTA keeps, and the measured active channels per sample."""
        names = [n for n in self.layers if n in self.width]
        if not names:
            return None
        return Figure("dasnet_active_channels", "DASNet: channels per sample by WTA layer (last training "
                      "measurement)", "bars",
                      {"channels": [self.width[n] for n in names], "kept by WTA (k)": [self.kept(n) for n in names],
                       "active (measured mean)": [self.active[n] for n in names]},
                      categories=names, xlabel="layer (WTA after)", ylabel="channels per sample")

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
