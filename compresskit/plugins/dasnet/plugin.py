"""The ``dasnet`` plugin: WTA activation sparsity, optional weight pruning and int8 quantization, and a sparse
execution path for inference."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Optional

from torch import nn
from torch.nn.utils import prune

from ...errors import ConfigError, shorten
from ...plots import Figure
from ...plugin import Plugin, RunContext
from ...schema import option
from .convert import native_batch_sizes, prepacked_batch_sizes, to_sparse_execution, tuned_dense_batch_sizes
from .fuse import folded_batchnorms
from .activity import ActivityProbe
from .quantize import linear_targets, quantize_int8
from .wta import WTADropout, insert_wta

log = logging.getLogger(__name__)

MAX_TUNE_BATCH = 64     # auto times each size with up to 27 forward passes (ResNet-20 w64: ~8 s each at 256)
MAX_TUNE_SIZES = 4
MAX_BLOCKS = 1024


@dataclass
class DasnetConfig:
    """Recipe fields of a ``dasnet`` stage (documented in docs/dasnet.md)."""

    sparsity: float = option(0.5, help="fraction of channels / neurons zeroed per sample", min=0, max=1,
                             max_exclusive=True)
    overrides: dict[str, Any] = option({}, help="module-name glob -> sparsity, e.g. {'features.*': 0.75}")
    layers: list[str] = option([], help="glob patterns of activation modules to follow (default: the activations "
                                        "after a convolution, not the classifier head's; ['*'] = all)")
    after: list[str] = option(["ReLU"], help="activation class names WTA is placed after")
    active_in: Literal["both", "train", "eval"] = option("both", help="when WTA is applied")
    blocks: Optional[int] = option(None, help="rank contiguous channel blocks instead of single channels "
                                              "(CPU-friendly structure); null = per channel as in the paper",
                                   min=2, max=MAX_BLOCKS)
    weight_pruning: Optional[float] = option(None, help="L1 unstructured pruning amount for conv/linear weights",
                                             min=0, max=1, max_exclusive=True)
    quantize: Literal["none", "int8"] = option("none", help="int8 dynamic quantization of the Linear layers the sparse "
                                                           "path does not run: torchao, else torch.ao with a warning")
    sparse_execution: Literal["auto", "always", "never"] = option(
        "auto", help="after training, run inference at the tune_batches sizes on the fastest of the masked model, "
                     "WTA's compact output and the tuned dense model (BatchNorm folded, prepacked kernels): auto = "
                     "by timing each (the model structure can then differ run to run), always = the compact path "
                     "without timing, never = keep the masked dense model")
    tune_batches: list[int] = option([1], help=f"inference batch sizes for the compact path (at most "
                                               f"{MAX_TUNE_SIZES}); auto times each both ways and keeps the faster",
                                     min=1, max=MAX_TUNE_BATCH)
    fold_batchnorm: bool = option(True, help="fold eval BatchNorm (and a ReLU after it) into the compact convs")
    prepack_weights: bool = option(True, help="also time the compact convs with kernels prepacked for oneDNN; "
                                              "kept per batch size where faster (always: used without timing)")

    def validate(self, path: str) -> None:
        """Checks the field bounds cannot express: override sparsities, the tune_batches list, a non-empty after."""
        for pattern, value in self.overrides.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"{path}.overrides.{pattern}", f"got {shorten(value)}, expected a sparsity in [0, 1)")
        if not 1 <= len(self.tune_batches) <= MAX_TUNE_SIZES or len(set(self.tune_batches)) < len(self.tune_batches):
            raise ConfigError(f"{path}.tune_batches", f"got {shorten(self.tune_batches)}, expected 1 to "
                                                      f"{MAX_TUNE_SIZES} distinct batch sizes")
        if not self.after:
            raise ConfigError(f"{path}.after", "got [], expected at least one activation class name")


def _batches(sizes: list[int]) -> str:
    """Batch sizes for a report table: '1 32' or '-'."""
    return " ".join(map(str, sizes)) or "-"


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
        self.sparse_choice: dict[str, dict[str, Any]] = {}
        self.timings: list[dict[str, Any]] = []
        self.folded_batchnorms = 0
        self.prepacked_batches: list[int] = []
        self.native_batches: list[int] = []   # sizes whose shared channel sets run natively too (per-channel: always)
        self.tuned_dense_batches: list[int] = []   # batch sizes run as the tuned dense model (BN folded, prepacked)
        self.quantized: list[str] = []
        self.int8_backend: str | None = None
        self.weight_zero_fraction = 0.0
        self.activity: ActivityProbe | None = None

    def apply(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        cfg = self.config
        try:
            self.placed = insert_wta(model, cfg.sparsity, {k: float(v) for k, v in cfg.overrides.items()},
                                     cfg.layers or None, tuple(cfg.after), cfg.active_in, cfg.blocks,
                                     conv_only=not cfg.layers)
        except ValueError as e:
            field = "layers" if any(p in str(e) for p in cfg.layers) else "overrides"
            raise self.error(field, str(e)) from None
        if not self.placed:
            where = "" if cfg.layers else " after a convolution (set layers: ['*'] to follow every one)"
            raise self.error("after", f"no {', '.join(cfg.after)} modules{where} in {type(model).__name__}")
        if cfg.weight_pruning:
            prune.global_unstructured(_prunable(model), pruning_method=prune.L1Unstructured,
                                      amount=cfg.weight_pruning)
        self.activity = ActivityProbe(model, list(self.placed))
        return model

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        cfg = self.config
        if cfg.weight_pruning:
            for module, name in _prunable(model):
                if prune.is_pruned(module):
                    prune.remove(module, name)
        weights = [m.weight for m, _ in _prunable(model)]
        self.weight_zero_fraction = sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)
        self._sparse_execution(model, ctx)
        if cfg.quantize == "int8":
            self.quantized = linear_targets(model)
            model, self.int8_backend = quantize_int8(model, self.quantized)
        return model

    def _sparse_execution(self, model: nn.Module, ctx: RunContext) -> None:
        """Convert ``model`` to the sparse path as ``sparse_execution`` says, and record per WTA layer the choice
        made and why (``auto``: the timings) in ``sparse_choice``."""
        mode, sample = self.config.sparse_execution, ctx.sample_input
        if mode == "always" and sample is None:
            raise self.error("sparse_execution", "'always' needs a sample input to convert with: pass sample_input "
                                                 "to prepare() or run the model on a batch before finalize()")
        if mode != "never" and sample is not None:
            self.sparse_layers = to_sparse_execution(model, sample, self.config.tune_batches, tune=mode == "auto",
                                                     fold=self.config.fold_batchnorm,
                                                     prepack=self.config.prepack_weights, timings=self.timings)
            self.folded_batchnorms = folded_batchnorms(model)
            self.prepacked_batches = prepacked_batch_sizes(model)
            self.native_batches = native_batch_sizes(model)
            self.tuned_dense_batches = tuned_dense_batch_sizes(model)
        why = f"sparse_execution: {mode}"
        if mode == "auto":
            why = "auto: " + ("; ".join(_timing_text(t) for t in self.timings) or "no sample input to time")
        for name in self.placed:
            wta = next(m for m in model.get_submodule(name).modules() if isinstance(m, WTADropout))
            if wta.sparsity == 0 or wta.active_in == "train":
                reason = "sparsity 0" if wta.sparsity == 0 else "active_in: train (no WTA in inference)"
                choice = {"path": "dense", "batch_sizes": [], "reason": reason}
            elif wta.compact_batches:
                choice = {"path": "sparse", "batch_sizes": sorted(wta.compact_batches), "reason": why}
            elif self.tuned_dense_batches:
                choice = {"path": "tuned dense", "batch_sizes": self.tuned_dense_batches, "reason": why}
            else:
                choice = {"path": "dense", "batch_sizes": [], "reason": why}
            if choice["path"] == "sparse" and self.tuned_dense_batches:   # some sizes compact, others tuned dense
                choice["tuned_dense_batch_sizes"] = self.tuned_dense_batches
            self.sparse_choice[name] = choice
            log.info("WTA after %s: %s path (%s)", name, choice["path"], choice["reason"])

    def metrics(self, ctx: RunContext) -> dict[str, float]:
        """Measured active channels per sample of each WTA layer (see :mod:`.activity`)."""
        return self.activity.metrics() if self.activity is not None else {}

    def figures(self, ctx: RunContext, log: list[dict[str, float]]) -> list[Figure]:
        """Active channels per WTA layer (against its width and k), and over training from the log."""
        figures = []
        final = self.activity.figure() if self.activity is not None else None
        if final is not None:
            figures.append(final)
        columns = [k for k in (log[0] if log else {}) if k.startswith("active_channels/")]
        if columns:
            steps = [r["step"] for r in log]
            figures.append(Figure("dasnet_active_over_training", "DASNet: active channels per sample over training",
                                  "line", {c.split("/", 1)[1]: (steps, [r[c] for r in log]) for c in columns},
                                  xlabel="optimizer step", ylabel="channels per sample"))
        return figures

    def report(self, ctx: RunContext) -> dict[str, Any]:
        """WTA placement, weight sparsity, and the sparse execution choice per WTA layer (with ``auto``'s
        timings in ms)."""
        return {
            "wta_layers": len(self.placed),
            "mean_sparsity": sum(self.placed.values()) / max(len(self.placed), 1),
            "weight_zero_fraction": self.weight_zero_fraction,
            "sparse_execution": self.config.sparse_execution,
            "sparse_execution_layers": len(self.sparse_layers),
            "sparse_execution_choice": self.sparse_choice,
            "sparse_execution_timings": self.timings,
            "folded_batchnorms": self.folded_batchnorms,
            "prepacked_batches": self.prepacked_batches,
            "native_batches": self.native_batches,
            "tuned_dense_batches": self.tuned_dense_batches,
            "int8_linear_layers": len(self.quantized),
            "int8_backend": self.int8_backend,
            "tables": [{"title": "WTA placement", "columns": ["after module", "sparsity"],
                        "rows": [[name, s] for name, s in self.placed.items()]},
                       {"title": f"Sparse execution choice ({self.config.sparse_execution})",
                        "columns": ["WTA after", "path", "batch sizes", "why"],
                        "rows": [[name, c["path"], _batches(c["batch_sizes"]), c["reason"]]
                                 for name, c in self.sparse_choice.items()]},
                       {"title": "Sparse execution", "columns": ["layer", "batch sizes run sparsely"],
                        "rows": [[name, _batches(b)] for name, b in self.sparse_layers.items()]}],
        }


def _timing_text(record: dict[str, Any]) -> str:
    """One batch size's timings as the report's reason: each path timed, in ms, and the one kept."""
    paths = [("masked", record["dense_ms"]), ("compact", record["compact_ms"]),
             ("prepacked", record.get("prepacked_ms")), ("native", record.get("native_ms")),
             ("tuned dense", record.get("tuned_ms"))]
    kept = "prepacked" if record["prepacked"] else "native" if record.get("native") else \
        "compact" if record["compact"] else "tuned dense" if record.get("tuned") else "masked"
    return f"batch {record['batch']}: " + ", ".join(f"{name} {ms:.3g} ms" for name, ms in paths if ms is not None) + \
        f" -> {kept}"
