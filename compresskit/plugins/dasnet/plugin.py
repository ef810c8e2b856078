"""The ``dasnet`` plugin: WTA activation sparsity, optional weight pruning and int8 quantization, and a sparse
execution path for inference."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn
from torch.nn.utils import prune

from ...errors import ConfigError
from ...plugin import Plugin, RunContext
from ...schema import option
from .convert import prepacked_batch_sizes, to_sparse_execution
from .fuse import folded_batchnorms
from .wta import insert_wta


@dataclass
class DasnetConfig:
    """Recipe fields of a ``dasnet`` stage (documented in docs/dasnet.md)."""

    sparsity: float = option(0.5, help="fraction of channels / neurons zeroed per sample", min=0, max=1,
                             max_exclusive=True)
    overrides: dict[str, Any] = option({}, help="module-name glob -> sparsity, e.g. {'features.*': 0.75}")
    layers: list[str] = option([], help="glob patterns of activation modules to follow (default: all)")
    after: list[str] = option(["ReLU"], help="activation class names WTA is placed after")
    active_in: Literal["both", "train", "eval"] = option("both", help="when WTA is applied")
    blocks: Optional[int] = option(None, help="rank contiguous channel blocks instead of single channels "
                                              "(CPU-friendly structure); null = per channel as in the paper", min=2)
    weight_pruning: Optional[float] = option(None, help="L1 unstructured pruning amount for conv/linear weights",
                                             min=0, max=1, max_exclusive=True)
    quantize: Literal["none", "int8"] = option("none", help="int8 dynamic quantization of Linear layers (torch.ao)")
    sparse_execution: bool = option(True, help="after training, run inference on WTA's compact output")
    tune_batches: list[int] = option([1], help="batch sizes timed both ways; the compact path is kept where faster")
    fold_batchnorm: bool = option(True, help="fold eval BatchNorm (and a ReLU after it) into the compact convs")
    prepack_weights: bool = option(True, help="also time the compact convs with kernels prepacked for oneDNN; "
                                              "kept per batch size where faster")

    def validate(self, path: str) -> None:
        for pattern, value in self.overrides.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"{path}.overrides.{pattern}", f"got {value!r}, expected a sparsity in [0, 1)")
        for i, b in enumerate(self.tune_batches):
            if b < 1:
                raise ConfigError(f"{path}.tune_batches[{i}]", f"got {b}, expected a batch size >= 1")


def _prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


class DasnetPlugin(Plugin):
    """DASNet: winners-take-all dropout for dynamic structured activation sparsity, with a sparse CPU path."""

    name = "dasnet"
    description = "DASNet: winners-take-all activation sparsity (+ weight pruning, int8) with sparse execution"
    Config = DasnetConfig

    def __init__(self, config: DasnetConfig) -> None:
        super().__init__(config)
        self.placed: dict[str, float] = {}
        self.sparse_layers: dict[str, list[int]] = {}
        self.folded_batchnorms = 0
        self.prepacked_batches: list[int] = []
        self.quantized: list[str] = []
        self.weight_zero_fraction = 0.0

    def apply(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        cfg = self.config
        try:
            self.placed = insert_wta(model, cfg.sparsity, {k: float(v) for k, v in cfg.overrides.items()},
                                     cfg.layers or None, tuple(cfg.after), cfg.active_in, cfg.blocks)
        except ValueError as e:
            field = "layers" if any(p in str(e) for p in cfg.layers) else "overrides"
            raise self.error(field, str(e)) from None
        if not self.placed:
            raise self.error("after", f"no {', '.join(cfg.after)} modules in {type(model).__name__}")
        if cfg.weight_pruning:
            prune.global_unstructured(_prunable(model), pruning_method=prune.L1Unstructured,
                                      amount=cfg.weight_pruning)
        return model

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        cfg = self.config
        if cfg.weight_pruning:
            for module, name in _prunable(model):
                if prune.is_pruned(module):
                    prune.remove(module, name)
        weights = [m.weight for m, _ in _prunable(model)]
        self.weight_zero_fraction = sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)
        if cfg.sparse_execution and ctx.sample_input is not None:
            self.sparse_layers = to_sparse_execution(model, ctx.sample_input, cfg.tune_batches,
                                                     fold=cfg.fold_batchnorm, prepack=cfg.prepack_weights)
            self.folded_batchnorms = folded_batchnorms(model)
            self.prepacked_batches = prepacked_batch_sizes(model)
        if cfg.quantize == "int8":
            from torch.ao.quantization import quantize_dynamic

            targets = {name for name, m in model.named_modules()
                       if isinstance(m, nn.Linear) and not name.endswith(".linear")}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
            self.quantized = sorted(targets)
        return model

    def report(self, ctx: RunContext) -> dict[str, Any]:
        return {
            "wta_layers": len(self.placed),
            "mean_sparsity": sum(self.placed.values()) / max(len(self.placed), 1),
            "weight_zero_fraction": self.weight_zero_fraction,
            "sparse_execution_layers": len(self.sparse_layers),
            "folded_batchnorms": self.folded_batchnorms,
            "prepacked_batches": self.prepacked_batches,
            "int8_linear_layers": len(self.quantized),
            "tables": [{"title": "WTA placement", "columns": ["after module", "sparsity"],
                        "rows": [[name, s] for name, s in self.placed.items()]},
                       {"title": "Sparse execution", "columns": ["layer", "batch sizes run sparsely"],
                        "rows": [[name, " ".join(map(str, b)) or "-"] for name, b in self.sparse_layers.items()]}],
        }
