"""An example third-party plugin: multiplies the model's first parameter by a factor (a stand-in for a real
method; it shows the config dataclass, a hook and a report)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compresskit import Plugin
from compresskit.schema import option


@dataclass
class ScaleConfig:
    """Fields of a ``scale-first`` stage."""

    factor: float = option(2.0, help="multiply the first parameter by this", min=0)


class ScaleFirstParameter(Plugin):
    """Scales the first parameter of the model once, before training."""

    name = "scale-first"
    description = "example plugin: scales the first parameter"
    Config = ScaleConfig

    def apply(self, model, ctx):
        with torch.no_grad():
            next(model.parameters()).mul_(self.config.factor)
        return model

    def report(self, ctx):
        return {"factor": self.config.factor}
