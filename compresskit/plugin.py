"""The plugin base class and the run context the core hands to every hook."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn


@dataclass
class RunContext:
    """What a plugin may look at during a run: the model, data, training settings and the live optimizer."""

    model: nn.Module | None = None
    data: Any = None                      # a compresskit.data.DataBundle, or None for analysis-only runs
    train: Any = None                     # the recipe's TrainConfig, or None
    optimizer: torch.optim.Optimizer | None = None
    total_steps: int = 0
    out_dir: str | None = None
    sample_input: tuple | None = None     # one batch of model inputs (no label), for tracing and shapes
    extras: dict[str, Any] = field(default_factory=dict)


class Plugin:
    """A compression or analysis method applied to a model by a recipe stage.

    Subclasses set ``name``, ``description``, ``Config`` (a dataclass built by :mod:`compresskit.schema`) and
    override the hooks they need. ``kind = "analysis"`` plugins leave the model unchanged and need no training.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type]
    kind: ClassVar[Literal["transform", "analysis"]] = "transform"

    def __init__(self, config: Any) -> None:
        self.config = config

    def apply(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Transform the model before training (e.g. swap modules). Returns the model to train."""
        return model

    def on_after_backward(self, step: int, ctx: RunContext) -> None:
        """Called after ``loss.backward()`` and before ``optimizer.step()``: gradients are available."""

    def on_step(self, step: int, ctx: RunContext) -> None:
        """Called after ``optimizer.step()`` of global step ``step`` (1-based): in-training schedules go here."""

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Called after training; may return a converted (e.g. quantized) model."""
        return model

    def report(self, ctx: RunContext) -> dict[str, Any]:
        """Numbers for the run report (JSON-serialisable)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Plugin state needed to resume (tensors, numbers, strings)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
