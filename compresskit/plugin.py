"""The plugin base class and the run context the core hands to every hook."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from .distributed.collective import Collective
from .errors import ConfigError

if TYPE_CHECKING:
    from .plots import Figure


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
    collective: Collective = field(default_factory=Collective.single)  # the ranks of a distributed run


class Plugin:
    """A compression or analysis method applied to a model by a recipe stage.

    Subclasses set ``name``, ``description``, ``Config`` (a dataclass built by :mod:`compresskit.schema`) and
    override the hooks they need. ``kind = "analysis"`` plugins leave the model unchanged and need no training.
    ``path`` is where the config came from (``stages[0]`` in a recipe, the plugin's name otherwise): errors a hook
    raises through :meth:`error` name the field the user has to change.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type]
    kind: ClassVar[Literal["transform", "analysis"]] = "transform"

    path: str = ""

    def __init__(self, config: Any) -> None:
        self.config = config

    def error(self, field: str, message: str) -> ConfigError:
        """A ConfigError for config field ``field`` of this stage (``stages[0].lazy: ...``)."""
        path = self.path or self.name
        return ConfigError(f"{path}.{field}" if field else path, message)

    @classmethod
    def add_commands(cls, subparsers: argparse._SubParsersAction) -> None:
        """Add this plugin's own ``compresskit`` subcommands. Each sets ``func(args) -> exit status`` as its default;
        raising a CompressKitError prints one line and exits with 2. A command that runs a recipe calls
        ``args.run_recipe(recipe, raw, out_dir, model=...)``, the runner ``compresskit apply`` uses."""

    def apply(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Transform the model before training (e.g. swap modules). Returns the model to train."""
        return model

    def on_after_backward(self, step: int, ctx: RunContext) -> None:
        """Called after ``loss.backward()`` and before ``optimizer.step()``: gradients are available."""

    def on_step(self, step: int, ctx: RunContext) -> None:
        """Called after ``optimizer.step()`` of global step ``step`` (1-based): in-training schedules go here."""

    def settled(self, step: int, ctx: RunContext) -> bool:
        """Whether, after global step ``step``, this stage no longer changes how many bytes the model's tables hold
        (a distributed run re-places its tables only then; see docs/distributed.md)."""
        return True

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Called after training; may return a converted (e.g. quantized) model."""
        return model

    def report(self, ctx: RunContext) -> dict[str, Any]:
        """Numbers for the run report (JSON-serialisable)."""
        return {}

    def metrics(self, ctx: RunContext) -> dict[str, float]:
        """Scalars for the training log at a logged step (after :meth:`on_step`): the same keys every time. Called
        on every rank of a distributed run (collectives are allowed), so keep it cheap."""
        return {}

    def figures(self, ctx: RunContext, log: list[dict[str, float]]) -> list[Figure]:
        """Plots for the run report (after :meth:`finalize`), from the model and the training log's rows (keys
        of :meth:`metrics` prefixed ``<plugin name>/``)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Plugin state needed to resume (tensors, numbers, strings)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
