"""The ``hypar`` analysis plugin: plans layer-wise data/model parallelism for 2^h accelerators; the model is left
unchanged."""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from ...errors import ConfigError
from ...plugin import Plugin, RunContext
from ...schema import option
from .chain import NETWORKS, LayerSpec, layers_from_model, paper_network
from .plan import HyparPlan, build_plan
from .report import level_table, totals_table, write_plan_report
from .cost import StateSpace
from .search import MAX_JOINT_STATES, baselines, hierarchical_plan, joint_plan


MAX_SAMPLE_ELEMENTS = 1 << 24   # elements of one traced sample (VGG at 224x224: 150,528)


@dataclass
class HyparConfig:
    """Recipe fields of a ``hypar`` stage (documented in docs/hypar.md)."""

    accelerators: int = option(16, help="number of accelerators, a power of two", min=1)
    batch: int = option(256, help="global training batch size", min=1)
    dtype: Literal["float32", "float16", "bfloat16"] = option("float32", help="element type for bytes")
    network: Optional[str] = option(None, help="plan a paper network (e.g. vgg-e) instead of the recipe's model")
    input_shape: Optional[list[int]] = option(None, help="per-sample input shape for tracing when no data is given",
                                              min=1, max=65536)
    search: Literal["hierarchical", "joint"] = option(
        "hierarchical", help="hierarchical: the paper's level-by-level DP; joint: optimal over all levels")
    partitions: list[Literal["dp", "mp", "mp_out"]] = option(
        ["dp", "mp"], help="partitions searched per layer and level: dp (batch), mp (the paper's input-channel "
                           "split), mp_out (output-channel split, AccPar's third type)")

    def validate(self, path: str) -> None:
        if self.input_shape is not None and math.prod(self.input_shape) > MAX_SAMPLE_ELEMENTS:
            raise ConfigError(f"{path}.input_shape", f"got {self.input_shape} ({math.prod(self.input_shape):,} "
                                                     f"elements per sample), expected at most "
                                                     f"{MAX_SAMPLE_ELEMENTS:,} (tracing runs a batch of 2)")
        if self.accelerators & (self.accelerators - 1):
            lo = 1 << (self.accelerators.bit_length() - 1)
            raise ConfigError(f"{path}.accelerators", f"got {self.accelerators}, expected a power of two "
                                                      f"(e.g. {lo} or {lo * 2})")
        if self.network is not None:
            NETWORKS.get(self.network.lower(), f"{path}.network")
        if not self.partitions or len(set(self.partitions)) != len(self.partitions):
            raise ConfigError(f"{path}.partitions", f"got {self.partitions}, expected distinct names from dp, mp, "
                                                    f"mp_out (e.g. [dp, mp] or [dp, mp, mp_out])")
        states = len(self.partitions) ** int(math.log2(self.accelerators))
        if self.search == "joint" and states > MAX_JOINT_STATES:
            raise ConfigError(f"{path}.search", f"joint search over {len(self.partitions)} partitions on "
                                                f"{self.accelerators} accelerators has {states:,} states per layer, "
                                                f"more than {MAX_JOINT_STATES:,}: use search: hierarchical")


def plan_layers(layers: list[LayerSpec], cfg: HyparConfig, title: str) -> HyparPlan:
    """Run the search and the baselines on a layer chain; returns the typed plan."""
    space = StateSpace.of(cfg.partitions, int(math.log2(cfg.accelerators)))
    start = time.perf_counter()
    plan = (joint_plan if cfg.search == "joint" else hierarchical_plan)(layers, cfg.batch, space)
    seconds = time.perf_counter() - start
    return build_plan(title, layers, plan, baselines(layers, cfg.batch, space), cfg.batch, cfg.accelerators,
                      cfg.dtype, cfg.search, seconds)


class HyparPlugin(Plugin):
    """HyPar: hierarchical layer-wise parallelism planning by dynamic programming over a communication model."""

    name = "hypar"
    description = "HyPar: plan data/model parallelism per layer for 2^h accelerators (analysis, model unchanged)"
    Config = HyparConfig
    kind = "analysis"

    def __init__(self, config: HyparConfig) -> None:
        super().__init__(config)
        self.plan: HyparPlan | None = None
        self.files: list[str] = []

    @classmethod
    def add_commands(cls, subparsers: argparse._SubParsersAction) -> None:
        """``compresskit plan``: the planner report from a recipe or from flags."""
        from .cli import add_plan_command

        add_plan_command(subparsers)

    def layers(self, model: nn.Module | None, ctx: RunContext) -> tuple[list[LayerSpec], str]:
        """The chain to plan: the named paper network, else the traced model."""
        if self.config.network:
            return paper_network(self.config.network, f"{self.path}.network"), self.config.network
        if model is None:
            raise self.error("network", "no model to plan: give the recipe a model or name a paper network "
                                        f"({', '.join(NETWORKS)})")
        if ctx.sample_input is not None:
            sample, input_path = ctx.sample_input, "data"
        elif self.config.input_shape:
            sample, input_path = (torch.randn(2, *self.config.input_shape),), f"{self.path}.input_shape"
        else:
            raise self.error("input_shape", "needed to trace the model when the recipe has no data "
                                            "(e.g. [3, 32, 32])")
        return layers_from_model(model, sample, input_path=input_path), type(model).__name__

    def apply(self, model: nn.Module | None, ctx: RunContext) -> nn.Module | None:
        layers, title = self.layers(model, ctx)
        self.plan = plan_layers(layers, self.config, title)
        if ctx.out_dir:
            self.files = write_plan_report(self.plan, ctx.out_dir)
        return model

    def report(self, ctx: RunContext) -> dict[str, Any]:
        if self.plan is None:
            return {}
        p = self.plan
        tables = []
        for title, (cols, rows) in (("Communication per step", totals_table(p)),
                                    ("Communication per hierarchy level", level_table(p))):
            tables.append({"title": title, "columns": cols, "rows": rows})
        return {"network": p.title, "accelerators": p.accelerators, "batch": p.batch,
                "total_bytes": p.total_bytes["hypar"], "ratio_vs_hypar": dict(p.ratio_vs_hypar),
                "planner_seconds": p.planner_seconds, "files": self.files, "tables": tables}
